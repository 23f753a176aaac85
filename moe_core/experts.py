"""Routed experts: weights for the experts a module owns, and interchangeable compute backends.

Shape legend: S slots (tokens sorted by expert), D hidden, F expert width, E_l experts owned locally.
Weights are stored stacked, ``gate_up_proj`` [E_l, 2F, D] (gate rows then up rows, as in HF per-expert
``gate_proj``/``up_proj``) and ``down_proj`` [E_l, D, F]. Every backend computes, for each owned expert e and
its contiguous block of slots, ``down_e(silu(gate_e x) * up_e x)``.

Backends:
- ``eager``: a plain loop over experts, the readable reference and test oracle;
- ``grouped``: ``torch.nn.functional.grouped_mm`` (CPU and CUDA), two grouped matmuls for all experts;
- ``megablocks``: MegaBlocks' grouped GEMM kernels (CUDA only, imported lazily).

For CPU inference the weights can instead be prepacked (``pack_for_cpu_inference``), which replaces the
backend: on x86 CPUs with AVX-512 (AVX512-BF16 for bf16) for ``moe_core.cpu_experts``' kernel, one call for
all experts of a layer; otherwise per expert for oneDNN (``moe_core.onednn``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from moe_core import cpu_experts, onednn
from moe_core.host_reads import split_sizes


class ExpertBackend(str, Enum):
    EAGER = "eager"
    GROUPED = "grouped"
    MEGABLOCKS = "megablocks"


class BackendUnavailable(RuntimeError):
    """The requested expert backend cannot run on this machine."""


def _swiglu(h_SG: torch.Tensor) -> torch.Tensor:
    gate, up = h_SG.chunk(2, dim=-1)
    return F.silu(gate) * up


def eager_experts(
    x_SD: torch.Tensor, counts: list[int], gate_up_EGD: torch.Tensor, down_EDF: torch.Tensor
) -> torch.Tensor:
    # unbind (not gate_up_EGD[e]) so backward stacks the per-expert grads once instead of materialising
    # a full-size zero gradient for every expert.
    gate_ups, downs = gate_up_EGD.unbind(0), down_EDF.unbind(0)
    outputs = [_swiglu(chunk @ gate_ups[e].T) @ downs[e].T for e, chunk in enumerate(torch.split(x_SD, counts))]
    return torch.cat(outputs) if outputs else x_SD.new_zeros(0, down_EDF.shape[1])


class _DenseGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: grouped_mm's backward rejects stride-0 ones
    (e.g. the gradient of ``.sum()``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def grouped_mm_supported(x_SD: torch.Tensor, gate_up_EGD: torch.Tensor) -> bool:
    """torch's grouped_mm needs every row stride to be a multiple of 16 bytes."""
    if not hasattr(F, "grouped_mm"):
        return False
    itemsize = x_SD.element_size()
    hidden, width = gate_up_EGD.shape[2], gate_up_EGD.shape[1] // 2
    return (hidden * itemsize) % 16 == 0 and (width * itemsize) % 16 == 0


def grouped_experts(
    x_SD: torch.Tensor, counts: list[int], gate_up_EGD: torch.Tensor, down_EDF: torch.Tensor
) -> torch.Tensor:
    if not grouped_mm_supported(x_SD, gate_up_EGD):
        # Same math, one matmul per expert: for widths torch's kernel cannot take (tiny test shapes).
        return eager_experts(x_SD, counts, gate_up_EGD, down_EDF)
    offsets = torch.tensor(counts, device=x_SD.device).cumsum(0).to(torch.int32)
    h_SG = F.grouped_mm(x_SD, gate_up_EGD.transpose(1, 2), offs=offsets)
    y_SD = F.grouped_mm(_swiglu(h_SG).contiguous(), down_EDF.transpose(1, 2), offs=offsets)
    return _DenseGrad.apply(y_SD)


def onednn_experts(
    x_SD: torch.Tensor, counts: list[int], gate_ups: list[torch.Tensor], downs: list[torch.Tensor]
) -> torch.Tensor:
    """The experts on weights packed by ``onednn.pack``, one pair per expert; experts with no slot are skipped."""
    outputs = [
        onednn.linear(_swiglu(onednn.linear(chunk, gate_ups[e])), downs[e])
        for e, chunk in enumerate(torch.split(x_SD, counts))
        if counts[e]
    ]
    return torch.cat(outputs) if outputs else x_SD.new_zeros(0, x_SD.shape[1])


def megablocks_experts(
    x_SD: torch.Tensor, counts: list[int], gate_up_EGD: torch.Tensor, down_EDF: torch.Tensor
) -> torch.Tensor:
    if not x_SD.is_cuda:
        raise BackendUnavailable(
            "the 'megablocks' expert backend runs only on CUDA tensors; use backend 'grouped' on CPU"
        )
    try:
        from megablocks import grouped_gemm_util as gg  # lazy: CUDA-only optional dependency
    except ImportError as e:
        raise BackendUnavailable(
            "the 'megablocks' expert backend needs the megablocks package with its grouped_gemm kernels "
            "(pip install 'upmoe[megablocks]' on a CUDA machine); use backend 'grouped' instead"
        ) from e
    if not gg.grouped_gemm_is_available():
        raise BackendUnavailable("megablocks is installed but its grouped_gemm kernels are not")
    batch_sizes = torch.tensor(counts, dtype=torch.int64)  # MegaBlocks wants the sizes on the host
    h_SG = gg.ops.gmm(x_SD, gate_up_EGD, batch_sizes, trans_b=True)
    return gg.ops.gmm(_swiglu(h_SG).contiguous(), down_EDF, batch_sizes, trans_b=True)


