"""The CPU experts kernel (bf16 and fp32): the reference experts' math, picked where it can run, oneDNN where it
cannot."""

from __future__ import annotations

import logging

import pytest
import torch

from moe_core import cpu_experts
from moe_core.experts import Experts, eager_experts

needs_kernel = pytest.mark.skipif(
    not cpu_experts.available("cpu", torch.bfloat16, 64, 32), reason="no AVX512-BF16 or no C compiler here"
)
DTYPES = [
    torch.bfloat16,
    pytest.param(
        torch.float32,
        marks=pytest.mark.skipif(not cpu_experts.available("cpu", torch.float32, 64, 32), reason="no AVX-512 here"),
    ),
]
# Relative error of the kernel against fp32 eager experts on the same weights. bf16: rounding h and y (~0.4 %,
# measured). fp32: the sums in another order (~1e-7 measured).
TOLERANCE = {torch.bfloat16: 1e-2, torch.float32: 1e-5}


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """A kernel cache of its own, and ``_entry`` re-evaluated before and after the test."""
    monkeypatch.setenv("UPMOE_KERNEL_CACHE", str(tmp_path))
    cpu_experts._entry.cache_clear()
    yield tmp_path
    cpu_experts._entry.cache_clear()


def _weights(
    num_experts: int, hidden: int, width: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(num_experts, 2 * width, hidden, generator=g) / hidden**0.5
    down = torch.randn(num_experts, hidden, width, generator=g) / width**0.5
    return gate_up.to(dtype), down.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_computes_the_reference_experts(threads: int, dtype: torch.dtype) -> None:
    # Uneven counts: empty experts, one token, more rows than one register tile (6), several tiles.
    counts = [0, 1, 7, 13, 2, 0]
    gate_up, down = _weights(len(counts), hidden=128, width=96, dtype=dtype)
    x = torch.randn(sum(counts), 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    want = eager_experts(x.float(), counts, gate_up.float(), down.float())
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu_experts.experts(x, counts, cpu_experts.pack_gate_up(gate_up), cpu_experts.pack_down(down))
    finally:
        torch.set_num_threads(before)
    assert got.dtype == dtype and got.shape == want.shape
    assert ((got.float() - want).norm() / want.norm()).item() < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_result_does_not_depend_on_threads(dtype: torch.dtype) -> None:
    counts = [3, 0, 9, 4]
    gate_up, down = _weights(len(counts), hidden=64, width=64, dtype=dtype)
    packed = cpu_experts.pack_gate_up(gate_up), cpu_experts.pack_down(down)
    x = torch.randn(sum(counts), 64, generator=torch.Generator().manual_seed(2)).to(dtype)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(cpu_experts.experts(x, counts, *packed))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1])  # threads split output blocks, never a sum


@needs_kernel
def test_kernel_takes_a_rank_with_no_slots() -> None:
    gate_up, down = _weights(3, hidden=64, width=32)
    packed = cpu_experts.pack_gate_up(gate_up), cpu_experts.pack_down(down)
    y = cpu_experts.experts(torch.zeros(0, 64, dtype=torch.bfloat16), [0, 0, 0], *packed)
    assert y.shape == (0, 64)


@needs_kernel
def test_kernel_rejects_counts_that_do_not_cover_the_slots() -> None:
    gate_up, down = _weights(2, hidden=64, width=32)
    packed = cpu_experts.pack_gate_up(gate_up), cpu_experts.pack_down(down)
    with pytest.raises(ValueError, match="counts"):
        cpu_experts.experts(torch.zeros(3, 64, dtype=torch.bfloat16), [1, 1], *packed)
    with pytest.raises(ValueError, match="do not fit"):
        cpu_experts.experts(torch.zeros(2, 128, dtype=torch.bfloat16), [1, 1], *packed)


def _packed_backend(dtype: torch.dtype, hidden: int = 64, width: int = 32) -> str:
    experts = Experts(4, hidden, width)
    with torch.no_grad():
        experts.gate_up_proj.normal_()
        experts.down_proj.normal_()
    experts = experts.to(dtype)
    experts.pack_for_cpu_inference()
    return experts.packed_for


@needs_kernel
def test_packing_picks_the_kernel_for_the_shapes_it_takes() -> None:
    assert _packed_backend(torch.bfloat16) == "cpu-kernel"
    assert _packed_backend(torch.float32) == "cpu-kernel"
    assert _packed_backend(torch.bfloat16, hidden=48) == "onednn"  # hidden not a multiple of 64
    assert _packed_backend(torch.bfloat16, width=40) == "onednn"  # width not a multiple of 32


def test_no_kernel_without_the_cpu_feature(monkeypatch, fresh_library) -> None:
    monkeypatch.setattr(cpu_experts, "_cpu_flags", lambda: {"avx2", "fma", "avx512f"})
    assert not cpu_experts.available("cpu", torch.bfloat16, 64, 32)  # bf16 needs AVX512-BF16
    assert _packed_backend(torch.bfloat16) == "onednn"
    monkeypatch.setattr(cpu_experts, "_cpu_flags", lambda: {"avx2", "fma"})
    assert not cpu_experts.available("cpu", torch.float32, 64, 32)  # fp32 needs AVX-512


@needs_kernel
def test_a_failed_build_warns_and_falls_back_to_onednn(monkeypatch, fresh_library, caplog) -> None:
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    with caplog.at_level(logging.WARNING, logger="moe_core.cpu_experts"):
        assert not cpu_experts.available("cpu", torch.bfloat16, 64, 32)
    assert "did not build" in caplog.text
    assert list(fresh_library.iterdir()) == []  # nothing half-written left in the cache


@needs_kernel
def test_an_unwritable_cache_warns_and_falls_back(monkeypatch, fresh_library, caplog) -> None:
    blocker = fresh_library / "file"
    blocker.write_text("")
    monkeypatch.setenv("UPMOE_KERNEL_CACHE", str(blocker / "kernels"))  # below a file: cannot be created
    with caplog.at_level(logging.WARNING, logger="moe_core.cpu_experts"):
        assert not cpu_experts.available("cpu", torch.bfloat16, 64, 32)
    assert "did not build" in caplog.text


@needs_kernel
def test_the_kernel_is_built_once_per_source_and_cpu(fresh_library) -> None:
    assert cpu_experts.available("cpu", torch.bfloat16, 64, 32)
    built = list(fresh_library.glob("experts_bf16-*.so"))  # the bf16 build only: fp32 is another library
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    cpu_experts._entry.cache_clear()
    assert cpu_experts.available("cpu", torch.bfloat16, 64, 32)
    assert list(fresh_library.glob("experts_*.so")) == built and built[0].stat().st_mtime_ns == stamp
