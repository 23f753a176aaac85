"""The Qwen2-MoE sparse block: fp32 softmax router, top-k, routed experts, gated shared expert. Dropless.

Shape legend: B batch, T tokens (B·seq flattened), D hidden, E experts, K top-k, S = T·K slots.

    p_TE = softmax(W_g x) in fp32;  (w_TK, idx_TK) = top-k of p (renormalised iff norm_topk_prob)
    y = Σ_k w_k · E_{idx_k}(x) + sigmoid(w_s · x) · Shared(x)

How slots reach the experts is the dispatcher's job: ``LocalDispatcher`` permutes on one device; expert
parallelism swaps in an all-to-all dispatcher from outside, so this forward reads the same with EP on or off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moe_core.config import ModelConfig
from moe_core.experts import ExpertBackend, Experts
from moe_core.layers import MLP
from moe_core.permute import combine_slots, gather_slots, sort_slots_by_expert


@dataclass
class Routing:
    """One MoE layer's routing as its forward chose it: what the losses and load metrics read, never recompute.

    ``experts_TK`` is the selection the experts actually ran (top-k of probs + ``selection_bias``), while
    ``probs_TE`` stays the unbiased softmax: with a nonzero bias, top-k of ``probs_TE`` need not be ``experts_TK``.
    """

    logits_TE: torch.Tensor  # raw router logits, input dtype (router z-loss, parity with transformers)
    probs_TE: torch.Tensor  # softmax over all experts, fp32, unbiased, with gradient (the Switch loss's P_e)
    weights_TK: torch.Tensor  # combine weights, input dtype
    experts_TK: torch.Tensor  # chosen expert ids (long), bias included (the Switch loss's f_e, expert counts)


class Router(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        # Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias that changes which experts are
        # selected but not their weights. Zero unless a trainer updates it; not part of the HF checkpoint.
        self.register_buffer("selection_bias", torch.zeros(num_experts), persistent=False)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = F.linear(x_TD, self.weight)
        probs_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
        # Select on probs + bias (a zero bias selects exactly the plain top-k) and weight by the probs, with no
        # data-dependent branch: checking whether the bias is zero would cost a device sync per layer.
        _, experts_TK = torch.topk(probs_TE + self.selection_bias.float(), self.top_k, dim=-1)
        weights_TK = probs_TE.gather(-1, experts_TK)
        if self.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return Routing(logits_TE, probs_TE, weights_TK.to(logits_TE.dtype), experts_TK)


class Dispatcher(Protocol):
    """Moves slots to the experts that own them and brings the results back."""

    def dispatch(
        self, x_TD: torch.Tensor, experts_TK: torch.Tensor, experts: Experts
    ) -> tuple[torch.Tensor, torch.Tensor, Any]: ...

    def combine(self, y_SD: torch.Tensor, state: Any, weights_TK: torch.Tensor) -> torch.Tensor: ...


class LocalDispatcher:
    """All experts on this device: sort slots by expert, run, unsort and weight."""

    def dispatch(
        self, x_TD: torch.Tensor, experts_TK: torch.Tensor, experts: Experts
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        order_S, counts_E = sort_slots_by_expert(experts_TK, experts.num_experts)
        return gather_slots(x_TD, order_S, experts_TK.shape[1]), counts_E, order_S

    def combine(self, y_SD: torch.Tensor, order_S: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        return combine_slots(y_SD, order_S, weights_TK)


class MoE(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        *,
        first_expert: int = 0,
        num_local_experts: int | None = None,
        backend: ExpertBackend | str | None = None,
    ) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.gate = Router(d, cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob)
        self.experts = Experts(
            cfg.num_experts,
            d,
            cfg.moe_intermediate_size,
            first_expert=first_expert,
            num_local=num_local_experts,
            backend=backend,
        )
        self.shared_expert = (
            MLP(d, cfg.shared_expert_intermediate_size) if cfg.shared_expert_intermediate_size else None
        )
        self.shared_expert_gate = nn.Linear(d, 1, bias=False) if self.shared_expert is not None else None
        self.dispatcher: Dispatcher = LocalDispatcher()

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        x_TD = x_BTD.reshape(-1, x_BTD.shape[-1])
        routing = self.gate(x_TD)
        x_SD, counts, state = self.dispatcher.dispatch(x_TD, routing.experts_TK, self.experts)
        y_SD = self.experts(x_SD, counts)
        out_TD = self.dispatcher.combine(y_SD, state, routing.weights_TK)
        if self.shared_expert is not None:
            out_TD = out_TD + torch.sigmoid(self.shared_expert_gate(x_TD)) * self.shared_expert(x_TD)
        return out_TD.view_as(x_BTD), routing
