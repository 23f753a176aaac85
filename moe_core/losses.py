"""MoE losses and routing statistics as pure functions: values in, values out, no global lists.

Shape legend: T tokens, E experts, K top-k.

Switch / HF load-balancing loss: ``E · Σ_e f_e · P_e`` where f_e is the fraction of top-k slots per token
routed to e (Σ_e f_e = K) and P_e the mean router probability. It equals K at perfect balance. Like
transformers' ``load_balancing_loss_func``, the statistics of all layers are pooled before the product.
The global-batch variant takes f from counts already summed over a data-parallel group (the Qwen team's
later finding: balance over the global batch, not each micro-batch, lets experts specialise).

The statistics read the ``Routing`` each MoE layer's forward returned rather than redoing softmax and top-k
from the logits: f_e counts the experts the forward selected (with the aux-loss-free ``selection_bias``, not
the plain top-k of the probabilities), P_e averages its unbiased fp32 probabilities. With a zero bias this is
exactly transformers' loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from moe_core.moe import Routing


@dataclass
class RoutingStats:
    """Sufficient statistics of one or more layers' routing for the load-balancing loss."""

    counts_E: torch.Tensor  # top-k assignments per expert (float, no grad)
    prob_sum_E: torch.Tensor  # Σ_t p_te (fp32, carries the gradient)
    num_tokens: torch.Tensor  # rows counted (fp32 scalar)

    def __add__(self, other: RoutingStats) -> RoutingStats:
        return RoutingStats(
            self.counts_E + other.counts_E,
            self.prob_sum_E + other.prob_sum_E,
            self.num_tokens + other.num_tokens,
        )


def routing_stats(routing: Routing, mask_T: torch.Tensor | None = None) -> RoutingStats:
    """Statistics of one layer's routing; ``mask_T`` (1 = real token) excludes padding.

    Counts come from the experts the forward selected, probability sums from its unbiased probabilities.
    """
    probs_TE, experts_TK = routing.probs_TE.float(), routing.experts_TK
    weight_T = torch.ones(probs_TE.shape[0], device=probs_TE.device) if mask_T is None else mask_T.float()
    counts_E = torch.zeros(probs_TE.shape[1], device=probs_TE.device).scatter_add_(
        0, experts_TK.reshape(-1), weight_T.repeat_interleave(experts_TK.shape[1])
    )
    return RoutingStats(counts_E, (probs_TE * weight_T[:, None]).sum(0), weight_T.sum())


def pooled_stats(routings: Sequence[Routing], mask_T: torch.Tensor | None = None) -> RoutingStats:
    """The statistics of every MoE layer of one forward, summed (``mask_T`` applies to each layer alike)."""
    if not routings:
        raise ValueError("the load-balancing statistics need the routing of at least one MoE layer")
    stats = [routing_stats(routing, mask_T) for routing in routings]
    total = stats[0]
    for s in stats[1:]:
        total = total + s
    return total


def switch_loss(stats: RoutingStats) -> torch.Tensor:
    num_experts = stats.counts_E.shape[0]
    f_E = stats.counts_E / stats.num_tokens
    p_E = stats.prob_sum_E / stats.num_tokens
    return num_experts * torch.sum(f_E * p_E)


def load_balancing_loss(routings: Sequence[Routing], mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """The Switch/HF loss of the per-layer routings of one forward (transformers' value when the bias is zero)."""
    return switch_loss(pooled_stats(routings, mask_T))


def global_load_balancing_loss(
    routings: Sequence[Routing],
    global_counts_E: torch.Tensor,
    global_num_tokens: torch.Tensor | float,
) -> torch.Tensor:
    """Global-batch variant: f from counts summed over the data-parallel group, P from this rank (grad).

    ``global_counts_E``/``global_num_tokens`` are ``pooled_stats(...).counts_E``/``.num_tokens`` all-reduced
    (summed) over the group by the caller, which keeps this function free of any process-group code.
    """
    local = pooled_stats(routings)
    num_experts = local.counts_E.shape[0]
    f_E = global_counts_E.float() / torch.as_tensor(global_num_tokens, dtype=torch.float32)
    p_E = local.prob_sum_E / local.num_tokens
    return num_experts * torch.sum(f_E.detach() * p_E)


def router_z_loss(logits_per_layer: list[torch.Tensor]) -> torch.Tensor:
    """ST-MoE's z-loss: mean over tokens of logsumexp(logits)², averaged over layers."""
    per_layer = [torch.logsumexp(logits.float(), dim=-1).square().mean() for logits in logits_per_layer]
    return torch.stack(per_layer).mean()


def load_stats(counts_E: torch.Tensor, router_probs_TE: torch.Tensor | None = None) -> dict[str, float]:
    """Per-layer load summary: max/mean, coefficient of variation, dead experts, mean router entropy.

    ``max_over_mean`` is 1 and ``cv`` 0 at perfect balance; entropy is ln E for a uniform router.
    """
    counts = counts_E.double()
    mean = counts.mean()
    out = {
        "max_over_mean": float(counts.max() / mean) if mean > 0 else 0.0,
        "cv": float(counts.std(unbiased=False) / mean) if mean > 0 else 0.0,
        "dead_experts": int((counts_E == 0).sum()),
        "tokens": int(counts.sum()),
    }
    if router_probs_TE is not None:
        p = router_probs_TE.double().clamp_min(1e-30)
        out["router_entropy"] = float(-(p * p.log()).sum(-1).mean())
        out["router_entropy_max"] = math.log(router_probs_TE.shape[-1])
    return out
