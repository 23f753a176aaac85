"""The per-worker training loop that Ray Train runs on every rank.

Each rank loads only its own experts (lazy per-tensor reads), swaps in the all-to-all dispatcher, and trains
on its deterministic share of every global batch. The optimizer is AdamW with linear warm-up and cosine decay,
stepped by a ``Stepper`` (``optim``): plain PyTorch with gradients reduced as ``expert_parallel`` explains
(zero_stage 0) or DeepSpeed ZeRO 1/2 (``zero``). Every ``checkpoint_every`` steps, at the last step, and at the
step a stop was asked for (``stopping``), each rank writes its own shard (weights it holds, its optimizer state,
step) and all ranks report it together, so a restarted run continues from the latest checkpoint at the same data
position and a run's final weights are never lost. With eval blocks, every rank evaluates its share of them in
lockstep (the all-to-all needs every rank) every ``eval_every`` steps and at the end.
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moe_core.host_reads import any_true, floats
from moe_core.loading import load_model
from moe_core.losses import (
    global_load_balancing_loss,
    load_balancing_loss,
    pooled_stats,
    router_z_loss,
)
from moe_core.model import CausalLM, next_token_loss
from moe_core.moe import Routing
from moe_train import sharded_checkpoint
from moe_train.config import AuxLoss, TrainConfig, model_config_for
from moe_train.expert_parallel import ParallelLayout, ProcessGroups, build_process_groups, install_expert_parallel
from moe_train.optim import LossOutput, PlainStepper, Stepper
from moe_train.stopping import StopPoll
from moe_train.tracking import (
    Tracker,
    default_peak_flops,
    expert_load_metrics,
    load_heatmap_png,
    mfu,
    routing_counts,
)

RANK_FILE = "rank{rank}.pt"
META_FILE = "meta.json"


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine from lr down to min_lr_ratio·lr at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def worker_device(cfg: TrainConfig) -> torch.device:
    if cfg.gpus_per_worker > 0:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def build_rank_model(cfg: TrainConfig, rank: int, world: int) -> tuple[CausalLM, Any]:
    """This rank's model (its block of experts) and its process groups (None for a dense model)."""
    probe = model_config_for(cfg)
    groups, first, count = None, 0, None
    if probe.is_moe:
        layout = ParallelLayout(world_size=world, ep_size=cfg.ep, num_experts=probe.num_experts)
        groups = build_process_groups(layout)
        first, count = layout.first_expert(rank), layout.experts_per_rank
    if cfg.sharding == "fsdp":  # left on meta: FsdpStepper shards it first, then each rank reads only its shards
        with torch.device("meta"):
            model = CausalLM(probe, first_expert=first, num_local_experts=count)
    else:
        device = worker_device(cfg)
        model = load_model(cfg.model, device=device, first_expert=first, num_local_experts=count, config=probe)
    if groups is not None and groups.layout.ep_size > 1:
        install_expert_parallel(model, groups)
    return model.train(), groups


def global_aux_loss(routings: list[Routing]) -> torch.Tensor:
    """Load balance over the global batch: expert counts summed over every data-parallel rank first.

    With the ranks' gradients averaged afterwards this equals the Switch loss of the whole global batch, in
    value and gradient, however the batch is split across ranks.
    """
    stats = pooled_stats(routings)
    counts, tokens = stats.counts_E.clone(), stats.num_tokens.clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts)
        dist.all_reduce(tokens)
    return global_load_balancing_loss(routings, counts, tokens)


@torch.no_grad()
def update_selection_bias(model: CausalLM, counts_LE: torch.Tensor, rate: float) -> None:
    """Auxiliary-loss-free balancing (DeepSeek-V3): raise the selection bias of under-loaded experts by γ and
    lower over-loaded ones, from the global batch's counts, identically on every rank."""
    for moe, counts in zip(model.moe_layers(), counts_LE.float(), strict=True):
        moe.gate.selection_bias += rate * torch.sign(counts.mean() - counts)


