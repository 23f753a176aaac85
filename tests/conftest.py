"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def torch_single_thread() -> Iterator[None]:
    """Run torch ops on one thread for the module, then restore the previous setting.

    The tests' models are tiny, so threads buy nothing; and on a 2-core machine shared with another busy
    process, OpenMP workers spin-wait for each other and a 1-second test file takes 10+ seconds. Use with
    ``pytestmark = pytest.mark.usefixtures("torch_single_thread")``.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` need CUDA: skip them, with the reason, on machines without it (CI)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
