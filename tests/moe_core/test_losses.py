"""MoE losses and routing statistics, with transformers' load_balancing_loss_func as the oracle.

The losses read the ``Routing`` the router returned; ``_route`` gets it from the real ``Router`` for given logits
(an identity router weight makes the inputs its logits), so the selection under test is the forward's own.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

from moe_core.losses import (
    global_load_balancing_loss,
    load_balancing_loss,
    load_stats,
    pooled_stats,
    router_z_loss,
    routing_stats,
    switch_loss,
)
from moe_core.moe import Router, Routing
from moe_core.permute import expert_counts

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TOL = 1e-5


def _logits(layers: int, tokens: int, experts: int, seed: int = 0, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(tokens, experts, generator=g) for _ in range(layers)]


def _route(logits_TE: torch.Tensor, top_k: int, bias_E: torch.Tensor | None = None) -> Routing:
    """The router's routing of tokens whose router logits are ``logits_TE`` (gradients flow to the logits)."""
    experts = logits_TE.shape[-1]
    router = Router(experts, experts, top_k, norm_topk_prob=False).to(logits_TE.dtype)
    with torch.no_grad():
        router.weight.copy_(torch.eye(experts))
        if bias_E is not None:
            router.selection_bias.copy_(bias_E)
    router.weight.requires_grad_(False)
    routing = router(logits_TE)
    assert torch.equal(routing.logits_TE, logits_TE)
    return routing


def _routings(logits: list[torch.Tensor], top_k: int) -> list[Routing]:
    return [_route(x, top_k) for x in logits]


@pytest.mark.parametrize(
    ("layers", "batch", "seq", "experts", "top_k"),
    [(1, 1, 7, 8, 2), (3, 2, 15, 64, 8), (4, 3, 10, 60, 4), (2, 1, 1, 4, 4)],
)
def test_load_balancing_loss_equals_transformers(layers, batch, seq, experts, top_k) -> None:
    logits = _logits(layers, batch * seq, experts, scale=2.0)
    ours = load_balancing_loss(_routings(logits, top_k))
    theirs = load_balancing_loss_func(tuple(logits), experts, top_k)
    assert abs(ours.item() - theirs.item()) <= TOL


@pytest.mark.parametrize(("layers", "batch", "seq", "experts", "top_k"), [(1, 2, 9, 8, 2), (3, 3, 12, 64, 8)])
def test_load_balancing_loss_with_attention_mask_equals_transformers(layers, batch, seq, experts, top_k) -> None:
    logits = _logits(layers, batch * seq, experts, seed=1, scale=2.0)
    g = torch.Generator().manual_seed(2)
    mask_BS = (torch.rand(batch, seq, generator=g) > 0.4).long()
    mask_BS[:, 0] = 1
    ours = load_balancing_loss(_routings(logits, top_k), mask_BS.reshape(-1))
    theirs = load_balancing_loss_func(tuple(logits), experts, top_k, mask_BS)
    assert abs(ours.item() - theirs.item()) <= TOL
    # Masking is the same as dropping the padded rows.
    keep = mask_BS.reshape(-1).bool()
    assert abs(ours.item() - load_balancing_loss(_routings([x[keep] for x in logits], top_k)).item()) <= TOL
    # And it differs from the unmasked loss (the mask matters).
    assert abs(ours.item() - load_balancing_loss(_routings(logits, top_k)).item()) > 1e-4


@pytest.mark.parametrize(("experts", "top_k"), [(8, 1), (8, 2), (64, 8)])
def test_uniform_router_gives_top_k(experts: int, top_k: int) -> None:
    logits = [torch.zeros(12, experts), torch.full((12, experts), 3.0)]
    assert load_balancing_loss(_routings(logits, top_k)).item() == pytest.approx(top_k, abs=1e-6)
    # Any perfectly balanced assignment with uniform probabilities gives top_k too.
    assert load_balancing_loss_func(tuple(logits), experts, top_k).item() == pytest.approx(top_k, abs=1e-6)