def micro_batch_loss(model: CausalLM, ids: torch.Tensor, cfg: TrainConfig) -> LossOutput:
    device = next(model.parameters()).device
    ids = ids.to(device)
    # fp32 master weights; bf16 matmuls on GPU (the router softmax and losses stay fp32 by construction).
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = model(ids)
    lm = next_token_loss(out.logits, ids)
    # Parts stay on the device (detached): the step reads them on the host once, in mean_over_ranks.
    loss, parts = lm, {"lm_loss": lm.detach()}
    if out.routings and cfg.aux_loss is not AuxLoss.NONE:
        # From the routing the forward chose (selection_bias included), not a top-k redone from the logits.
        if cfg.aux_loss is AuxLoss.GLOBAL:
            aux = global_aux_loss(out.routings)
        else:
            aux = load_balancing_loss(out.routings)
        loss = loss + cfg.aux_coef * aux
        parts["aux_loss"] = aux.detach()
    if out.routings and cfg.z_loss_coef > 0:
        z = router_z_loss(out.router_logits)
        loss = loss + cfg.z_loss_coef * z
        parts["z_loss"] = z.detach()
    counts = routing_counts(out.routings, model.config.num_experts) if out.routings else None
    return loss, parts, counts


def mean_over_ranks(values: dict[str, torch.Tensor], world: int) -> dict[str, float]:
    """The global-batch mean of per-rank metrics (every rank holds the same number of tokens), read on the host
    in one go: one all-reduce on the compute device (NCCL takes no CPU tensors), one sync."""
    if not values:
        return {}
    keys = sorted(values)
    t = torch.stack([values[k].double() for k in keys])
    if world > 1:
        dist.all_reduce(t)
    return {k: v / world for k, v in zip(keys, floats(t), strict=True)}


def maybe_fail(spec: dict[str, Any] | None, step: int, rank: int) -> None:
    """Failure injection for the recovery test: kill this worker once, at (step, rank)."""
    if not spec or spec["step"] != step or spec["rank"] != rank:
        return
    marker = Path(spec["marker"])
    if marker.exists():
        return
    marker.write_text("failed once\n")
    os._exit(1)


def build_stepper(
    cfg: TrainConfig, model: CausalLM, groups: ProcessGroups | None, world: int, meshes: Any = None
) -> Stepper:
    """The optimizer path ``cfg.sharding`` names; ``meshes`` (FSDP's, built already) for the memory planner."""
    loss_fn = functools.partial(micro_batch_loss, cfg=cfg)
    if cfg.sharding == "fsdp":
        from moe_train.fsdp import FsdpStepper

        on_meta = next(model.parameters()).is_meta  # build_rank_model's, to be allocated on this worker's device
        return FsdpStepper(model, groups, cfg, world, loss_fn, meshes, device=worker_device(cfg) if on_meta else None)
    if cfg.zero_stage == 0:
        return PlainStepper(model, groups, cfg, world, loss_fn)
    from moe_train.zero import ZeroStepper  # imports DeepSpeed: only for runs that use it

    return ZeroStepper(model, groups, cfg, world, loss_fn)


def rank_checkpoint_state(stepper: Stepper, step: int, zero_stage: int) -> dict[str, Any]:
    """What one rank's checkpoint holds (the memory planner measures building it too): the sharded view for
    FSDP runs (``sharded_checkpoint``), this rank's whole state otherwise."""
    if hasattr(stepper, "sharded_state"):
        return stepper.sharded_state()[0]
    return {
        "model": stepper.model_state(),
        "optimizer": stepper.optimizer_state(),
        "zero_stage": zero_stage,
        "step": step,
        "rng": torch.get_rng_state(),
        # Not part of the HF checkpoint (Qwen2-MoE has no router bias), but part of the training state.
        "selection_bias": [moe.gate.selection_bias.clone() for moe in stepper.model.moe_layers()],
    }


