"""Per-rank serving memory: ``upmoe serve --plan``, and how many KV-cache blocks a rank gets.

A rank of a replica holds its weights (attention, the shared expert and embeddings whole; its block of routed
experts), the KV cache (attention is replicated, so every rank caches every KV head of every sequence), and one
step's activations, which the token budget (``--max-num-batched-tokens``) bounds. The plan measures the last
by running the real step, not a formula: rank 0's shard is built on fake CUDA tensors (``moe_core.fake_devices``)
in a fake process group of the EP size, with the token-sharding dispatcher, and one step at the budget runs
through it while torch's ``MemTracker`` counts every tensor (the training planner's approach,
``moe_train.plan``). The step is the worst one the scheduler makes: one decode token for each of the other
running sequences at full context, and a prefill chunk filling the rest of the budget at the end of a
full-context prompt. What is left of the device after weights, activations and the headroom is KV cache.

Assumed: routing spread evenly over the experts (``moe_core.host_reads``) and a 10 % headroom for what the
tracker cannot see (CUDA context, NCCL buffers, allocator fragmentation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._tools.mem_tracker import MemTracker

from moe_core.config import ModelConfig
from moe_core.fake_devices import fake_cuda, fake_world, materialise, meta_model
from moe_core.kv_cache import DEFAULT_BLOCK_SIZE, StepRow, blocks_for, bytes_per_block
from moe_core.state_dict_adapter import expert_block
from serve.options import ServeOptions

GIB = 2**30
CPU_DEFAULT_CAP_BYTES = 2 * GIB
PLAN_SEQ_LEN = 4096  # the sequence length the plan counts concurrent sequences of
HEADROOM = 0.10


@dataclass
class ServingPlan:
    model: str
    ep: int
    dtype: str
    gpu_memory_gib: float
    headroom: float
    max_num_batched_tokens: int
    max_num_seqs: int
    context: int  # tokens per sequence the activation step attends over
    rank_params: int
    weights_gib: float
    activations_gib: float  # the step's peak above weights and cache
    kv_block_bytes: int
    kv_blocks: int
    kv_gib: float
    seq_len: int

    @property
    def budget_gib(self) -> float:
        return self.gpu_memory_gib * (1 - self.headroom)

    @property
    def sequences_that_fit(self) -> int:
        return self.kv_blocks // blocks_for(self.seq_len, DEFAULT_BLOCK_SIZE)

    @property
    def fits(self) -> bool:
        return self.kv_blocks >= blocks_for(self.seq_len, DEFAULT_BLOCK_SIZE)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sequences_that_fit": self.sequences_that_fit, "fits": self.fits}

    def table(self) -> str:
        per_seq = blocks_for(self.seq_len, DEFAULT_BLOCK_SIZE) * self.kv_block_bytes / GIB
        rows = [
            ("weights", f"{self.weights_gib:9.2f} GiB", f"{self.rank_params / 1e9:.2f} B parameters, {self.dtype}"),
            (
                "activation peak",
                f"{self.activations_gib:9.2f} GiB",
                f"one step of {self.max_num_batched_tokens} tokens at {self.context} context",
            ),
            (
                "KV cache",
                f"{self.kv_gib:9.2f} GiB",
                f"{self.kv_blocks:,} blocks of {DEFAULT_BLOCK_SIZE} tokens, {self.kv_block_bytes // 1024:,} KiB each",
            ),
            (
                f"{self.seq_len:,}-token sequences",
                f"{self.sequences_that_fit:9,d}",
                f"{per_seq * 1024:,.0f} MiB of KV each",
            ),
        ]
        head = (
            f"{self.model}: rank 0 of an EP {self.ep} replica on a {self.gpu_memory_gib:g} GiB GPU, "
            f"{self.headroom:.0%} headroom (budget {self.budget_gib:.1f} GiB), --max-batch-size {self.max_num_seqs}"
        )
        lines = [head] + [f"  {name:<24} {value:>13}   {note}" for name, value, note in rows]
        if not self.fits:
            lines.append(f"  does NOT fit: no room for one {self.seq_len}-token sequence")
        return "\n".join(lines)


def plan_serving(
    cfg: ModelConfig,
    *,
    name: str,
    ep: int,
    dtype: torch.dtype = torch.bfloat16,
    gpu_memory_gib: float = 80.0,
    headroom: float = HEADROOM,
    max_num_batched_tokens: int = 2048,
    max_num_seqs: int = 16,
    context: int = PLAN_SEQ_LEN,
    seq_len: int = PLAN_SEQ_LEN,
) -> ServingPlan:
    model = meta_model(cfg, dtype, 0, expert_block(cfg.num_experts, ep, 0)[1] if cfg.is_moe else None)
    params = sum(p.numel() for p in model.parameters())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    activations = _step_peak_bytes(model, cfg, ep, dtype, max_num_batched_tokens, max_num_seqs, context)
    per_block = bytes_per_block(cfg, DEFAULT_BLOCK_SIZE, dtype)
    left = gpu_memory_gib * (1 - headroom) * GIB - weights - activations
    blocks = max(0, int(left // per_block))
    return ServingPlan(
        model=name,
        ep=ep,
        dtype=str(dtype).removeprefix("torch."),
        gpu_memory_gib=gpu_memory_gib,
        headroom=headroom,
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs,
        context=context,
        rank_params=params,
        weights_gib=weights / GIB,
        activations_gib=activations / GIB,
        kv_block_bytes=per_block,
        kv_blocks=blocks,
        kv_gib=blocks * per_block / GIB,
        seq_len=seq_len,
    )


def worst_step(budget: int, num_seqs: int, context: int) -> list[tuple[int, int]]:
    """(new tokens, cached tokens) per row of the largest step: a decode token for each other sequence at full
    context, and a prefill chunk with the rest of the budget ending at full context."""
    decodes = min(num_seqs - 1, budget - 1)
    chunk = min(budget - decodes, context)
    return [(1, context - 1)] * decodes + [(chunk, context - chunk)]


def _step_peak_bytes(
    model: Any, cfg: ModelConfig, ep: int, dtype: torch.dtype, budget: int, num_seqs: int, context: int
) -> int:
    """Bytes the step allocates at its peak beyond the weights and the cache, measured on fake CUDA."""
    from serve.gang import install_token_sharding
    from serve.runner import ModelShard, ShardSpec

    shape = worst_step(budget, num_seqs, context)
    per_seq = blocks_for(context, DEFAULT_BLOCK_SIZE)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(shape))]
    spec = ShardSpec("plan", per_seq * len(shape), context, dtype, "cuda:0", ep_rank=0, ep_size=ep)
    with fake_world(ep), fake_cuda():
        shard = ModelShard(spec, model=materialise(model, spec.device))
        if ep > 1:
            install_token_sharding(shard.model, dist.group.WORLD, ep, 0)
        rows = [StepRow([1] * new, cached, tables[i]) for i, (new, cached) in enumerate(shape)]
        return step_activation_bytes(shard, rows)


def step_activation_bytes(shard: Any, rows: list[StepRow]) -> int:
    """Bytes one ``shard.step(rows)`` allocates at its peak beyond the weights and the KV cache, counted by
    ``MemTracker`` (on fake or real tensors alike)."""
    tracker = MemTracker()
    # The cache is written in place inside the step: tracked up front (as "other"), it is not an activation.
    tracker.track_external(shard.model, shard.cache.k, shard.cache.v)
    with tracker:
        shard.step(rows)
    peak = tracker.get_tracker_snapshot("peak")
    kept = {"PARAM", "BUFFER", "OTH", "Total"}  # what was there before the step
    kinds = [(getattr(kind, "name", str(kind)), n) for by_kind in peak.values() for kind, n in by_kind.items()]
    return sum(n for kind, n in kinds if kind not in kept)


def kv_cache_blocks(cfg: ModelConfig, opts: ServeOptions, dtype: torch.dtype, max_seq_len: int) -> int:
    """Blocks per rank: --kv-cache-gib if given; by default on GPU what the plan leaves of this device, on CPU
    room for --max-batch-size full-context sequences (at most 2 GiB). Never less than one full-context sequence."""
    per_block = bytes_per_block(cfg, DEFAULT_BLOCK_SIZE, dtype)
    one_sequence = blocks_for(max_seq_len, DEFAULT_BLOCK_SIZE)
    if opts.kv_cache_gib is not None:
        blocks = int(opts.kv_cache_gib * GIB // per_block)
        what = f"--kv-cache-gib {opts.kv_cache_gib:g}"
    elif opts.gpus_per_rank:
        plan = plan_serving(
            cfg,
            name=opts.model_name or "model",
            ep=opts.ep,
            dtype=dtype,
            gpu_memory_gib=torch.cuda.get_device_properties(0).total_memory / GIB,
            max_num_batched_tokens=opts.max_num_batched_tokens,
            max_num_seqs=opts.max_batch_size,
            context=max_seq_len,
            seq_len=max_seq_len,
        )
        blocks, what = plan.kv_blocks, "what the GPU has left after weights and activations"
    else:
        return max(one_sequence, min(opts.max_batch_size * one_sequence, CPU_DEFAULT_CAP_BYTES // per_block))
    if blocks < one_sequence:
        raise ValueError(
            f"{what} holds {blocks} KV blocks; one sequence of the serving context ({max_seq_len} tokens) needs "
            f"{one_sequence} ({one_sequence * per_block / GIB:.3f} GiB): lower --max-seq-len or add memory"
        )
    return blocks
