"""All routed experts of a layer in one C call, for CPU inference on x86 with AVX-512 (bf16: AVX512-BF16).

A decode step sends a few tokens to each of most experts, so on a CPU it is bound by reading expert weights.
One oneDNN call per expert (``moe_core.onednn``) reads them at 7-12 GB/s per core here (bf16) and pays ~15 µs
per call, two calls per expert, ~2,900 per step for a 24-layer 64-expert model. This kernel
(``csrc/cpu_experts.c``, built for bf16 and for fp32) reads each expert's weights as one sequential stream,
14-21 GB/s in bf16 (the core streams ~21 GB/s), and does the swiglu in between, for every expert of the layer
in one call. vLLM's CPU build has a fused MoE kernel for the same reason. ``upmoe bench moe-layer --packed``
compares the two.

The kernel is compiled on first use with the machine's C compiler for the machine's own CPU (``-march=native``)
and cached under ``~/.cache/upmoe/kernels`` (``$UPMOE_KERNEL_CACHE`` overrides). Where there is no compiler, not
the CPU feature its dtype needs, or a shape it does not take, ``available`` says no and the experts stay on
oneDNN.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "cpu_experts.c"
BLOCK = 64  # output columns per packed block; gate_up blocks hold 32 gate and 32 up columns
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


@dataclass(frozen=True)
class _Variant:
    name: str
    cpu_flag: str  # what /proc/cpuinfo must list
    defines: tuple[str, ...]
    k_step: int  # inputs per weight group: bf16's vdpbf16ps takes k-pairs


_VARIANTS = {
    torch.bfloat16: _Variant("bf16", "avx512_bf16", (), 2),
    torch.float32: _Variant("fp32", "avx512f", ("-DEXPERTS_FP32",), 1),
}


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cache_dir() -> Path:
    return Path(os.environ.get("UPMOE_KERNEL_CACHE", Path.home() / ".cache" / "upmoe" / "kernels"))


def _build(compiler: str, flags: list[str], target: Path) -> bool:
    """Compile the kernel to ``target``; False (with a warning) where that fails, e.g. an unwritable cache."""
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename: concurrent ranks never load a half-written library.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        subprocess.run([compiler, *flags, "-o", tmp, str(SOURCE)], check=True, capture_output=True, text=True)
        os.replace(tmp, target)
        return True
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", None) or e
        log.warning("the CPU experts kernel %s did not build (%s); experts stay on oneDNN", target.name, detail)
        return False
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


@functools.cache
def _entry(variant: _Variant) -> ctypes._CFuncPtr | None:
    """The compiled kernel's entry point, built once per variant, source, compiler and CPU; None where it cannot
    be built here."""
    cpu = _cpu_flags()
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if platform.machine() != "x86_64" or variant.cpu_flag not in cpu or compiler is None:
        return None
    flags = [*_FLAGS, *variant.defines]
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *flags, *sorted(cpu)]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"experts_{variant.name}-{key}.so"
    if not target.exists() and not _build(compiler, flags, target):
        return None
    lib = ctypes.CDLL(str(target))  # torch is loaded, so the kernel's OpenMP is torch's libgomp
    entry = getattr(lib, f"experts_{variant.name}")
    entry.restype = None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64  # x, offsets, E, D, F, gate_up, down, h, y, threads
    entry.argtypes = [ptr, ptr, i64, i64, i64, ptr, ptr, ptr, ptr, ctypes.c_int]
    return entry


def available(device: torch.device | str, dtype: torch.dtype, hidden_size: int, expert_size: int) -> bool:
    """Whether experts of this shape and dtype can run on the kernel on ``device``."""
    return (
        torch.device(device).type == "cpu"
        and dtype in _VARIANTS
        and hidden_size % BLOCK == 0
        and expert_size % (BLOCK // 2) == 0
        and _entry(_VARIANTS[dtype]) is not None
    )


def _step(dtype: torch.dtype) -> int:
    return _VARIANTS[dtype].k_step


def pack_gate_up(gate_up_EGD: torch.Tensor) -> torch.Tensor:
    """[E, 2F, D] (gate rows then up rows) -> [E, F/32, D/s, 64, s] with s the dtype's k-step: each block of 64
    outputs one stream of k-steps, as the kernel reads them (bf16 in k-pairs, for vdpbf16ps), its columns 32
    gate then 32 up, so one block yields 32 finished swiglu outputs."""
    e, g, d = gate_up_EGD.shape
    s, half = _step(gate_up_EGD.dtype), BLOCK // 2
    # [E, gate|up, F/32, 32, D/s, s] -> [E, F/32, D/s, gate|up, 32, s]: one copy
    blocks = gate_up_EGD.detach().reshape(e, 2, g // 2 // half, half, d // s, s).permute(0, 2, 4, 1, 3, 5)
    return blocks.contiguous().reshape(e, g // BLOCK, d // s, BLOCK, s)


def pack_down(down_EDF: torch.Tensor) -> torch.Tensor:
    """[E, D, F] -> [E, D/64, F/s, 64, s]."""
    e, d, f = down_EDF.shape
    s = _step(down_EDF.dtype)
    return down_EDF.detach().reshape(e, d // BLOCK, BLOCK, f // s, s).permute(0, 1, 3, 2, 4).contiguous()


def experts(x_SD: torch.Tensor, counts: list[int], gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``down_e(silu(gate_e x) * up_e x)`` for each expert e and its block of ``counts[e]`` slots, on weights
    packed by ``pack_gate_up`` / ``pack_down``."""
    num_experts, hidden, width = down.shape[0], x_SD.shape[1], down.shape[2] * down.shape[4]  # F/s k-steps of s
    # The C side trusts these shapes: check them here rather than read out of bounds there.
    if gate_up.dtype != down.dtype or gate_up.shape[0] != num_experts or gate_up.shape[2] * gate_up.shape[4] != hidden:
        raise ValueError(f"packed weights {tuple(gate_up.shape)} / {tuple(down.shape)} do not fit slots of {hidden}")
    if len(counts) != num_experts or sum(counts) != x_SD.shape[0]:
        raise ValueError(
            f"{len(counts)} counts summing to {sum(counts)} for {num_experts} experts and {x_SD.shape[0]} slots"
        )
    dtype = down.dtype
    x_SD = x_SD.to(dtype).contiguous()
    offsets = torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int64)
    h_SF = torch.empty(x_SD.shape[0], width, dtype=dtype)
    y_SD = torch.empty_like(x_SD)
    pointers = [t.data_ptr() for t in (x_SD, offsets)], [t.data_ptr() for t in (gate_up, down, h_SF, y_SD)]
    _entry(_VARIANTS[dtype])(*pointers[0], num_experts, hidden, width, *pointers[1], torch.get_num_threads())
    return y_SD