def save_rank_checkpoint(directory: Path, rank: int, stepper: Stepper, step: int, zero_stage: int) -> None:
    if hasattr(stepper, "sharded_state"):
        sharded_checkpoint.save(directory, stepper, step)
    else:
        torch.save(rank_checkpoint_state(stepper, step, zero_stage), directory / RANK_FILE.format(rank=rank))
    if rank == 0:
        (directory / META_FILE).write_text(json.dumps({"step": step}))


def load_rank_checkpoint(directory: Path, rank: int, stepper: Stepper, zero_stage: int) -> int:
    sharded = sharded_checkpoint.is_sharded_checkpoint(directory)
    if sharded != hasattr(stepper, "sharded_state"):
        wrote, resume = ("--sharding fsdp", "other") if sharded else ("rank files", "--sharding fsdp")
        raise ValueError(f"the checkpoint was written by a {wrote} run; resume it with the same sharding, not {resume}")
    if sharded:
        return sharded_checkpoint.load(directory, stepper)
    state = torch.load(directory / RANK_FILE.format(rank=rank), weights_only=False)
    saved_stage = state.get("zero_stage", 0)
    if saved_stage != zero_stage:
        # The optimizer state's format differs (full AdamW state vs. this rank's ZeRO partition).
        raise ValueError(f"the checkpoint was written with --zero-stage {saved_stage}; resume with the same stage")
    stepper.load(state["model"], state["optimizer"])
    torch.set_rng_state(state["rng"])
    for moe, bias in zip(stepper.model.moe_layers(), state.get("selection_bias", []), strict=False):
        moe.gate.selection_bias.copy_(bias)
    return int(state["step"])