ExpertsFn = Callable[[torch.Tensor, list[int], torch.Tensor, torch.Tensor], torch.Tensor]

_BACKENDS: dict[ExpertBackend, ExpertsFn] = {
    ExpertBackend.EAGER: eager_experts,
    ExpertBackend.GROUPED: grouped_experts,
    ExpertBackend.MEGABLOCKS: megablocks_experts,
}


def default_backend() -> ExpertBackend:
    return ExpertBackend.GROUPED if hasattr(F, "grouped_mm") else ExpertBackend.EAGER


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """Autocast's dtype where it is on for this device type, else None (``moe_core.fake_devices`` emulates it
    here for devices that have no autocast of their own: meta, and fake CUDA on a CPU build)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the expert matmuls run in: autocast's where it is on (grouped_mm has no autocast rule, so the
    cast is ours, as autocast would do for a linear), otherwise the weights'. Either way activations and weights
    agree: grouped kernels take no mixed dtypes."""
    return autocast_dtype(x.device.type) or weight.dtype


class Experts(nn.Module):
    """The routed experts with global ids ``first_expert .. first_expert + num_local - 1``.

    Built owning all experts on one device, or a contiguous block of them under expert parallelism; either
    way ``forward`` receives only the slots for the experts it owns, sorted by expert.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        expert_size: int,
        *,
        first_expert: int = 0,
        num_local: int | None = None,
        backend: ExpertBackend | str | None = None,
    ) -> None:
        super().__init__()
        num_local = num_experts - first_expert if num_local is None else num_local
        if not (0 <= first_expert and num_local > 0 and first_expert + num_local <= num_experts):
            raise ValueError(f"experts {first_expert}..{first_expert + num_local - 1} not in 0..{num_experts - 1}")
        self.num_experts = num_experts
        self.first_expert = first_expert
        self.num_local = num_local
        self.expert_size = expert_size
        self.backend = ExpertBackend(backend) if backend is not None else default_backend()
        self.gate_up_proj = nn.Parameter(torch.empty(num_local, 2 * expert_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_local, hidden_size, expert_size))
        # Once packed for CPU inference: (experts of (slots, counts) on the packed weights, their dtype, kernel
        # name); the stacked parameters are then gone.
        self._packed: tuple[Callable[[torch.Tensor, list[int]], torch.Tensor], torch.dtype, str] | None = None

    @property
    def owned(self) -> range:
        return range(self.first_expert, self.first_expert + self.num_local)

    @property
    def packed_for(self) -> str | None:
        """The CPU kernel the weights are packed for ("cpu-kernel" or "onednn"), None while unpacked."""
        return self._packed[2] if self._packed is not None else None

    def pack_for_cpu_inference(self, *, kernel: bool = True) -> int:
        """Prepack the experts' weights for the fastest CPU kernel this machine has (``kernel=False``: oneDNN
        even where ``cpu_experts`` runs) and drop the stacked parameters: inference only, from here on (no
        gradients, no state_dict entries). The number of weights packed."""
        if self._packed is None:
            gate_up, down = self.gate_up_proj.detach(), self.down_proj.detach()
            dtype, hidden = gate_up.dtype, gate_up.shape[2]
            if kernel and cpu_experts.available(gate_up.device, dtype, hidden, self.expert_size):
                run = functools.partial(
                    cpu_experts.experts, gate_up=cpu_experts.pack_gate_up(gate_up), down=cpu_experts.pack_down(down)
                )
                self._packed = (run, dtype, "cpu-kernel")
            else:
                gate_ups, downs = [onednn.pack(w) for w in gate_up.unbind(0)], [onednn.pack(w) for w in down.unbind(0)]
                self._packed = (functools.partial(onednn_experts, gate_ups=gate_ups, downs=downs), dtype, "onednn")
            self.gate_up_proj = self.down_proj = None
        return 2 * self.num_local

    def forward(self, x_SD: torch.Tensor, counts_E: torch.Tensor | list[int]) -> torch.Tensor:
        counts = split_sizes(counts_E, x_SD.shape[0]) if isinstance(counts_E, torch.Tensor) else list(counts_E)
        if self._packed is not None:
            run, dtype, _ = self._packed
            return run(x_SD.to(dtype), counts)
        dtype = compute_dtype(x_SD, self.gate_up_proj)
        x_SD, gate_up, down = x_SD.to(dtype), self.gate_up_proj.to(dtype), self.down_proj.to(dtype)
        if x_SD.shape[0] == 0:
            # Keep the weights in the graph so every rank's backward touches them (DDP/ZeRO hooks fire).
            return x_SD.new_zeros(0, x_SD.shape[1]) + 0 * (gate_up.sum() + down.sum())
        return _BACKENDS[self.backend](x_SD, counts, gate_up, down)

    def extra_repr(self) -> str:
        backend = f"{self.packed_for}-packed" if self._packed is not None else self.backend.value
        return (
            f"experts={self.first_expert}..{self.first_expert + self.num_local - 1} of {self.num_experts}, "
            f"expert_size={self.expert_size}, backend={backend}"
        )
