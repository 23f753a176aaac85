"""Dropless all-to-all token dispatch across an expert-parallel group, as a ``moe_core.moe`` dispatcher.

Shape legend: T local tokens, K top-k, S = T·K local slots, D hidden, E experts, R = EP ranks,
E_l = E / R experts per rank; rank r owns experts [r·E_l, (r+1)·E_l).

Forward of one MoE layer on every rank of an EP group:
    route -> sort slots by expert (= by destination rank) -> all_to_all the per-expert counts
    -> all_to_all_single the tokens (uneven splits, autograd) -> regroup received tokens by local expert
    -> grouped expert compute -> undo the regrouping -> reverse all_to_all -> unsort, weight and sum.

It uses torch.distributed only (no Ray, no launcher): training (``moe_train``) and serving (``serve``) both
install it from outside, so the model code is unchanged with EP on or off.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moe_core.experts import Experts
from moe_core.host_reads import split_sizes
from moe_core.permute import combine_slots, counts_per_rank, gather_slots, inverse_permutation, sort_slots_by_expert


class CommTimer:
    """Wall time spent inside all-to-all calls (forward and backward), for the step-time breakdown."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def _exchange(x: torch.Tensor, recv: list[int], send: list[int], group: Any, timer: CommTimer) -> torch.Tensor:
    out = x.new_empty(sum(recv), *x.shape[1:])
    start = time.perf_counter()
    dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
    timer.seconds += time.perf_counter() - start
    return out


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits whose backward is the reverse exchange; both are timed."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, recv: list[int], send: list[int], group: Any, timer: CommTimer
    ) -> torch.Tensor:
        ctx.recv, ctx.send, ctx.group, ctx.timer = recv, send, group, timer
        return _exchange(x, recv, send, group, timer)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return _exchange(grad, ctx.send, ctx.recv, ctx.group, ctx.timer), None, None, None, None


@dataclass
class _DispatchState:
    order_S: torch.Tensor  # local slots in expert order
    send_R: list[int]  # slots sent to each EP rank
    recv_R: list[int]  # slots received from each EP rank
    regroup: torch.Tensor  # received rows -> grouped by local expert


class AllToAllDispatcher:
    """Dropless token dispatch across an EP group with uneven splits; differentiable end to end."""

    def __init__(self, group: Any, ep_size: int, timer: CommTimer | None = None) -> None:
        self.group = group
        self.ep_size = ep_size
        self.timer = timer or CommTimer()

    def dispatch(
        self, x_TD: torch.Tensor, experts_TK: torch.Tensor, experts: Experts
    ) -> tuple[torch.Tensor, torch.Tensor, _DispatchState]:
        order_S, counts_E = sort_slots_by_expert(experts_TK, experts.num_experts)
        x_SD = gather_slots(x_TD, order_S, experts_TK.shape[1])
        # How many slots this rank sends to each (rank, local expert); the transpose of it arrives here.
        send_RE = counts_E.view(self.ep_size, -1).contiguous()
        recv_RE = torch.empty_like(send_RE)
        dist.all_to_all_single(recv_RE, send_RE, group=self.group)
        # The only host reads of the dispatch: the split sizes all_to_all_single needs (one sync each).
        send_R = split_sizes(counts_per_rank(counts_E, self.ep_size), total=x_SD.shape[0])
        recv_R = split_sizes(recv_RE.sum(dim=1), total=x_SD.shape[0])
        x_recv = _AllToAll.apply(x_SD, recv_R, send_R, self.group, self.timer)
        # Received rows are grouped by source rank, then local expert; the experts want them by expert.
        source_of_row = torch.repeat_interleave(
            torch.arange(recv_RE.numel(), device=recv_RE.device), recv_RE.reshape(-1), output_size=sum(recv_R)
        )
        expert_of_row = source_of_row % recv_RE.shape[1]
        regroup = torch.argsort(expert_of_row, stable=True)
        state = _DispatchState(order_S, send_R, recv_R, regroup)
        return x_recv.index_select(0, regroup), recv_RE.sum(dim=0), state

    def combine(self, y_local: torch.Tensor, state: _DispatchState, weights_TK: torch.Tensor) -> torch.Tensor:
        y_recv = y_local.index_select(0, inverse_permutation(state.regroup))
        y_SD = _AllToAll.apply(y_recv, state.send_R, state.recv_R, self.group, self.timer)
        return combine_slots(y_SD, state.order_S, weights_TK)