def accumulate_global_batch(
    stepper: Stepper, micro_batches: list[torch.Tensor]
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Forward and backward over this rank's micro-batches: mean loss parts and summed expert counts."""
    parts: dict[str, torch.Tensor] = {}
    counts_LE = None
    for i, ids in enumerate(micro_batches):
        _, p, counts = stepper.micro_step(ids, last=i == len(micro_batches) - 1)
        parts = {k: parts[k] + v / len(micro_batches) if k in parts else v / len(micro_batches) for k, v in p.items()}
        counts_LE = counts if counts_LE is None else counts_LE + counts
    return parts, counts_LE


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train

    from moe_train.data import rank_batches

    cfg = TrainConfig(**config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    model, groups = build_rank_model(cfg, rank, world)
    if cfg.expert_backend:
        model.set_expert_backend(cfg.expert_backend)
    model.activation_checkpointing = cfg.activation_checkpointing
    stepper = build_stepper(cfg, model, groups, world)
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            start = load_rank_checkpoint(Path(d), rank, stepper, cfg.zero_stage)
    blocks = torch.load(config["blocks_path"])
    eval_blocks = torch.load(config["eval_blocks_path"]) if config.get("eval_blocks_path") else None
    batches = rank_batches(
        blocks,
        dp_rank=rank,
        dp_size=world,
        micro_batch=cfg.micro_batch,
        grad_accum=cfg.grad_accum,
        seed=cfg.seed,
        start_step=start,
    )
    run_dir = Path(cfg.out)
    tracker = Tracker(run_dir, rank, cfg.as_dict(), project=cfg.wandb_project, mode=cfg.wandb_mode, resume_step=start)
    device = next(model.parameters()).device
    peak = cfg.peak_flops or default_peak_flops(device.type, torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        _train_steps(cfg, stepper, groups, batches, eval_blocks, tracker, start, rank, world, peak, config)
    finally:
        tracker.finish()


def _train_steps(
    cfg: TrainConfig,
    stepper: Stepper,
    groups: ProcessGroups | None,
    batches: Any,
    eval_blocks: torch.Tensor | None,
    tracker: Tracker,
    start: int,
    rank: int,
    world: int,
    peak: float,
    config: dict[str, Any],
) -> None:
    import ray.train
    from ray.train import Checkpoint

    run_dir = Path(cfg.out)
    model = stepper.model
    device = next(model.parameters()).device
    stop_poll = StopPoll(config["stop_flag"]) if rank == 0 and config.get("stop_flag") is not None else None
    for step in range(start, cfg.steps):
        maybe_fail(config.get("inject_failure"), step, rank)
        t0 = time.perf_counter()
        stepper.set_lr(lr_at(step, cfg))
        micro_batches = next(batches)
        parts, counts_LE = accumulate_global_batch(stepper, micro_batches)
        parts = mean_over_ranks(parts, world)
        if counts_LE is not None:
            if world > 1:
                dist.all_reduce(counts_LE)
            parts.update(expert_load_metrics(counts_LE.cpu()))  # one copy to the host, not one read per layer
            if cfg.aux_free_bias_rate > 0:
                update_selection_bias(model, counts_LE, cfg.aux_free_bias_rate)
        grad_norm = stepper.step()
        tokens = world * sum(ids.numel() for ids in micro_batches)
        step_seconds = time.perf_counter() - t0
        tokens_per_s = tokens / step_seconds
        comm_seconds = groups.comm.take() if groups is not None and groups.comm is not None else 0.0
        metrics = {
            "step": step + 1,
            "lr": lr_at(step, cfg),
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu(tokens_per_s, model.config, cfg.seq_len, peak, num_devices=world),
            "step_seconds": step_seconds,
            "all_to_all_share": comm_seconds / step_seconds,
            **parts,
        }
        last = step + 1 == cfg.steps
        stopping = not last and stop_requested(stop_poll, world, device)
        if eval_blocks is not None and (last or stopping or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
            metrics["eval_loss"] = held_out_loss(model, eval_blocks, cfg.micro_batch, rank, world)
        tracker.log(metrics, step + 1)
        if counts_LE is not None and rank == 0 and cfg.heatmap_every and (step + 1) % cfg.heatmap_every == 0:
            png = load_heatmap_png(counts_LE, run_dir / "heatmaps" / f"load-{step + 1:06d}.png")
            tracker.log_image("load/heatmap", png, step + 1)
        if last or stopping or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0):
            with tempfile.TemporaryDirectory() as tmp:
                save_rank_checkpoint(Path(tmp), rank, stepper, step + 1, cfg.zero_stage)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        # Not every step otherwise: Ray Train V2 hands reports to its controller, which polls workers every ~2 s, so
        # a report per step made a 60 ms step take 2 s. Metrics go to metrics.jsonl and W&B every step anyway;
        # every rank still reports the same number of times.
        if stopping:
            return


def stop_requested(poll: StopPoll | None, world: int, device: torch.device) -> bool:
    """Whether the driver asked to stop (``stopping``): rank 0 (the one with ``poll``) looks, all get its answer."""
    asked = torch.tensor([float(poll is not None and poll.asked_now())], device=device)
    if world > 1:
        dist.all_reduce(asked)  # on the compute device: NCCL takes no CPU tensors
    return any_true(asked > 0)


@torch.no_grad()
def held_out_loss(model: CausalLM, blocks: torch.Tensor, micro_batch: int, rank: int, world: int) -> float:
    """Mean next-token loss over every eval block, each rank on its own share, the same for any world size.

    Every rank runs the same number of forwards (an expert-parallel forward is a collective), so a rank whose
    share is one block short runs block 0 in its place and leaves it out of the loss.
    """
    device = next(model.parameters()).device
    per_rank = -(-len(blocks) // world)
    index = torch.arange(rank * per_rank, (rank + 1) * per_rank)
    real = index < len(blocks)
    mine = blocks[torch.where(real, index, 0)]
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # summed per-block mean loss, blocks
    for ids, keep in zip(mine.split(micro_batch), real.to(device).split(micro_batch), strict=True):
        ids = ids.to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(ids).logits
        per_block = next_token_loss(logits, ids, per_row=True).double()
        weight = keep.double()  # a weight, not a mask: no host sync, and the same work on every rank
        total += torch.stack([(per_block * weight).sum(), weight.sum()])
    model.train(was_training)
    if world > 1:
        dist.all_reduce(total)
    return floats(total[0] / total[1])[0]
