"""Expert backends, the permutation functions, and the MoE block against transformers' Qwen2MoeSparseMoeBlock."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2MoeConfig
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

from moe_core.config import ModelConfig
from moe_core.experts import BackendUnavailable, ExpertBackend, Experts, default_backend
from moe_core.moe import MoE
from moe_core.permute import (
    combine_slots,
    counts_per_rank,
    gather_slots,
    inverse_permutation,
    sort_slots_by_expert,
)
from moe_core.registry import get_preset

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TOL = 1e-5
CFG = get_preset("debug-moe")  # 64 experts, top-8, expert width 32, shared 256, hidden 64


@torch.no_grad()
def _randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.copy_(std * torch.randn(p.shape, generator=g))


def _moe(backend: str, cfg: ModelConfig = CFG, seed: int = 0) -> MoE:
    moe = MoE(cfg, backend=backend)
    _randomize(moe, seed)
    return moe


def _starve_experts(moe: MoE, used: int) -> None:
    """Router rows: positive for experts < ``used``, negative for the rest, so with positive inputs only the
    first ``used`` experts can ever be in a token's top-k (the rest receive zero tokens)."""
    with torch.no_grad():
        w = moe.gate.weight
        w.copy_(w.abs())
        w[used:] *= -1


def _forward_backward(moe: MoE, x: torch.Tensor, seed: int = 3):
    x = x.clone().requires_grad_(True)
    y, routing = moe(x)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    (y * upstream).sum().backward()
    grads = {name: p.grad.clone() for name, p in moe.named_parameters()}
    return y.detach(), x.grad, grads, routing


def _inputs(shape, positive: bool = False, seed: int = 2) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return x.abs() + 0.1 if positive else x


CASES = {
    "batch": dict(shape=(2, 24, 64), starve=None),
    "single-token": dict(shape=(1, 1, 64), starve=None),
    "starved-experts": dict(shape=(2, 9, 64), starve=16),
    "single-token-starved": dict(shape=(1, 1, 64), starve=8),
}


def test_default_backend_is_grouped() -> None:
    assert default_backend() is ExpertBackend.GROUPED
    assert MoE(CFG).experts.backend is ExpertBackend.GROUPED


@pytest.mark.parametrize("case", list(CASES))
def test_grouped_equals_eager_forward_and_gradients(case: str) -> None:
    shape, starve = CASES[case]["shape"], CASES[case]["starve"]
    results = {}
    for backend in ("eager", "grouped"):
        moe = _moe(backend)
        assert moe.experts.backend is ExpertBackend(backend)
        if starve is not None:
            _starve_experts(moe, starve)
        results[backend] = _forward_backward(moe, _inputs(shape, positive=starve is not None))
    (y_e, gx_e, g_e, r_e), (y_g, gx_g, g_g, r_g) = results["eager"], results["grouped"]
    counts = torch.bincount(r_e.experts_TK.reshape(-1), minlength=CFG.num_experts)
    if starve is not None:
        assert counts[starve:].sum() == 0 and (counts == 0).any()
    assert torch.equal(r_e.experts_TK, r_g.experts_TK)
    assert (y_e - y_g).abs().max() <= TOL
    assert (gx_e - gx_g).abs().max() <= TOL
    assert g_e.keys() == g_g.keys()
    for name in g_e:
        assert (g_e[name] - g_g[name]).abs().max() <= TOL, name
    # Experts that got no token get exactly zero gradient (but a gradient: every parameter is in the graph).
    unused = (counts == 0).nonzero().flatten()
    for grads in (g_e, g_g):
        assert torch.all(grads["experts.gate_up_proj"][unused] == 0)
        assert torch.all(grads["experts.down_proj"][unused] == 0)
    used = (counts > 0).nonzero().flatten()
    assert g_g["experts.down_proj"][used].abs().amax(dim=(1, 2)).min() > 0