def test_collapsed_router_gives_num_experts() -> None:
    """All tokens to the same top_k experts with probability ~1/top_k each: loss = E · Σ f·P -> E."""
    logits = torch.full((10, 16), -30.0)
    logits[:, :2] = 30.0
    assert load_balancing_loss([_route(logits, 2)]).item() == pytest.approx(16.0, rel=1e-5)


def test_load_balancing_loss_needs_a_layer() -> None:
    with pytest.raises(ValueError, match="at least one"):
        load_balancing_loss([])


def test_global_loss_with_one_rank_equals_local() -> None:
    routings = _routings(_logits(3, 20, 16, seed=3), 4)
    stats = pooled_stats(routings)
    local = load_balancing_loss(routings)
    glob = global_load_balancing_loss(routings, stats.counts_E, stats.num_tokens)
    assert abs(glob.item() - local.item()) <= TOL
    assert abs(switch_loss(stats).item() - local.item()) <= TOL


def test_global_loss_over_two_simulated_ranks() -> None:
    """Ranks with equal token counts: the mean of the per-rank global losses is the loss of the whole batch."""
    top_k, experts = 4, 16
    rank_logits = [_logits(2, 12, experts, seed=10 + r, scale=2.0) for r in range(2)]
    rank_routings = [_routings(logits, top_k) for logits in rank_logits]
    stats = [pooled_stats(routings) for routings in rank_routings]
    counts = stats[0].counts_E + stats[1].counts_E  # what an all-reduce(SUM) gives
    num_tokens = stats[0].num_tokens + stats[1].num_tokens
    per_rank = [global_load_balancing_loss(routings, counts, num_tokens) for routings in rank_routings]
    whole = load_balancing_loss(
        _routings([torch.cat([rank_logits[0][layer], rank_logits[1][layer]]) for layer in range(2)], top_k)
    )
    assert abs(((per_rank[0] + per_rank[1]) / 2).item() - whole.item()) <= TOL
    # Each rank's value differs from its local loss: f comes from the global batch.
    local0 = load_balancing_loss(rank_routings[0])
    assert abs(per_rank[0].item() - local0.item()) > 1e-4
    # Identical ranks: global == local.
    same = global_load_balancing_loss(rank_routings[0], 2 * stats[0].counts_E, 2 * stats[0].num_tokens)
    assert abs(same.item() - local0.item()) <= TOL
    # global_num_tokens may be a plain number.
    as_float = global_load_balancing_loss(rank_routings[0], counts, float(num_tokens))
    assert abs(as_float.item() - per_rank[0].item()) <= TOL


