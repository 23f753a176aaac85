"""MoE losses and routing statistics as pure functions: values in, values out, no global lists.

Shape legend: T tokens, E experts, K top-k.

Switch / HF load-balancing loss: ``E · Σ_e f_e · P_e`` where f_e is the fraction of top-k slots per token
routed to e (Σ_e f_e = K) and P_e the mean router probability. It equals K at perfect balance. Like
transformers' ``load_balancing_loss_func``, the statistics of all layers are pooled before the product.
The global-batch variant takes f from counts already summed over a data-parallel group (the Qwen team's
later finding: balance over the global batch, not each micro-batch, lets experts specialise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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


def routing_stats(logits_TE: torch.Tensor, top_k: int, mask_T: torch.Tensor | None = None) -> RoutingStats:
    """Statistics of one layer from raw router logits; ``mask_T`` (1 = real token) excludes padding."""
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    experts_TK = torch.topk(probs_TE, top_k, dim=-1).indices
    weight_T = torch.ones(probs_TE.shape[0], device=probs_TE.device) if mask_T is None else mask_T.float()
    counts_E = torch.zeros(probs_TE.shape[1], device=probs_TE.device).scatter_add_(
        0, experts_TK.reshape(-1), weight_T.repeat_interleave(top_k)
    )
    return RoutingStats(counts_E, (probs_TE * weight_T[:, None]).sum(0), weight_T.sum())


def pooled_stats(logits_per_layer: list[torch.Tensor], top_k: int, mask_T: torch.Tensor | None = None) -> RoutingStats:
    stats = [routing_stats(logits, top_k, mask_T) for logits in logits_per_layer]
    total = stats[0]
    for s in stats[1:]:
        total = total + s
    return total


def switch_loss(stats: RoutingStats) -> torch.Tensor:
    num_experts = stats.counts_E.shape[0]
    f_E = stats.counts_E / stats.num_tokens
    p_E = stats.prob_sum_E / stats.num_tokens
    return num_experts * torch.sum(f_E * p_E)


def load_balancing_loss(
    logits_per_layer: list[torch.Tensor], top_k: int, mask_T: torch.Tensor | None = None
) -> torch.Tensor:
    """The Switch/HF loss from raw per-layer router logits [T, E] (same value as transformers')."""
    if not logits_per_layer:
        raise ValueError("load_balancing_loss needs the router logits of at least one MoE layer")
    return switch_loss(pooled_stats(logits_per_layer, top_k, mask_T))


def global_load_balancing_loss(
    logits_per_layer: list[torch.Tensor],
    top_k: int,
    global_counts_E: torch.Tensor,
    global_num_tokens: torch.Tensor | float,
) -> torch.Tensor:
    """Global-batch variant: f from counts summed over the data-parallel group, P from this rank (grad).

    ``global_counts_E``/``global_num_tokens`` are ``pooled_stats(...).counts_E``/``.num_tokens`` all-reduced
    (summed) over the group by the caller, which keeps this function free of any process-group code.
    """
    local = pooled_stats(logits_per_layer, top_k)
    num_experts = local.counts_E.shape[0]
    f_E = global_counts_E.float() / torch.as_tensor(global_num_tokens, dtype=torch.float32)
    p_E = local.prob_sum_E / local.num_tokens
    return num_experts * torch.sum(f_E.detach() * p_E)


def router_z_loss(logits_per_layer: list[torch.Tensor]) -> torch.Tensor:
    """ST-MoE's z-loss: mean over tokens of logsumexp(logits)², averaged over layers."""
    per_layer = [torch.logsumexp(logits.float(), dim=-1).square().mean() for logits in logits_per_layer]
    return torch.stack(per_layer).mean()


def expert_counts(experts_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert from the chosen expert ids of one layer."""
    return torch.bincount(experts_TK.reshape(-1), minlength=num_experts)


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
