"""The per-layer upcycling math: how neurons reach experts, re-init counts and statistics, and the exact
identities of docs/design.md §5.3 (a partition of the neurons sums to the FFN; ``preserve`` reproduces it)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe_core.config import ModelConfig
from moe_core.layers import MLP
from moe_core.moe import MoE
from upcycle.recipe import (
    InitMethod,
    RecipeError,
    ReinitGranularity,
    UpcycledFFN,
    UpcycleSpec,
    copies_needed,
    copy_permutations,
    layer_generator,
    neuron_assignment,
    reinit_count,
    reinit_stats,
    upcycle_ffn,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

D, FW, H = 16, 48, 8  # hidden, dense FFN width, expert size (G = 6 shards)


def _dense(
    width: int = FW, hidden: int = D, seed: int = 0, stats: tuple[tuple[float, float], ...] = ((0, 0.3),) * 3
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random dense FFN (gate_FD, up_FD, down_DF) whose three matrices have the given (mean, std)."""
    g = torch.Generator().manual_seed(seed)
    (gm, gs), (um, us), (dm, ds) = stats
    gate = gm + gs * torch.randn(width, hidden, generator=g)
    up = um + us * torch.randn(width, hidden, generator=g)
    down = dm + ds * torch.randn(hidden, width, generator=g)
    return gate, up, down


def _spec(**kw) -> UpcycleSpec:
    base = dict(num_experts=8, num_shared=2, expert_size=H, top_k=2)
    return UpcycleSpec(**{**base, **kw})


