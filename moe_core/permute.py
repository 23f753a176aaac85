"""Token permutation for MoE dispatch, as pure functions.

Shape legend: T tokens, K experts per token (top-k), S = T·K routing slots, D hidden, E experts.
A slot s = t·K + k is token t's k-th choice. Sorting slots by expert makes each expert's tokens contiguous,
so the experts run as one grouped matmul; the inverse permutation puts results back in slot order, where
they are weighted and summed per token (a deterministic reduction: no atomics, no index_add).
"""

from __future__ import annotations

import torch


def expert_counts(expert_idx_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Slots per expert (int64).

    A scatter-add rather than ``bincount`` or a boolean mask, whose output sizes depend on the data: they have
    no shape on the meta device and need a device sync to size them."""
    flat = expert_idx_TK.reshape(-1)
    ones = torch.ones_like(flat)
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, ones)


def sort_slots_by_expert(expert_idx_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order_S, counts_E): slot indices in expert order (stable), and how many slots each expert got."""
    flat_S = expert_idx_TK.reshape(-1)
    order_S = torch.argsort(flat_S, stable=True)
    return order_S, expert_counts(flat_S, num_experts)


def inverse_permutation(order_S: torch.Tensor) -> torch.Tensor:
    inverse_S = torch.empty_like(order_S)
    inverse_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
    return inverse_S


def gather_slots(x_TD: torch.Tensor, order_S: torch.Tensor, top_k: int) -> torch.Tensor:
    """x_SD: the token of every slot, in expert order."""
    return x_TD.index_select(0, order_S // top_k)


def combine_slots(y_SD: torch.Tensor, order_S: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """out_TD = Σ_k weight[t, k] · y[slot(t, k)], with y given in expert order."""
    num_tokens, top_k = weights_TK.shape
    y_slot_order = y_SD.index_select(0, inverse_permutation(order_S))
    weighted = y_slot_order.view(num_tokens, top_k, y_SD.shape[-1]) * weights_TK.unsqueeze(-1).to(y_SD.dtype)
    # CUDA autocast runs sum in fp32: without the cast, bf16 experts would turn the residual stream fp32.
    return weighted.sum(dim=1).to(y_SD.dtype)


def counts_per_rank(counts_E: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """Slots bound for each rank when rank r owns the r-th contiguous block of E / num_ranks experts."""
    return counts_E.view(num_ranks, -1).sum(dim=1)