@pytest.mark.parametrize("backend", ["eager", "grouped"])
def test_experts_with_no_slots_keep_weights_in_graph(backend: str) -> None:
    experts = Experts(8, 16, 4, backend=backend)
    _randomize(experts)
    x = torch.zeros(0, 16, requires_grad=True)
    y = experts(x, torch.zeros(8, dtype=torch.long))
    assert y.shape == (0, 16)
    y.sum().backward()
    assert experts.gate_up_proj.grad is not None and experts.gate_up_proj.grad.abs().max() == 0
    assert experts.down_proj.grad is not None


@pytest.mark.parametrize("backend", ["eager", "grouped"])
def test_experts_compute_swiglu_per_expert(backend: str) -> None:
    experts = Experts(4, 8, 4, backend=backend)
    _randomize(experts, seed=1)
    counts = [2, 0, 3, 1]
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    y = experts(x, torch.tensor(counts))
    assert y.shape == (6, 8)
    start = 0
    for e, n in enumerate(counts):
        chunk = x[start : start + n]
        gate, up = experts.gate_up_proj[e][:4], experts.gate_up_proj[e][4:]
        want = (torch.nn.functional.silu(chunk @ gate.T) * (chunk @ up.T)) @ experts.down_proj[e].T
        assert torch.allclose(y[start : start + n], want, atol=TOL)
        start += n


def _eager_vs_grouped(hidden: int, width: int, counts: list[int], upstream: str) -> None:
    outs = {}
    for backend in ("eager", "grouped"):
        experts = Experts(len(counts), hidden, width, backend=backend)
        _randomize(experts, seed=1)
        x = torch.randn(sum(counts), hidden, generator=torch.Generator().manual_seed(0), requires_grad=True)
        y = experts(x, torch.tensor(counts))
        if upstream == "sum":
            y.sum().backward()  # the upstream gradient is an expanded (stride-0) tensor
        else:
            (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
        outs[backend] = (y.detach(), x.grad, experts.gate_up_proj.grad, experts.down_proj.grad)
    for a, b in zip(outs["eager"], outs["grouped"], strict=True):
        assert (a - b).abs().max() <= TOL


def test_grouped_backward_with_expanded_upstream_gradient() -> None:
    _eager_vs_grouped(hidden=64, width=32, counts=[2, 0, 3, 1], upstream="sum")


def test_grouped_with_expert_width_not_multiple_of_16_bytes() -> None:
    _eager_vs_grouped(hidden=64, width=6, counts=[2, 0, 3, 1], upstream="randn")


def test_grouped_with_aligned_small_shapes() -> None:
    _eager_vs_grouped(hidden=8, width=4, counts=[2, 0, 3, 1], upstream="randn")


def test_partial_experts_have_local_shapes() -> None:
    experts = Experts(64, 64, 32, first_expert=16, num_local=16)
    assert experts.gate_up_proj.shape == (16, 64, 64)
    assert experts.down_proj.shape == (16, 64, 32)
    assert experts.owned == range(16, 32)
    assert "16..31 of 64" in repr(experts)
    moe = MoE(CFG, first_expert=48, num_local_experts=16)
    assert moe.experts.gate_up_proj.shape == (16, 2 * 32, 64)
    assert moe.gate.weight.shape == (64, 64)  # the router always scores every expert
    # Default: from first_expert to the end.
    assert Experts(64, 8, 4, first_expert=60).num_local == 4
    for bad in (dict(first_expert=60, num_local=8), dict(first_expert=-1, num_local=2), dict(num_local=0)):
        with pytest.raises(ValueError):
            Experts(64, 8, 4, **bad)


def test_megablocks_on_cpu_is_unavailable() -> None:
    experts = Experts(4, 8, 4, backend="megablocks")
    _randomize(experts)
    with pytest.raises(BackendUnavailable, match="grouped"):
        experts(torch.randn(3, 8), torch.tensor([1, 1, 1, 0]))
    moe = _moe("megablocks")
    with pytest.raises(BackendUnavailable, match="grouped"):
        moe(torch.randn(1, 2, 64))


def test_set_backend_by_name() -> None:
    with pytest.raises(ValueError):
        Experts(4, 8, 4, backend="cutlass")


# ---------------------------------------------------------------------------------------------- permutation


def _routing(num_tokens: int, num_experts: int, top_k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(num_tokens)])