def _swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def _expert(out: UpcycledFFN, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h = out.down.shape[2]
    return out.gate_up[e, :h], out.gate_up[e, h:], out.down[e]


def _chunk(out: UpcycledFFN, c: int, num_shared: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fine-grained expert c in chunk order (shared chunks first) as (gate_hD, up_hD, down_Dh)."""
    if c >= num_shared:
        return _expert(out, c - num_shared)
    h = out.down.shape[2]
    rows = slice(c * h, (c + 1) * h)
    return out.shared_gate[rows], out.shared_up[rows], out.shared_down[:, rows]


def _inputs(tokens: int = 32, hidden: int = D, seed: int = 5) -> torch.Tensor:
    return torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _moe_block(spec: UpcycleSpec, out: UpcycledFFN, hidden: int = D) -> MoE:
    """moe_core's MoE block holding the upcycled weights (eager backend: the readable reference)."""
    cfg = ModelConfig(
        model_type="qwen2_moe",
        vocab_size=32,
        hidden_size=hidden,
        intermediate_size=FW,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_experts=spec.num_experts,
        num_experts_per_tok=spec.top_k,
        moe_intermediate_size=spec.expert_size,
        shared_expert_intermediate_size=spec.shared_width,
        norm_topk_prob=spec.norm_topk_prob,
    )
    moe = MoE(cfg, backend="eager")
    moe.gate.weight.copy_(out.router)
    moe.experts.gate_up_proj.copy_(out.gate_up)
    moe.experts.down_proj.copy_(out.down)
    if spec.num_shared:
        moe.shared_expert.gate_proj.weight.copy_(out.shared_gate)
        moe.shared_expert.up_proj.weight.copy_(out.shared_up)
        moe.shared_expert.down_proj.weight.copy_(out.shared_down)
        moe.shared_expert_gate.weight.copy_(out.shared_expert_gate)
    return moe


@torch.no_grad()
def _dense_mlp(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> MLP:
    mlp = MLP(gate.shape[1], gate.shape[0])
    mlp.gate_proj.weight.copy_(gate)
    mlp.up_proj.weight.copy_(up)
    mlp.down_proj.weight.copy_(down)
    return mlp


def _assert_std(samples: torch.Tensor, mean: float, std: float) -> None:
    """Sample mean and std within 5 standard errors of the target (normal samples)."""
    n = samples.numel()
    s = samples.double()
    assert abs(float(s.mean()) - mean) < 5 * std / math.sqrt(n), (float(s.mean()), mean)
    assert abs(float(s.std()) - std) < 5 * std / math.sqrt(2 * n), (float(s.std()), std)


# ---------------------------------------------------------------------------------------------- building blocks


def test_copies_needed() -> None:
    assert copies_needed(72, 2560, 18944) == 10  # Qwen2-57B-A14B from Qwen2-7B
    assert copies_needed(12, 8, 48) == 2  # exactly two whole copies
    assert copies_needed(13, 8, 48) == 3
    assert copies_needed(1, 8, 48) == 1


def test_layer_generator_streams_are_deterministic_and_independent() -> None:
    def draw(*args) -> torch.Tensor:
        return torch.randn(8, generator=layer_generator(*args))

    assert torch.equal(draw(0, 3, "copies"), draw(0, 3, "copies"))
    for other in [(1, 3, "copies"), (0, 4, "copies"), (0, 3, "router"), (0, 30, "copies")]:
        assert not torch.equal(draw(0, 3, "copies"), draw(*other)), other


def test_copy_permutations_are_permutations() -> None:
    perms = copy_permutations(FW, 4, layer_generator(0, 0, "copies"))
    assert perms.shape == (4, FW) and perms.dtype == torch.long
    for row in perms:
        assert torch.equal(row.sort().values, torch.arange(FW))
    assert len({tuple(r.tolist()) for r in perms}) == 4  # each copy its own shuffle


def test_reinit_count_rounds_halves_up() -> None:
    assert reinit_count(0.5, 8) == 4
    assert reinit_count(0.3125, 8) == 3  # 2.5 -> 3 (Python's round would give 2)
    assert reinit_count(0.3, 8) == 2
    assert reinit_count(0.0, 8) == 0 and reinit_count(1.0, 8) == 8


def test_reinit_stats_match_fp64_mean_and_std() -> None:
    m = 0.3 + 2.0 * torch.randn(3000, 700, generator=torch.Generator().manual_seed(1))
    std, mean = torch.std_mean(m.double())
    got_mean, got_std = reinit_stats(m)
    assert got_mean == pytest.approx(float(mean), rel=1e-5) and got_std == pytest.approx(float(std), rel=1e-6)
    bf16_mean, bf16_std = reinit_stats(m.bfloat16())
    assert bf16_std == pytest.approx(float(std), rel=1e-2)


# ---------------------------------------------------------------------------------------------- qwen2


def test_qwen2_chunks_are_the_shuffled_copies_in_order() -> None:
    spec = _spec(seed=7)
    n = spec.num_chunks
    copies = copies_needed(n, H, FW)
    perms = copy_permutations(FW, copies, layer_generator(7, 2, "copies"))
    expected = perms.reshape(-1)[: n * H].view(n, H)
    assert torch.equal(neuron_assignment(spec, FW, layer=2), expected)

    out = upcycle_ffn(*_dense(), spec=spec, layer=2)
    kept = ~out.reinit_mask
    assert torch.equal(out.source_neuron[kept], expected[kept])
    assert (out.source_neuron[out.reinit_mask] == -1).all()


@pytest.mark.parametrize("ratio", [0.5, 0.3, 0.3125, 1.0])
def test_qwen2_reinit_exact_counts_and_kept_neurons_are_whole(ratio: float) -> None:
    gate, up, down = _dense()
    spec = _spec(reinit_ratio=ratio)
    out = upcycle_ffn(gate, up, down, spec=spec, layer=0)
    assert out.shared_gate.shape == (2 * H, D) and out.shared_up.shape == (2 * H, D)
    assert out.shared_down.shape == (D, 2 * H) and out.shared_expert_gate.shape == (1, D)
    assert out.gate_up.shape == (8, 2 * H, D) and out.down.shape == (8, D, H) and out.router.shape == (8, D)
    assert out.reinit_mask.shape == out.source_neuron.shape == (spec.num_chunks, H)
    k = reinit_count(ratio, H)
    assert out.reinit_mask.sum(dim=1).tolist() == [k] * spec.num_chunks  # shared chunks too
    for c in range(spec.num_chunks):
        eg, eu, ed = _chunk(out, c, spec.num_shared)
        for slot in range(H):
            src = int(out.source_neuron[c, slot])
            if out.reinit_mask[c, slot]:
                assert src == -1
                assert not any(torch.equal(eg[slot], row) for row in gate)  # a fresh draw, not a dense row
            else:
                assert torch.equal(eg[slot], gate[src])
                assert torch.equal(eu[slot], up[src])
                assert torch.equal(ed[:, slot], down[:, src])


@torch.no_grad()
def test_qwen2_redrawn_values_follow_each_source_matrix_statistics() -> None:
    hidden, width, h = 64, 256, 32
    stats = ((0.1, 0.5), (-0.2, 0.3), (0.05, 0.8))
    gate, up, down = _dense(width, hidden, seed=3, stats=stats)
    spec = UpcycleSpec(num_experts=16, num_shared=2, expert_size=h, top_k=4)
    out = upcycle_ffn(gate, up, down, spec=spec, layer=1)
    redrawn: dict[str, list[torch.Tensor]] = {"gate": [], "up": [], "down": []}
    for c in range(spec.num_chunks):
        eg, eu, ed = _chunk(out, c, spec.num_shared)
        mask = out.reinit_mask[c]
        redrawn["gate"].append(eg[mask])
        redrawn["up"].append(eu[mask])
        redrawn["down"].append(ed[:, mask])
    for name, matrix in zip(("gate", "up", "down"), (gate, up, down), strict=True):
        mean, std = reinit_stats(matrix)  # of the ORIGINAL dense matrix, not the target's
        samples = torch.cat([t.reshape(-1) for t in redrawn[name]])
        assert samples.numel() == 18 * 16 * hidden
        _assert_std(samples, mean, std)
    _assert_std(out.router, 0.0, 0.02)


def test_router_std_is_configurable() -> None:
    out = upcycle_ffn(
        *_dense(256, 64),
        spec=UpcycleSpec(num_experts=32, num_shared=1, expert_size=32, top_k=4, router_std=0.1),
        layer=0,
    )
    _assert_std(out.router, 0.0, 0.1)


@torch.no_grad()
def test_qwen2_without_reinit_each_whole_copy_sums_to_the_dense_ffn() -> None:
    gate, up, down = _dense()
    spec = _spec(num_experts=10, num_shared=2, reinit_ratio=0.0)  # 12 chunks of 8 = exactly 2 copies of 48
    out = upcycle_ffn(gate, up, down, spec=spec, layer=4)
    assert not out.reinit_mask.any() and (out.source_neuron >= 0).all()
    x = _inputs().double()  # fp64: the identity is exact, only summation order differs
    dense_y = _swiglu(x, gate.double(), up.double(), down.double())
    per_copy = FW // H
    for copy in range(2):
        chunks = range(copy * per_copy, (copy + 1) * per_copy)  # copy 0: both shared chunks + routed 0..3
        assert sorted(out.source_neuron[list(chunks)].reshape(-1).tolist()) == list(range(FW))
        y = sum(_swiglu(x, *(t.double() for t in _chunk(out, c, spec.num_shared))) for c in chunks)
        torch.testing.assert_close(y, dense_y, atol=1e-10, rtol=1e-10)


def test_element_granularity_redraws_exact_element_counts() -> None:
    gate, up, down = _dense()
    spec = _spec(reinit_ratio=0.3, reinit_granularity="element")
    assert spec.reinit_granularity is ReinitGranularity.ELEMENT
    out = upcycle_ffn(gate, up, down, spec=spec, layer=0)
    assert out.reinit_mask is None
    assert torch.equal(out.source_neuron, neuron_assignment(spec, FW, 0))  # neuron ids kept
    for c in range(spec.num_chunks):
        src = out.source_neuron[c]
        eg, eu, ed = _chunk(out, c, spec.num_shared)
        for block, original in ((eg, gate[src]), (eu, up[src]), (ed, down[:, src])):
            assert int((block != original).sum()) == reinit_count(0.3, block.numel())


def test_same_inputs_are_bit_identical_and_layers_differ() -> None:
    dense = _dense()
    spec = _spec()
    a, b = upcycle_ffn(*dense, spec=spec, layer=5), upcycle_ffn(*dense, spec=spec, layer=5)
    for name in UpcycledFFN.__dataclass_fields__:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    other_layer = upcycle_ffn(*dense, spec=spec, layer=6)
    assert not torch.equal(neuron_assignment(spec, FW, 5), neuron_assignment(spec, FW, 6))
    assert not torch.equal(a.gate_up, other_layer.gate_up) and not torch.equal(a.router, other_layer.router)
    assert not torch.equal(a.gate_up, upcycle_ffn(*dense, spec=_spec(seed=1), layer=5).gate_up)


def test_output_dtype_follows_input_or_override() -> None:
    gate, up, down = (t.to(torch.bfloat16) for t in _dense())
    out = upcycle_ffn(gate, up, down, spec=_spec(), layer=0)
    assert {t.dtype for t in (out.gate_up, out.down, out.shared_gate, out.shared_down, out.router)} == {torch.bfloat16}
    assert upcycle_ffn(gate, up, down, spec=_spec(), layer=0, out_dtype=torch.float32).gate_up.dtype == torch.float32


def test_no_shared_experts_gives_no_shared_tensors() -> None:
    out = upcycle_ffn(*_dense(), spec=_spec(num_shared=0), layer=0)
    assert out.shared_gate is None and out.shared_up is None and out.shared_down is None
    assert out.shared_expert_gate is None and out.source_neuron.shape == (8, H)


# ---------------------------------------------------------------------------------------------- drop-upcycling


def test_drop_upcycling_draws_distinct_neurons_per_expert() -> None:
    spec = _spec(init="drop-upcycling", reinit_ratio=0.5)
    assignment = neuron_assignment(spec, FW, 0)
    assert assignment.shape == (spec.num_chunks, H)
    for row in assignment:
        assert row.unique().numel() == H and 0 <= int(row.min()) and int(row.max()) < FW
    assert len({tuple(r.tolist()) for r in assignment}) == spec.num_chunks  # independent draws
    out = upcycle_ffn(*_dense(), spec=spec, layer=0)
    assert out.reinit_mask.sum(dim=1).tolist() == [reinit_count(0.5, H)] * spec.num_chunks
    assert torch.equal(out.source_neuron[~out.reinit_mask], assignment[~out.reinit_mask])


# ---------------------------------------------------------------------------------------------- virtual-group


def test_virtual_group_refuses_a_width_that_is_not_a_multiple() -> None:
    with pytest.raises(RecipeError, match=r"dense FFN width 50 .* expert size 8"):
        _spec(init="virtual-group", top_k=6).validate(50)
    with pytest.raises(RecipeError, match="top_k"):
        _spec(init="virtual-group", num_experts=12, top_k=4).validate(FW)


def test_virtual_group_weights_are_scaled_shards_with_shared_router_rows() -> None:
    gate, up, down = _dense()
    spec = _spec(init="virtual-group", num_experts=18, num_shared=2, top_k=6)
    out = upcycle_ffn(gate, up, down, spec=spec, layer=0)
    g = FW // H
    scale = g / (spec.top_k / spec.num_experts)
    for i in range(spec.num_experts):
        shard = slice((i % g) * H, (i % g + 1) * H)
        eg, eu, ed = _expert(out, i)
        assert torch.equal(eg, gate[shard]) and torch.equal(eu, up[shard])
        torch.testing.assert_close(ed, down[:, shard] * scale)
        assert torch.equal(out.router[i], out.router[(i // g) * g])  # one row per virtual group
    assert not torch.equal(out.router[0], out.router[g])
    assert torch.equal(out.shared_gate, gate[: 2 * H]) and not out.shared_down.any()
    assert not out.reinit_mask.any()


@torch.no_grad()
def test_virtual_group_with_a_zero_router_is_the_dense_ffn() -> None:
    # top_k == G == E: the router (zeroed) picks every expert with weight 1/E, i.e. one whole copy.
    gate, up, down = _dense()
    spec = _spec(init="virtual-group", num_experts=6, num_shared=0, top_k=6)
    out = upcycle_ffn(gate, up, down, spec=spec, layer=0)
    out.router.zero_()
    x = _inputs()
    y, _ = _moe_block(spec, out)(x)
    torch.testing.assert_close(y, _dense_mlp(gate, up, down)(x), atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("top_k", [6, 12])
def test_virtual_group_with_norm_topk_prob_picks_whole_copies_exactly(top_k: int) -> None:
    # Router rows are shared within a group, so top_k (a multiple of G) selects whole copies; renormalised
    # weights then sum to 1 over them: the dense output whatever the router says. Shared down is zero.
    gate, up, down = _dense()
    spec = _spec(init="virtual-group", num_experts=18, num_shared=2, top_k=top_k, norm_topk_prob=True, router_std=1.0)
    out = upcycle_ffn(gate, up, down, spec=spec, layer=0)
    x = _inputs()
    y, _ = _moe_block(spec, out)(x)
    torch.testing.assert_close(y, _dense_mlp(gate, up, down)(x), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_virtual_group_with_a_near_zero_router_is_near_the_dense_ffn() -> None:
    gate, up, down = _dense()
    spec = _spec(init="virtual-group", num_experts=18, num_shared=0, top_k=6, router_std=1e-4)
    out = upcycle_ffn(gate, up, down, spec=spec, layer=0)
    x = _inputs()
    y, _ = _moe_block(spec, out)(x)
    dense_y = _dense_mlp(gate, up, down)(x)
    assert float((y - dense_y).norm() / dense_y.norm()) < 1e-2


# ---------------------------------------------------------------------------------------------- preserve


@torch.no_grad()
@pytest.mark.parametrize("num_shared", [6, 7])  # 7: a shared width of 56 > 48, with padding neurons
def test_preserve_reproduces_the_dense_ffn(num_shared: int) -> None:
    gate, up, down = _dense()
    spec = _spec(init="preserve", num_shared=num_shared)
    out = upcycle_ffn(gate, up, down, spec=spec, layer=3)
    assert not out.shared_expert_gate.any() and not out.down.any()
    assert torch.equal(out.shared_gate[:FW], gate) and not out.shared_gate[FW:].any()
    x = _inputs()
    y, _ = _moe_block(spec, out)(x)
    torch.testing.assert_close(y, _dense_mlp(gate, up, down)(x), atol=1e-5, rtol=1e-5)
    # Routed gate/up are exactly qwen2's (same chunks, same re-init draws).
    qwen2 = upcycle_ffn(gate, up, down, spec=_spec(num_shared=num_shared), layer=3)
    assert torch.equal(out.gate_up, qwen2.gate_up)
    padding = out.source_neuron[:num_shared].reshape(-1)[FW:]
    assert (padding == -1).all()


def test_preserve_refuses_a_shared_expert_narrower_than_the_ffn() -> None:
    with pytest.raises(RecipeError, match=r"5 x 8 = 40.*\(48\)"):
        upcycle_ffn(*_dense(), spec=_spec(init="preserve", num_shared=5), layer=0)


# ---------------------------------------------------------------------------------------------- random


def test_random_init_shapes_and_std() -> None:
    hidden, width, h = 64, 256, 32
    spec = UpcycleSpec(num_experts=16, num_shared=2, expert_size=h, top_k=4, init="random", init_std=0.05)
    out = upcycle_ffn(*_dense(width, hidden), spec=spec, layer=0)
    assert out.gate_up.shape == (16, 2 * h, hidden) and out.down.shape == (16, hidden, h)
    assert out.shared_gate.shape == (2 * h, hidden) and out.shared_down.shape == (hidden, 2 * h)
    for t in (out.gate_up, out.down, out.shared_gate, out.shared_up, out.shared_down):
        _assert_std(t, 0.0, 0.05)
    _assert_std(out.router, 0.0, 0.02)
    assert (out.source_neuron == -1).all() and out.reinit_mask is None


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("changes", "width", "message"),
    [
        ({"num_experts": 0}, FW, "at least one routed expert"),
        ({"top_k": 9}, FW, r"top_k must be in 1..num_experts \(8\)"),
        ({"top_k": 0}, FW, "top_k"),
        ({"expert_size": 30000}, 18944, "expert size 30000 is larger than the dense FFN width 18944"),
        ({"expert_size": 0}, FW, "expert size must be positive"),
        ({"reinit_ratio": 1.5}, FW, r"reinit_ratio must be in \[0, 1\]"),
        ({"num_shared": -1}, FW, "num_shared"),
    ],
)
def test_validation_errors(changes: dict, width: int, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        _spec(**changes).validate(width)


def test_spec_accepts_strings_and_names_bad_choices() -> None:
    assert _spec(init="drop-upcycling").init is InitMethod.DROP_UPCYCLING
    with pytest.raises(RecipeError, match="'bogus' is not one of 'qwen2'"):
        _spec(init="bogus")


def test_dense_shapes_must_fit_a_swiglu_mlp() -> None:
    gate, up, down = _dense()
    with pytest.raises(RecipeError, match="down_proj"):
        upcycle_ffn(gate, up, down.T, spec=_spec(), layer=0)
