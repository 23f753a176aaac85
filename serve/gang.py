"""An expert-parallel model replica: a gang of EP ranks that run every step together.

Rank 0 is the Serve replica itself (it schedules and samples); ranks 1..R-1 are ``RankWorker`` actors in
bundles 1..R-1 of the replica's placement group, so Serve places and removes the gang as one unit. All ranks
join one torch.distributed group (gloo on CPU, NCCL on GPU). For each engine step rank 0 sends the same step
to every worker (actor calls run in submission order) and runs it itself; the MoE layers meet inside the step
in all-to-alls. If any rank dies, the collective fails or the worker's call raises: the engine fails, the
replica's health check fails, and Serve replaces the whole gang (its placement group and actors with it).

Shape legend: T tokens in the step (identical on every rank: attention is replicated), R ranks, D hidden.
"""

from __future__ import annotations

import dataclasses
import math
import socket
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from moe_core.all_to_all import AllToAllDispatcher
from moe_core.experts import Experts
from serve.engine import StepOutput
from serve.runner import ModelShard, ShardSpec

COLLECTIVE_TIMEOUT = timedelta(seconds=60)  # a rank that stops answering fails the step within a minute


class TokenShardDispatcher:
    """Every rank holds the same T tokens; rank r sends its 1/R share through the all-to-all, then all gather.

    So each token's experts run once in the gang (on the ranks that own them), not once per rank.
    """

    def __init__(self, group: Any, ep_size: int, ep_rank: int) -> None:
        self.inner = AllToAllDispatcher(group, ep_size)
        self.group, self.ep_size, self.ep_rank = group, ep_size, ep_rank

    def _share(self, num_tokens: int) -> tuple[int, int, int]:
        chunk = math.ceil(num_tokens / self.ep_size)
        lo = min(self.ep_rank * chunk, num_tokens)
        return chunk, lo, min(lo + chunk, num_tokens)

    def dispatch(
        self, x_TD: torch.Tensor, experts_TK: torch.Tensor, experts: Experts
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        num_tokens = x_TD.shape[0]
        _, lo, hi = self._share(num_tokens)
        x_local, counts, state = self.inner.dispatch(x_TD[lo:hi], experts_TK[lo:hi], experts)
        return x_local, counts, (state, num_tokens)

    def combine(self, y_local: torch.Tensor, state: Any, weights_TK: torch.Tensor) -> torch.Tensor:
        inner_state, num_tokens = state
        chunk, lo, hi = self._share(num_tokens)
        mine = self.inner.combine(y_local, inner_state, weights_TK[lo:hi])
        padded = mine.new_zeros(chunk, mine.shape[-1])
        padded[: hi - lo] = mine
        shares = [torch.empty_like(padded) for _ in range(self.ep_size)]
        dist.all_gather(shares, padded, group=self.group)
        return torch.cat(shares)[:num_tokens]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def join_gang(spec: ShardSpec, master: str) -> ModelShard:
    """Join the gang's process group and load this rank's shard with the token-sharding dispatcher."""
    backend = "nccl" if spec.device.startswith("cuda") else "gloo"
    dist.init_process_group(
        backend, init_method=master, rank=spec.ep_rank, world_size=spec.ep_size, timeout=COLLECTIVE_TIMEOUT
    )
    shard = ModelShard(spec)
    install_token_sharding(shard.model, dist.group.WORLD, spec.ep_size, spec.ep_rank)
    return shard


def install_token_sharding(model: Any, group: Any, ep_size: int, ep_rank: int) -> None:
    for moe in model.moe_layers():
        moe.dispatcher = TokenShardDispatcher(group, ep_size, ep_rank)


def set_threads_from_ray() -> None:
    """Use as many torch threads as CPUs Ray gave this process (oversubscribing cores slows every rank)."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))


class RankWorker:
    """Rank r ≥ 1 of a gang (a Ray actor; see ``remote_rank_worker``)."""

    def __init__(self, spec: ShardSpec, master: str) -> None:
        set_threads_from_ray()
        self.spec, self.master = spec, master
        self.shard: ModelShard | None = None

    def join(self) -> None:
        self.shard = join_gang(self.spec, self.master)

    def prefill(self, prompts: list[list[int]], slots: list[int]) -> None:
        assert self.shard is not None
        self.shard.prefill(prompts, slots)

    def decode(self, tokens: list[int], slots: list[int]) -> None:
        assert self.shard is not None
        self.shard.decode(tokens, slots)

    def ping(self) -> bool:
        return True


def remote_rank_worker() -> Any:
    """The ``RankWorker`` Ray actor class: steps run one at a time in order; pings answer even mid-step."""
    import ray

    return ray.remote(concurrency_groups={"control": 1}, max_restarts=0)(RankWorker)


class GangRunner:
    """Rank 0 of the gang: the engine's ``StepRunner``, mirroring each step to the worker ranks."""

    def __init__(self, spec: ShardSpec, gpus_per_rank: int) -> None:
        import ray
        from ray.util.placement_group import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        master = f"tcp://{ray.util.get_node_ip_address()}:{free_port()}"
        pg = get_current_placement_group()
        worker_cls = remote_rank_worker()
        self.workers = []
        for rank in range(1, spec.ep_size):
            strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank) if pg else None
            options: dict[str, Any] = {"num_cpus": 1, "num_gpus": gpus_per_rank}
            if strategy is not None:
                options["scheduling_strategy"] = strategy
            rank_spec = dataclasses.replace(spec, ep_rank=rank)
            self.workers.append(worker_cls.options(**options).remote(rank_spec, master))
        joins = [w.join.remote() for w in self.workers]
        self.shard = join_gang(spec, master)
        ray.get(joins)
        self.num_slots, self.max_seq_len = spec.num_slots, spec.max_seq_len

    def prefill(self, prompts: list[list[int]], slots: list[int], all_logits: list[bool] | None = None) -> StepOutput:
        # Only rank 0 samples, so only it returns the logits at every position; the workers' steps are the same.
        return self._mirror("prefill", prompts, slots, all_logits=all_logits)

    def decode(self, tokens: list[int], slots: list[int]) -> StepOutput:
        return self._mirror("decode", tokens, slots)

    def _mirror(self, op: str, *args: Any, **local: Any) -> StepOutput:
        """Run ``op(*args)`` on every rank; ``local`` keyword arguments go to rank 0's own shard only."""
        import ray

        pending = [getattr(w, op).remote(*args) for w in self.workers]
        out = getattr(self.shard, op)(*args, **local)
        ray.get(pending)
        return out

    def ping_workers(self, timeout_s: float) -> None:
        """Raise if any worker rank is dead or unresponsive."""
        import ray

        ray.get([w.ping.options(concurrency_group="control").remote() for w in self.workers], timeout=timeout_s)
