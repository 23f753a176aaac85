"""Expert parallelism for training: process-group layout, installing the all-to-all dispatcher, gradients.

World = DP × EP; which experts a rank owns is ``moe_core.state_dict_adapter``'s rule (contiguous blocks). The
dispatcher itself (``moe_core.all_to_all``) is shared with serving; ``install_expert_parallel`` swaps it into
each MoE block, so the model code is unchanged.

Gradient scaling (docs/design.md §6): with each rank's loss a mean over its own tokens and the global loss their
mean over the W data-parallel ranks, a non-expert gradient is the mean over W of the ranks' gradients, and
an expert's gradient — already summed over its EP group by the all-to-all's backward — is summed over its
expert-data-parallel group (the ranks holding the same experts) and divided by W.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moe_core.all_to_all import AllToAllDispatcher, CommTimer
from moe_core.host_reads import floats
from moe_core.model import CausalLM
from moe_core.moe import MoE
from moe_core.state_dict_adapter import ExpertSplitError, check_expert_split, expert_block, is_expert_param


class ParallelLayoutError(ValueError):
    """EP does not fit the world size or the expert count."""


@dataclass(frozen=True)
class ParallelLayout:
    """World = DP × EP with EP groups of consecutive ranks (so an EP group stays inside a node first)."""

    world_size: int
    ep_size: int
    num_experts: int

    def __post_init__(self) -> None:
        if self.ep_size < 1 or self.world_size % self.ep_size:
            raise ParallelLayoutError(f"EP size {self.ep_size} must divide the world size {self.world_size}")
        try:
            check_expert_split(self.num_experts, self.ep_size)
        except ExpertSplitError as e:
            raise ParallelLayoutError(str(e)) from None

    @property
    def experts_per_rank(self) -> int:
        return expert_block(self.num_experts, self.ep_size, 0)[1]

    def ep_group_ranks(self, rank: int) -> list[int]:
        start = rank // self.ep_size * self.ep_size
        return list(range(start, start + self.ep_size))

    def expert_dp_group_ranks(self, rank: int) -> list[int]:
        """Ranks holding the same experts as ``rank`` (same position in their EP groups)."""
        return list(range(rank % self.ep_size, self.world_size, self.ep_size))

    def first_expert(self, rank: int) -> int:
        return expert_block(self.num_experts, self.ep_size, rank % self.ep_size)[0]


@dataclass
class ProcessGroups:
    layout: ParallelLayout
    rank: int
    ep: Any  # the EP group this rank belongs to
    expert_dp: Any  # the ranks sharing this rank's experts
    comm: CommTimer | None = None  # set by install_expert_parallel

    @property
    def ep_rank(self) -> int:
        return self.rank % self.layout.ep_size


def build_process_groups(layout: ParallelLayout) -> ProcessGroups:
    """Create every EP and expert-DP group (collective: all ranks call this in the same order)."""
    rank = dist.get_rank()
    ep_groups = {}
    for start in range(0, layout.world_size, layout.ep_size):
        ranks = list(range(start, start + layout.ep_size))
        ep_groups[tuple(ranks)] = dist.new_group(ranks)
    dp_groups = {}
    for first in range(layout.ep_size):
        ranks = list(range(first, layout.world_size, layout.ep_size))
        dp_groups[tuple(ranks)] = dist.new_group(ranks)
    return ProcessGroups(
        layout=layout,
        rank=rank,
        ep=ep_groups[tuple(layout.ep_group_ranks(rank))],
        expert_dp=dp_groups[tuple(layout.expert_dp_group_ranks(rank))],
    )


def install_expert_parallel(model: CausalLM, groups: ProcessGroups) -> CommTimer:
    """Point every MoE block at the all-to-all dispatcher (the model must own this rank's experts).

    Returns the timer all the dispatchers share.
    """
    timer = CommTimer()
    first = groups.layout.first_expert(groups.rank)
    for moe in model.moe_layers():
        assert isinstance(moe, MoE)
        if moe.experts.first_expert != first or moe.experts.num_local != groups.layout.experts_per_rank:
            raise ParallelLayoutError(
                f"rank {groups.rank} must own experts {first}..{first + groups.layout.experts_per_rank - 1}; "
                f"the model owns {moe.experts.first_expert}..{moe.experts.first_expert + moe.experts.num_local - 1}"
            )
        moe.dispatcher = AllToAllDispatcher(groups.ep, groups.layout.ep_size, timer)
    groups.comm = timer
    return timer


@torch.no_grad()
def reduce_gradients(model: torch.nn.Module, groups: ProcessGroups) -> None:
    """Average gradients for a global loss = mean of the ranks' losses (see the module docstring)."""
    world = groups.layout.world_size
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if is_expert_param(name):
            if groups.layout.world_size > groups.layout.ep_size:
                dist.all_reduce(p.grad, group=groups.expert_dp)
        else:
            dist.all_reduce(p.grad)
        p.grad.div_(world)


@torch.no_grad()
def clip_gradients(model: torch.nn.Module, groups: ProcessGroups | None, max_norm: float) -> float:
    """Clip to a global norm that counts every expert once: the same value on every rank and as with EP=1.

    Non-expert gradients are identical on all ranks after reduction; expert gradients differ per EP rank, so
    their squared norms are summed over the EP group.
    """
    device = next(model.parameters()).device  # the sums and their all-reduce stay on the compute device
    dense_sq = torch.zeros((), dtype=torch.float64, device=device)
    expert_sq = torch.zeros((), dtype=torch.float64, device=device)
    grads = []
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        grads.append(p.grad)
        sq = p.grad.double().pow(2).sum()
        if is_expert_param(name):
            expert_sq += sq
        else:
            dense_sq += sq
    if groups is not None and groups.layout.ep_size > 1:
        dist.all_reduce(expert_sq, group=groups.ep)
    norm = floats((dense_sq + expert_sq).sqrt().reshape(1))[0]
    if max_norm > 0 and norm > max_norm:
        for g in grads:
            g.mul_(max_norm / (norm + 1e-6))
    return norm
