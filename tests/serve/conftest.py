"""Fixtures for the serving tests: a tiny MoE model directory and running endpoints on a private local Ray."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.testlib import free_port


@pytest.fixture(scope="session")
def moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``upmoe init --preset debug-moe``: 64 routed experts of 32 + a shared expert, top-8, with a tokenizer."""
    out = tmp_path_factory.mktemp("serve-models") / "tiny-moe"
    cmd = [sys.executable, "-m", "upmoe.cli", "init", str(out), "--preset", "debug-moe", "--seed", "3"]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def serve_port() -> Iterator[int]:
    """A private local Ray with Serve's HTTP proxy on a free port, for the module.

    More logical CPUs than cores, so several single-CPU replicas and gang ranks fit on this 2-core machine.
    """
    import ray
    from ray import serve

    if ray.is_initialized():  # an earlier test module's Ray (e.g. a training run's): this module needs its own
        ray.shutdown()
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()
