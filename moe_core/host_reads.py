"""Every place the model's forward (and the training step around it) reads a device value on the host.

Each read is a device synchronisation on a GPU, so they are few and named here. They are also the only points
where the code needs data rather than shapes, which is what the fake-device harnesses (``bench/fake_devices``,
``upmoe train --plan``) cannot give: on a meta or fake tensor there is no value to read. There the functions
answer what a capacity plan assumes instead: routing spread evenly over the experts, sequences as long as
their cache allows, and NaN for logged numbers. On real tensors they read the value, nothing else.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake


def has_no_data(t: torch.Tensor) -> bool:
    """A meta or fake tensor: shapes, dtypes and devices, but no values."""
    return t.device.type == "meta" or is_fake(t)


def split_sizes(counts: torch.Tensor, total: int) -> list[int]:
    """``counts`` as a host list (rows per expert or per rank); without data, ``total`` spread evenly."""
    if not has_no_data(counts):
        return counts.tolist()
    n = counts.numel()
    return [total // n + (1 if i < total % n else 0) for i in range(n)]


def max_value(t: torch.Tensor, assumed: int) -> int:
    """``int(t.max())``; without data, ``assumed`` (the bound a plan must provision for)."""
    return assumed if has_no_data(t) else int(t.max())


def any_true(t: torch.Tensor) -> bool:
    """``bool(t.any())``; without data, False (a plan checks capacity itself)."""
    return False if has_no_data(t) else bool(t.any())


def floats(t: torch.Tensor) -> list[float]:
    """Logged numbers (a tensor of any shape, 0-d included) as a flat list of floats, in one read; without
    data, NaNs."""
    return [float("nan")] * t.numel() if has_no_data(t) else t.double().reshape(-1).tolist()