@pytest.mark.parametrize(("tokens", "experts", "top_k"), [(1, 8, 2), (13, 8, 3), (40, 64, 8), (5, 4, 4)])
def test_sort_slots_by_expert(tokens: int, experts: int, top_k: int) -> None:
    idx_TK = _routing(tokens, experts, top_k)
    order_S, counts_E = sort_slots_by_expert(idx_TK, experts)
    flat = idx_TK.reshape(-1)
    assert torch.equal(counts_E, torch.bincount(flat, minlength=experts))
    assert counts_E.shape == (experts,) and int(counts_E.sum()) == tokens * top_k
    sorted_experts = flat[order_S]
    assert torch.all(sorted_experts[1:] >= sorted_experts[:-1])
    # Stable: within one expert the slots keep token order.
    for e in range(experts):
        slots = order_S[sorted_experts == e]
        assert torch.all(slots[1:] > slots[:-1])
    assert torch.equal(counts_per_rank(counts_E, 2), counts_E.view(2, -1).sum(1))


@pytest.mark.parametrize("n", [0, 1, 7, 100])
def test_inverse_permutation(n: int) -> None:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    inverse = inverse_permutation(order)
    assert torch.equal(order[inverse], torch.arange(n))
    assert torch.equal(inverse[order], torch.arange(n))


def test_combine_of_gather_with_identity_experts_returns_input() -> None:
    tokens, experts, top_k = 11, 8, 3
    g = torch.Generator().manual_seed(0)
    x_TD = torch.randn(tokens, 5, generator=g)
    idx_TK = _routing(tokens, experts, top_k, seed=1)
    weights_TK = torch.softmax(torch.randn(tokens, top_k, generator=g), dim=-1)  # rows sum to 1
    order_S, counts_E = sort_slots_by_expert(idx_TK, experts)
    x_SD = gather_slots(x_TD, order_S, top_k)
    assert x_SD.shape == (tokens * top_k, 5)
    # In expert order, slot s holds the token order_S[s] // top_k.
    assert torch.equal(x_SD, x_TD[order_S // top_k])
    assert torch.allclose(combine_slots(x_SD, order_S, weights_TK), x_TD, atol=1e-6)
    # With per-slot outputs, combine weights and sums each token's own slots.
    y_SD = x_SD * (idx_TK.reshape(-1)[order_S] + 1)[:, None]  # "expert e multiplies by e + 1"
    want = (x_TD[:, None, :] * (idx_TK + 1)[:, :, None] * weights_TK[:, :, None]).sum(1)
    assert torch.allclose(combine_slots(y_SD, order_S, weights_TK), want, atol=1e-5)


# ---------------------------------------------------------------------------------------------- vs transformers


def _hf_block(cfg: ModelConfig) -> Qwen2MoeSparseMoeBlock:
    hf_dict = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("model_type", "architectures")}
    hf_config = Qwen2MoeConfig(**hf_dict)
    hf_config._experts_implementation = "eager"
    return Qwen2MoeSparseMoeBlock(hf_config).eval()


@pytest.mark.parametrize("backend", ["eager", "grouped"])
@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_moe_block_equals_transformers(backend: str, norm_topk_prob: bool) -> None:
    cfg = CFG.replace(norm_topk_prob=norm_topk_prob)
    ours = _moe(backend, cfg)
    hf = _hf_block(cfg)
    # Same parameter names and layouts: gate.weight [E, D], experts.gate_up_proj [E, 2F, D],
    # experts.down_proj [E, D, F], shared_expert.*, shared_expert_gate.weight [1, D].
    hf.load_state_dict(ours.state_dict(), strict=True)
    x = _inputs((2, 9, 64))
    with torch.no_grad():
        y, routing = ours(x)
        want = hf(x)
        hf_logits, hf_weights, hf_experts = hf.gate(x)
    assert (y - want).abs().max() <= TOL
    assert torch.equal(routing.experts_TK, hf_experts)
    assert (routing.weights_TK - hf_weights).abs().max() <= TOL
    assert (routing.logits_TE - hf_logits).abs().max() <= TOL
    if norm_topk_prob:
        assert torch.allclose(routing.weights_TK.sum(-1), torch.ones(18))
