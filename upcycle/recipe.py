"""The per-layer math of upcycling: one dense SwiGLU FFN in, one Qwen2-MoE sparse block's weights out.

Pure functions of (dense weights, spec, layer index): no I/O, no global random state, so the Ray job can run
layers in any order on any worker and still write the same checkpoint (docs/design.md §5.4).

Shape legend:
    D hidden size, F dense FFN width (hFFN), h expert size (hE), E routed experts, N_s shared experts,
    n = N_s + E fine-grained experts ("chunks": shared first, then routed 0..E-1), S = N_s·h fused shared width,
    C copies of the FFN, G = F / h shards of the FFN (virtual-group), k neurons re-initialised per expert.
    gate_FD, up_FD [F, D], down_DF [D, F]       the dense FFN, y = down(silu(gate x) * up x)
    gate_up_EGD [E, 2h, D] (gate rows then up rows), down_EDh [E, D, h]   as moe_core.experts.Experts stores them
    shared_gate_SD, shared_up_SD [S, D], shared_down_DS [D, S], shared_expert_gate_1D [1, D], router_ED [E, D]
    source_nh, reinit_mask_nh [n, h]            per slot of each fine-grained expert

A "neuron" j of the FFN is gate row j, up row j and down column j together. A SwiGLU FFN is a sum over its
neurons, so any set of neurons is itself a (narrower) SwiGLU FFN, and summing the FFNs of a partition of the
neurons gives back the dense output exactly. Every method below is a way of handing neurons to experts.

Methods (``InitMethod``):
- ``qwen2`` (Qwen2 report; docs/design.md §5.1): C = ceil(n·h / F) copies of the FFN, each shuffled with its own random
  permutation of the F neurons; the copies are concatenated into a stream of C·F neurons, cut into n consecutive
  chunks of h, the rest discarded. The first N_s chunks, in order, form the fused shared expert; the next E are
  routed experts 0..E-1. Then every fine-grained expert (shared chunks too) re-initialises ``reinit_ratio`` of
  itself, Drop-Upcycling style: with neuron granularity, exactly k = round(ratio·h) of its neurons (the same
  indices in gate rows, up rows and down columns), with element granularity exactly round(ratio·numel) random
  elements of each of its gate, up and down blocks, independently. Re-drawn values come from N(mean, std) of the
  ORIGINAL dense matrix they replace, so they have the right scale. Router and shared_expert_gate ~ N(0,
  router_std). Why re-init at all: copies of the same neurons would otherwise receive near-identical gradients
  and stay redundant; the random part breaks the symmetry while the kept part carries the dense knowledge.
- ``drop-upcycling`` (Nakamura et al. 2025, per-expert variant): no copies and no partition; each fine-grained
  expert independently draws h distinct neurons uniformly from the dense FFN, then re-initialises as above.
- ``virtual-group`` (NVIDIA, Vavre et al. 2024): needs F % h == 0; G = F / h shards. Routed expert i holds the
  un-shuffled shard i mod G (neurons [(i mod G)·h, (i mod G + 1)·h)); no re-init. The G experts of a virtual
  group (same i // G: one whole copy of the FFN) share one router row, so with top_k a multiple of G the router
  picks whole groups, i.e. whole copies of the FFN. Each routed down is scaled by G / (top_k · w), w the expected
  routing weight at a near-uniform router (1/E, or 1/top_k with norm_topk_prob), so that the layer starts near
  the dense function: top_k / G selected copies × w × G / (top_k · w) = 1 copy. Choice for shared experts (the
  method has none): shared chunk s takes shard s mod G with its down ZEROED, so it starts contributing nothing
  and only learns to, rather than adding a second copy of the FFN on top of the routed ones.
- ``preserve`` (exact; docs/design.md §5.3): needs S >= F. The shared expert holds the whole,
  un-shuffled FFN in its first F neurons (padding neurons all zero) with down × 2, because shared_expert_gate
  is all zeros and sigmoid(0) = 0.5. Routed experts take exactly the ``qwen2`` gate/up (same chunks, same
  re-init draws) but a ZERO down, so they add nothing. The MoE layer computes the dense FFN exactly at step 0.
- ``random``: every tensor ~ N(0, init_std) (router and shared_expert_gate ~ N(0, router_std)): the
  from-scratch baseline with the same shapes.

Randomness: every draw comes from ``layer_generator(seed, layer, stream)``, a CPU generator seeded from
sha256("{seed}/{layer}/{stream}"), one stream per purpose ("copies", "drop/{chunk}", "reinit/{chunk}",
"router", "shared-expert-gate", "random/{chunk}"). Results are bit-identical for the same inputs, independent
of worker, device, thread count and of the order layers are processed in, and a chunk's draws do not shift
when another chunk's do.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

import torch


class InitMethod(str, Enum):
    QWEN2 = "qwen2"
    DROP_UPCYCLING = "drop-upcycling"
    VIRTUAL_GROUP = "virtual-group"
    PRESERVE = "preserve"
    RANDOM = "random"


class ReinitGranularity(str, Enum):
    NEURON = "neuron"
    ELEMENT = "element"


class RecipeError(ValueError):
    """An upcycling spec that cannot be applied to this dense FFN; the message says what and why."""


def _coerce_enum(enum_cls: type[Enum], value: object, field: str) -> Enum:
    try:
        return enum_cls(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in enum_cls)
        raise RecipeError(f"{field} {value!r} is not one of {choices}") from None


@dataclass(frozen=True, kw_only=True)
class UpcycleSpec:
    """How to turn a dense FFN of any width into a fine-grained MoE layer (the same for every layer)."""

    num_experts: int  # routed
    num_shared: int  # shared experts, fused into one MLP of width num_shared · expert_size; may be 0
    expert_size: int  # h
    top_k: int
    norm_topk_prob: bool = False
    init: InitMethod = InitMethod.QWEN2
    reinit_ratio: float = 0.5
    reinit_granularity: ReinitGranularity = ReinitGranularity.NEURON
    router_std: float = 0.02
    init_std: float = 0.02  # std of every tensor for `random` init
    seed: int = 0

    def __post_init__(self) -> None:
        # Accept the plain strings a CLI or a JSON report hands over.
        object.__setattr__(self, "init", _coerce_enum(InitMethod, self.init, "init method"))
        object.__setattr__(
            self,
            "reinit_granularity",
            _coerce_enum(ReinitGranularity, self.reinit_granularity, "re-init granularity"),
        )

    @property
    def num_chunks(self) -> int:
        """n: fine-grained experts, shared and routed."""
        return self.num_experts + self.num_shared

    @property
    def shared_width(self) -> int:
        """S: width of the fused shared expert."""
        return self.num_shared * self.expert_size

    def validate(self, dense_width: int) -> None:
        """Raise RecipeError if this spec cannot upcycle a dense FFN of width ``dense_width``."""
        f, h = dense_width, self.expert_size

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise RecipeError(msg)

        need(f > 0, f"dense FFN width must be positive, got {f}")
        need(self.num_experts > 0, f"a MoE layer needs at least one routed expert, got num_experts={self.num_experts}")
        need(self.num_shared >= 0, f"num_shared must be 0 or more, got {self.num_shared}")
        need(
            1 <= self.top_k <= self.num_experts,
            f"top_k must be in 1..num_experts ({self.num_experts}): a token cannot pick {self.top_k} experts",
        )
        need(h > 0, f"expert size must be positive, got {h}")
        need(h <= f, f"expert size {h} is larger than the dense FFN width {f}: an expert is a subset of its neurons")
        need(0.0 <= self.reinit_ratio <= 1.0, f"reinit_ratio must be in [0, 1], got {self.reinit_ratio}")
        need(self.router_std >= 0, f"router_std must be non-negative, got {self.router_std}")
        need(self.init_std >= 0, f"init_std must be non-negative, got {self.init_std}")
        if self.init is InitMethod.VIRTUAL_GROUP:
            need(
                f % h == 0,
                f"virtual-group init needs the dense FFN width {f} to be a multiple of the expert size {h} "
                f"(each expert is one shard of the FFN); {f} % {h} = {f % h}",
            )
            g = f // h
            need(
                self.top_k % g == 0,
                f"virtual-group init needs top_k ({self.top_k}) to be a multiple of the {g} shards per FFN copy "
                f"(dense width {f} / expert size {h}), so that the router selects whole copies",
            )
            need(
                self.num_experts % g == 0,
                f"virtual-group init needs num_experts ({self.num_experts}) to be a multiple of the {g} shards per "
                f"FFN copy (dense width {f} / expert size {h}), so that every virtual group is a whole copy",
            )
        if self.init is InitMethod.PRESERVE:
            need(
                self.shared_width >= f,
                f"preserve init needs the fused shared expert ({self.num_shared} x {h} = {self.shared_width}) to be "
                f"at least as wide as the dense FFN ({f}) so it can hold the whole FFN",
            )


# ---------------------------------------------------------------------------------------------- randomness


def _stream_seed(seed: int, layer: int, stream: str) -> int:
    digest = hashlib.sha256(f"{seed}/{layer}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def layer_generator(seed: int, layer: int, stream: str) -> torch.Generator:
    """A CPU generator private to (seed, layer, purpose).

    Seeded from sha256, never Python's ``hash()`` (salted per process), so every Ray worker derives the same
    stream; separate streams keep one purpose's draws from shifting when another's change shape.
    """
    return torch.Generator(device="cpu").manual_seed(_stream_seed(seed, layer, stream))


def _normal(shape: tuple[int, ...], mean: float, std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32).normal_(mean, std, generator=gen)


def reinit_count(ratio: float, size: int) -> int:
    """round(ratio · size), halves rounded up (Python's ``round`` rounds halves to even: 2.5 -> 2)."""
    return min(size, math.floor(ratio * size + 0.5))


def reinit_stats(matrix: torch.Tensor) -> tuple[float, float]:
    """(mean, std) of a whole dense matrix: the distribution Drop-Upcycling re-draws from.

    One fused fp32 reduction (torch sums in cascaded blocks, so fp32 is accurate to ~1e-7 relative here);
    Bessel-corrected std.
    """
    if matrix.numel() == 0:
        raise RecipeError("cannot take the statistics of an empty matrix")
    std, mean = torch.std_mean(matrix.detach().float())
    return float(mean), float(std)


# ---------------------------------------------------------------------------------------------- assignment


def copies_needed(num_chunks: int, expert_size: int, dense_width: int) -> int:
    """ceil(n·h / F): copies of the FFN to cut n chunks of h neurons from (10 for 72 × 2560 from 18944)."""
    return -(-num_chunks * expert_size // dense_width)


def copy_permutations(dense_width: int, copies: int, gen: torch.Generator) -> torch.Tensor:
    """[C, F]: row c is the random permutation of the F neurons that shuffles copy c."""
    if copies == 0:
        return torch.empty(0, dense_width, dtype=torch.long)
    return torch.stack([torch.randperm(dense_width, generator=gen) for _ in range(copies)])


def _shuffled_chunks(spec: UpcycleSpec, dense_width: int, layer: int) -> torch.Tensor:
    n, h = spec.num_chunks, spec.expert_size
    perms_CF = copy_permutations(
        dense_width, copies_needed(n, h, dense_width), layer_generator(spec.seed, layer, "copies")
    )
    return perms_CF.reshape(-1)[: n * h].view(n, h)


def _drop_chunks(spec: UpcycleSpec, dense_width: int, layer: int) -> torch.Tensor:
    def draw(chunk: int) -> torch.Tensor:
        gen = layer_generator(spec.seed, layer, f"drop/{chunk}")
        # Sorted so an expert lists its neurons in dense order: the draw decides the set, not the order.
        return torch.randperm(dense_width, generator=gen)[: spec.expert_size].sort().values

    return torch.stack([draw(c) for c in range(spec.num_chunks)])


def _shard_of_chunk(spec: UpcycleSpec, dense_width: int) -> torch.Tensor:
    """Virtual-group: shared chunk s takes shard s mod G, routed expert i shard i mod G."""
    g = dense_width // spec.expert_size
    return torch.cat([torch.arange(spec.num_shared) % g, torch.arange(spec.num_experts) % g])


def _virtual_group_chunks(spec: UpcycleSpec, dense_width: int, layer: int) -> torch.Tensor:
    h = spec.expert_size
    return _shard_of_chunk(spec, dense_width)[:, None] * h + torch.arange(h)


def _preserve_chunks(spec: UpcycleSpec, dense_width: int, layer: int) -> torch.Tensor:
    shared_S = torch.arange(spec.shared_width)
    shared_S[dense_width:] = -1  # padding neurons
    routed = _shuffled_chunks(spec, dense_width, layer)[spec.num_shared :]  # exactly qwen2's routed chunks
    return torch.cat([shared_S.view(spec.num_shared, spec.expert_size), routed])


def _random_chunks(spec: UpcycleSpec, dense_width: int, layer: int) -> torch.Tensor:
    return torch.full((spec.num_chunks, spec.expert_size), -1, dtype=torch.long)


_ASSIGNERS = {
    InitMethod.QWEN2: _shuffled_chunks,
    InitMethod.DROP_UPCYCLING: _drop_chunks,
    InitMethod.VIRTUAL_GROUP: _virtual_group_chunks,
    InitMethod.PRESERVE: _preserve_chunks,
    InitMethod.RANDOM: _random_chunks,
}


def neuron_assignment(spec: UpcycleSpec, dense_width: int, layer: int) -> torch.Tensor:
    """[n, h] long: the dense neuron feeding each slot of each fine-grained expert, before any re-init.

    Rows are chunks in order: the first num_shared make up the fused shared expert, then routed 0..E-1.
    -1 marks a slot no dense neuron feeds (preserve padding; everything under random init).
    """
    spec.validate(dense_width)
    return _ASSIGNERS[spec.init](spec, dense_width, layer)


# ---------------------------------------------------------------------------------------------- weights


class _Block(NamedTuple):
    """One fine-grained expert in fp32: gate_hD, up_hD, down_Dh."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor


class _Stats(NamedTuple):
    gate: tuple[float, float]
    up: tuple[float, float]
    down: tuple[float, float]


@dataclass
class UpcycledFFN:
    """One layer's Qwen2-MoE sparse block weights, in the layouts moe_core's MoE stores them."""

    gate_up: torch.Tensor  # [E, 2h, D] gate rows then up rows, as Experts.gate_up_proj
    down: torch.Tensor  # [E, D, h], as Experts.down_proj
    shared_gate: torch.Tensor | None  # [S, D]; None when num_shared == 0
    shared_up: torch.Tensor | None  # [S, D]
    shared_down: torch.Tensor | None  # [D, S]
    shared_expert_gate: torch.Tensor | None  # [1, D]
    router: torch.Tensor  # [E, D]
    # [n, h] dense neuron per slot (shared chunks first); -1 where re-initialised (neuron granularity),
    # padding, or not from the dense FFN at all.
    source_neuron: torch.Tensor
    # [n, h] True where the neuron was re-drawn; all False when nothing was; None with element granularity
    # (a neuron is then only partly re-drawn) and for random init (nothing comes from the dense FFN).
    reinit_mask: torch.Tensor | None


def _gather(dense: _Block, down_FD: torch.Tensor, neurons_h: torch.Tensor) -> _Block:
    """The sub-FFN made of the given dense neurons; slots marked -1 get all-zero neurons.

    ``down_FD`` is the dense down_proj transposed once, so every gather reads whole rows (a column gather
    from [D, F] is several times slower).
    """
    valid = neurons_h >= 0
    idx = neurons_h.clamp(min=0)
    gate, up, down = dense.gate[idx], dense.up[idx], down_FD[idx].T.contiguous()
    if not bool(valid.all()):
        gate, up, down = gate * valid[:, None], up * valid[:, None], down * valid[None, :]
    return _Block(gate, up, down)


def reinit_neurons(
    gate_hD: torch.Tensor,
    up_hD: torch.Tensor,
    down_Dh: torch.Tensor,
    stats: tuple[tuple[float, float], tuple[float, float], tuple[float, float]],
    ratio: float,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Re-draw round(ratio·h) whole neurons (same index in gate, up, down) from the (mean, std) in ``stats``.

    Returns new (gate, up, down, mask_h); the inputs are not modified.
    """
    h, d = gate_hD.shape
    chosen = torch.randperm(h, generator=gen)[: reinit_count(ratio, h)]
    k = chosen.numel()
    (gm, gs), (um, us), (dm, ds) = stats
    gate = gate_hD.index_copy(0, chosen, _normal((k, d), gm, gs, gen))
    up = up_hD.index_copy(0, chosen, _normal((k, d), um, us, gen))
    down = down_Dh.index_copy(1, chosen, _normal((d, k), dm, ds, gen))
    mask = torch.zeros(h, dtype=torch.bool)
    mask[chosen] = True
    return gate, up, down, mask


def reinit_elements(matrix: torch.Tensor, mean: float, std: float, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """A copy of ``matrix`` with round(ratio·numel) random elements re-drawn from N(mean, std)."""
    flat = matrix.reshape(-1)
    chosen = torch.randperm(flat.numel(), generator=gen)[: reinit_count(ratio, flat.numel())]
    return flat.index_copy(0, chosen, _normal((chosen.numel(),), mean, std, gen)).view_as(matrix)


def _reinit_block(
    block: _Block, stats: _Stats, spec: UpcycleSpec, gen: torch.Generator
) -> tuple[_Block, torch.Tensor | None]:
    if spec.reinit_granularity is ReinitGranularity.NEURON:
        gate, up, down, mask = reinit_neurons(block.gate, block.up, block.down, stats, spec.reinit_ratio, gen)
        return _Block(gate, up, down), mask
    return (
        _Block(
            reinit_elements(block.gate, *stats.gate, spec.reinit_ratio, gen),
            reinit_elements(block.up, *stats.up, spec.reinit_ratio, gen),
            reinit_elements(block.down, *stats.down, spec.reinit_ratio, gen),
        ),
        None,
    )


def _virtual_group_scale(spec: UpcycleSpec, dense_width: int) -> float:
    """G / (top_k · w): top_k / G whole copies are picked, each weighted ~w, and together must make one copy."""
    expected_weight = 1.0 / spec.top_k if spec.norm_topk_prob else 1.0 / spec.num_experts
    return (dense_width // spec.expert_size) / (spec.top_k * expected_weight)


def _build_chunk(
    spec: UpcycleSpec, chunk: int, block: _Block, stats: _Stats, dense_width: int, layer: int
) -> tuple[_Block, torch.Tensor | None]:
    """Apply the method's per-expert step to a gathered chunk; returns the block and its re-init mask."""
    shared = chunk < spec.num_shared
    no_reinit = torch.zeros(spec.expert_size, dtype=torch.bool)
    if spec.init is InitMethod.VIRTUAL_GROUP:
        factor = 0.0 if shared else _virtual_group_scale(spec, dense_width)
        return block._replace(down=block.down * factor), no_reinit
    if spec.init is InitMethod.PRESERVE and shared:
        return block._replace(down=block.down * 2.0), no_reinit  # against sigmoid(0) = 0.5
    block, mask = _reinit_block(block, stats, spec, layer_generator(spec.seed, layer, f"reinit/{chunk}"))
    if spec.init is InitMethod.PRESERVE:
        block = block._replace(down=torch.zeros_like(block.down))
    return block, mask


def _random_chunk(spec: UpcycleSpec, chunk: int, hidden: int, layer: int) -> _Block:
    gen, h, std = layer_generator(spec.seed, layer, f"random/{chunk}"), spec.expert_size, spec.init_std
    return _Block(
        _normal((h, hidden), 0.0, std, gen), _normal((h, hidden), 0.0, std, gen), _normal((hidden, h), 0.0, std, gen)
    )


def _router(spec: UpcycleSpec, hidden: int, dense_width: int, layer: int) -> torch.Tensor:
    gen = layer_generator(spec.seed, layer, "router")
    if spec.init is InitMethod.VIRTUAL_GROUP:
        g = dense_width // spec.expert_size
        return _normal((spec.num_experts // g, hidden), 0.0, spec.router_std, gen).repeat_interleave(g, dim=0)
    return _normal((spec.num_experts, hidden), 0.0, spec.router_std, gen)


def _shared_expert_gate(spec: UpcycleSpec, hidden: int, layer: int) -> torch.Tensor:
    if spec.init is InitMethod.PRESERVE:
        return torch.zeros(1, hidden)
    return _normal((1, hidden), 0.0, spec.router_std, layer_generator(spec.seed, layer, "shared-expert-gate"))


_REINIT_METHODS = (InitMethod.QWEN2, InitMethod.DROP_UPCYCLING, InitMethod.PRESERVE)


def _chunk_builder(
    spec: UpcycleSpec, dense_ffn: tuple[torch.Tensor, torch.Tensor, torch.Tensor], source_nh: torch.Tensor, layer: int
) -> Callable[[int], tuple[_Block, torch.Tensor | None]]:
    """chunk index -> (fp32 block, re-init mask); the fp32 dense copy and its statistics are made once."""
    gate_FD, _, down_DF = dense_ffn
    dense_width, hidden = gate_FD.shape
    if spec.init is InitMethod.RANDOM:
        return lambda c: (_random_chunk(spec, c, hidden, layer), None)
    dense = _Block(*(t.detach().to("cpu", torch.float32) for t in dense_ffn))
    no_stats = ((0.0, 0.0),) * 3
    stats = _Stats(*map(reinit_stats, dense)) if spec.init in _REINIT_METHODS else _Stats(*no_stats)
    down_FD = dense.down.T.contiguous()
    return lambda c: _build_chunk(spec, c, _gather(dense, down_FD, source_nh[c]), stats, dense_width, layer)


def _check_dense(gate_FD: torch.Tensor, up_FD: torch.Tensor, down_DF: torch.Tensor) -> tuple[int, int]:
    if gate_FD.dim() != 2 or up_FD.shape != gate_FD.shape or down_DF.shape != gate_FD.shape[::-1]:
        raise RecipeError(
            "dense FFN shapes do not fit a SwiGLU MLP: expected gate_proj [F, D], up_proj [F, D], "
            f"down_proj [D, F]; got {tuple(gate_FD.shape)}, {tuple(up_FD.shape)}, {tuple(down_DF.shape)}"
        )
    return gate_FD.shape[0], gate_FD.shape[1]


@torch.no_grad()
def upcycle_ffn(
    gate_FD: torch.Tensor,
    up_FD: torch.Tensor,
    down_DF: torch.Tensor,
    *,
    spec: UpcycleSpec,
    layer: int,
    out_dtype: torch.dtype | None = None,
) -> UpcycledFFN:
    """Turn one dense SwiGLU FFN into one Qwen2-MoE sparse block (see the module docstring for the methods).

    Computes in fp32 on the CPU (the generators are CPU ones, so results do not depend on where the weights
    live), one expert at a time, casting each into the ``out_dtype`` outputs (default: the input dtype): peak
    memory is the outputs plus the fp32 dense FFN plus one expert.
    """
    dense_width, hidden = _check_dense(gate_FD, up_FD, down_DF)
    spec.validate(dense_width)
    dtype = out_dtype or gate_FD.dtype
    e, h, ns = spec.num_experts, spec.expert_size, spec.num_shared
    gate_up = torch.empty(e, 2 * h, hidden, dtype=dtype)
    down = torch.empty(e, hidden, h, dtype=dtype)
    shared = [torch.empty(spec.shared_width, hidden, dtype=dtype) for _ in range(2)]
    shared_down = torch.empty(hidden, spec.shared_width, dtype=dtype)

    source_nh = neuron_assignment(spec, dense_width, layer)
    build = _chunk_builder(spec, (gate_FD, up_FD, down_DF), source_nh, layer)
    masks: list[torch.Tensor | None] = []
    for c in range(spec.num_chunks):
        block, mask = build(c)
        masks.append(mask)
        if c < ns:
            rows = slice(c * h, (c + 1) * h)
            shared[0][rows], shared[1][rows], shared_down[:, rows] = block
        else:
            gate_up[c - ns, :h], gate_up[c - ns, h:], down[c - ns] = block

    reinit_mask = _stack_masks(masks)
    if reinit_mask is not None:
        source_nh = source_nh.masked_fill(reinit_mask, -1)
    has_shared = ns > 0
    return UpcycledFFN(
        gate_up=gate_up,
        down=down,
        shared_gate=shared[0] if has_shared else None,
        shared_up=shared[1] if has_shared else None,
        shared_down=shared_down if has_shared else None,
        shared_expert_gate=_shared_expert_gate(spec, hidden, layer).to(dtype) if has_shared else None,
        router=_router(spec, hidden, dense_width, layer).to(dtype),
        source_neuron=source_nh,
        reinit_mask=reinit_mask,
    )


def _stack_masks(masks: list[torch.Tensor | None]) -> torch.Tensor | None:
    """[n, h], or None as soon as one chunk has no per-neuron answer (element-wise re-init, random init)."""
    present = [m for m in masks if m is not None]
    return torch.stack(present) if len(present) == len(masks) else None