def _mean_probs_loss(logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """E · Σ_e f_e P_e with f a constant: the function whose gradient the loss must have."""
    experts = logits[0].shape[1]
    probs = torch.cat([torch.softmax(x, dim=-1) for x in logits])
    chosen = torch.cat([torch.topk(torch.softmax(x, -1), top_k, dim=-1).indices for x in logits])
    f = torch.bincount(chosen.reshape(-1), minlength=experts).float() / probs.shape[0]
    return experts * (f * probs.mean(0)).sum()


def test_gradient_flows_only_through_probabilities() -> None:
    base = _logits(2, 9, 8, seed=4, scale=1.5)
    a = [x.clone().requires_grad_(True) for x in base]
    b = [x.clone().requires_grad_(True) for x in base]
    load_balancing_loss(_routings(a, 2)).backward()
    _mean_probs_loss(b, 2).backward()
    for ga, gb in zip(a, b, strict=True):
        assert ga.grad is not None and ga.grad.abs().max() > 0
        assert torch.allclose(ga.grad, gb.grad, atol=1e-6)
    # Global variant: the (all-reduced) counts get no gradient, the local probabilities do.
    c = [x.clone().requires_grad_(True) for x in base]
    stats = pooled_stats(_routings([x.detach() for x in base], 2))
    counts = stats.counts_E.clone().requires_grad_(True)
    global_load_balancing_loss(_routings(c, 2), counts, stats.num_tokens).backward()
    assert counts.grad is None
    for gc, gb in zip(c, b, strict=True):
        assert torch.allclose(gc.grad, gb.grad, atol=1e-6)
    # The statistics' counts are plain numbers.
    assert not routing_stats(_route(a[0], 2)).counts_E.requires_grad
    assert routing_stats(_route(a[0], 2)).prob_sum_E.requires_grad


def test_routing_stats_values() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    stats = routing_stats(_route(logits, 1), mask_T=torch.tensor([1, 0]))
    assert stats.counts_E.tolist() == [1.0, 0.0, 0.0]
    assert stats.num_tokens.item() == 1.0
    assert torch.allclose(stats.prob_sum_E, torch.softmax(logits[0], -1))
    both = routing_stats(_route(logits, 2))
    assert both.counts_E.tolist() == [1.0, 2.0, 1.0] and both.num_tokens.item() == 2.0
    assert pooled_stats(_routings([logits, logits], 2)).counts_E.tolist() == [2.0, 4.0, 2.0]
    # A bf16 router still gives fp32 probabilities, hence fp32 statistics.
    assert routing_stats(_route(logits.bfloat16(), 1)).prob_sum_E.dtype == torch.float32


def test_statistics_follow_the_biased_selection_and_the_unbiased_probabilities() -> None:
    """Aux-loss-free balancing (DeepSeek-V3): the selection bias changes which experts run, not their probabilities.

    So f_e (the counts) must count the experts the forward selected, and P_e average the unbiased softmax.
    """
    top_k, experts, tokens = 2, 8, 24
    logits = _logits(1, tokens, experts, seed=7, scale=2.0)[0]
    probs = torch.softmax(logits, -1)
    # Favour the two experts the router likes least: a bias of 1 beats any probability, so every token now
    # selects exactly them, which the plain top-k of the probabilities does not.
    least = probs.mean(0).argsort()[:top_k]
    bias = torch.zeros(experts)
    bias[least] = 1.0
    biased, plain = _route(logits, top_k, bias), _route(logits, top_k)
    assert biased.experts_TK.sort(-1).values.tolist() == [sorted(least.tolist())] * tokens
    assert not torch.equal(biased.experts_TK.sort(-1).values, plain.experts_TK.sort(-1).values)
    assert torch.equal(biased.probs_TE, plain.probs_TE)  # the bias leaves the probabilities alone
    assert torch.allclose(biased.probs_TE, probs, atol=1e-6)

    stats = routing_stats(biased)
    want_counts = torch.zeros(experts)
    want_counts[least] = tokens
    assert stats.counts_E.tolist() == want_counts.tolist()
    assert torch.allclose(stats.prob_sum_E, probs.sum(0), atol=1e-5)  # P_e from the unbiased probabilities

    # E · Σ f·P with f = 1 for each favoured expert (0 elsewhere) and the unbiased mean probabilities.
    want = experts * probs.mean(0)[least].sum()
    loss = load_balancing_loss([biased])
    assert abs(loss.item() - want.item()) <= TOL
    # Not what a top-k redone from the logits gives (transformers' value, and the unbiased routing's).
    theirs = load_balancing_loss_func((logits,), experts, top_k)
    assert abs(load_balancing_loss([plain]).item() - theirs.item()) <= TOL
    assert loss.item() < theirs.item() - 0.1
    pooled = pooled_stats([biased])
    assert abs(global_load_balancing_loss([biased], pooled.counts_E, pooled.num_tokens).item() - want.item()) <= TOL

    # The gradient is that of E · Σ f·P with the biased f held constant, through the unbiased softmax.
    x, y = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    load_balancing_loss([_route(x, top_k, bias)]).backward()
    (experts * (want_counts / tokens * torch.softmax(y, -1).mean(0)).sum()).backward()
    assert x.grad is not None and torch.allclose(x.grad, y.grad, atol=1e-6)

    # A small bias moves only some tokens' selection; the counts are still those of the chosen experts.
    nudge = torch.zeros(experts)
    nudge[least[0]] = 0.05
    nudged = _route(logits, top_k, nudge)
    assert not torch.equal(nudged.experts_TK, plain.experts_TK)
    assert torch.equal(routing_stats(nudged).counts_E.long(), expert_counts(nudged.experts_TK, experts))
    assert torch.equal(nudged.experts_TK, torch.topk(probs + nudge, top_k, dim=-1).indices)


def test_router_z_loss_known_values() -> None:
    e = 8
    zeros = torch.zeros(5, e)  # logsumexp = ln 8
    shifted = torch.full((3, e), 2.0)  # logsumexp = 2 + ln 8
    assert router_z_loss([zeros]).item() == pytest.approx(math.log(e) ** 2, rel=1e-6)
    expected = (math.log(e) ** 2 + (2 + math.log(e)) ** 2) / 2  # averaged over layers
    assert router_z_loss([zeros, shifted]).item() == pytest.approx(expected, rel=1e-6)
    one_hot = torch.tensor([[0.0, math.log(3.0)]])  # logsumexp = ln 4
    assert router_z_loss([one_hot]).item() == pytest.approx(math.log(4.0) ** 2, rel=1e-6)
    x = torch.randn(4, e, generator=torch.Generator().manual_seed(0), requires_grad=True)
    router_z_loss([x]).backward()
    assert x.grad is not None and x.grad.abs().max() > 0


def test_load_stats_balanced() -> None:
    stats = load_stats(torch.full((8,), 5))
    assert stats["cv"] == pytest.approx(0.0)
    assert stats["max_over_mean"] == pytest.approx(1.0)
    assert stats["dead_experts"] == 0
    assert stats["tokens"] == 40
    assert "router_entropy" not in stats


def test_load_stats_one_dead_expert() -> None:
    counts = torch.tensor([0, 2, 2, 2, 2, 2, 2, 4])
    stats = load_stats(counts)
    assert stats["dead_experts"] == 1
    assert stats["max_over_mean"] == pytest.approx(4 / 2)
    mean = 2.0
    std = math.sqrt(sum((c - mean) ** 2 for c in counts.tolist()) / 8)
    assert stats["cv"] == pytest.approx(std / mean)


def test_load_stats_entropy() -> None:
    e = 16
    uniform = torch.full((5, e), 1.0 / e)
    stats = load_stats(torch.full((e,), 3), uniform)
    assert stats["router_entropy"] == pytest.approx(math.log(e))
    assert stats["router_entropy_max"] == pytest.approx(math.log(e))
    peaked = torch.zeros(5, e)
    peaked[:, 0] = 1.0
    assert load_stats(torch.full((e,), 3), peaked)["router_entropy"] == pytest.approx(0.0, abs=1e-12)


def test_load_stats_no_tokens() -> None:
    stats = load_stats(torch.zeros(4, dtype=torch.long))
    assert stats == {"max_over_mean": 0.0, "cv": 0.0, "dead_experts": 4, "tokens": 0}


def test_expert_counts() -> None:
    idx = torch.tensor([[0, 3], [3, 1], [0, 3]])
    assert expert_counts(idx, 5).tolist() == [2, 1, 0, 3, 0]


def test_host_reads_of_logged_numbers() -> None:
    from moe_core.host_reads import floats

    assert floats(torch.tensor(2.5)) == [2.5]  # 0-d: a list all the same
    assert floats(torch.tensor([[1.0], [2.0]])) == [1.0, 2.0]
    nan = floats(torch.empty(3, device="meta"))
    assert len(nan) == 3 and all(v != v for v in nan)
