"""The driver side of ``upmoe train``: prepare data, validate, and run Ray Train's TorchTrainer.

RUN_DIR holds ``data/blocks.pt`` (the packed token blocks every worker reads; ``data/eval_blocks.pt`` with
``--eval-data``), ``metrics.jsonl`` (one line per step, rank 0), ``loss.png`` and ``ray/`` (Ray Train's storage:
checkpoints; the last step's is always there). Re-running the same command with the same RUN_DIR continues from
the latest checkpoint. SIGTERM / Ctrl-C stops after the current step, checkpointed (``stopping``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from moe_core.params import count_parameters
from moe_train.config import TrainConfig, model_config_for
from moe_train.expert_parallel import ParallelLayout
from moe_train.tracking import read_metrics, sync_hint, write_loss_curve

RUN_NAME = "upmoe-train"


def validate_before_start(cfg: TrainConfig) -> None:
    """Everything that can be wrong with the inputs, checked before any worker starts."""
    model_dir = Path(cfg.model)
    model_cfg = model_config_for(cfg)
    if not any(model_dir.glob("*.safetensors")):
        raise ValueError(f"--model {model_dir} has no *.safetensors weights")
    if cfg.seq_len > model_cfg.max_position_embeddings:
        raise ValueError(
            f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings ({model_cfg.max_position_embeddings})"
        )
    if model_cfg.is_moe:
        ParallelLayout(world_size=cfg.workers, ep_size=cfg.ep, num_experts=model_cfg.num_experts)
    elif cfg.ep != 1:
        raise ValueError(f"--ep {cfg.ep} needs a MoE model; {model_dir} is dense")


def check_memory_plan(cfg: TrainConfig) -> None:
    """GPU runs: plan rank 0's memory (``moe_train.plan``) and refuse a layout that would not fit, naming one that
    does where the plan finds it (activation checkpointing, then FSDP2 with it)."""
    from moe_train.plan import plan_training

    if cfg.gpus_per_worker == 0 or not cfg.plan_check:
        return
    if cfg.sharding not in ("none", "fsdp"):
        print(f"memory plan: not run for --sharding {cfg.sharding} (DeepSpeed cannot run on fake tensors)")
        return
    plan = plan_training(cfg, gpu_memory_gib=cfg.gpu_memory_gib)
    if plan.fits:
        print(f"memory plan: {plan.peak_gib_per_rank:.1f} GiB per rank of {cfg.gpu_memory_gib:g} GiB (fits)")
        return
    message = f"this layout does not fit {cfg.gpu_memory_gib:g} GiB GPUs:\n{plan.table()}"
    for change in ({"activation_checkpointing": True}, {"sharding": "fsdp", "activation_checkpointing": True}):
        if all(getattr(cfg, k) == v for k, v in change.items()):
            continue
        other = plan_training(dataclasses.replace(cfg, zero_stage=None, **change), gpu_memory_gib=cfg.gpu_memory_gib)
        if other.fits:
            flags = " ".join(_flag(k, v) for k, v in change.items())
            raise ValueError(f"{message}\nwith {flags} it would: {other.peak_gib_per_rank:.1f} GiB per rank")
    raise ValueError(f"{message}\nadd workers (more expert-parallel or data-parallel ranks) or shorten --seq-len")


def _flag(key: str, value: object) -> str:
    name = "--" + key.replace("_", "-")
    return name if value is True else f"{name} {value}"


def prepare_blocks(cfg: TrainConfig) -> tuple[Path, Path | None]:
    """Tokenise and pack on the driver; the training blocks' path and the eval blocks' (None without eval data)."""
    from moe_train.data import build_blocks

    blocks = build_blocks(cfg.data, cfg.model, cfg.seq_len, eval_spec=cfg.eval_data)
    data_dir = Path(cfg.out) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    torch.save(blocks.train, data_dir / "blocks.pt")
    if blocks.eval is None:
        return data_dir / "blocks.pt", None
    torch.save(blocks.eval, data_dir / "eval_blocks.pt")
    return data_dir / "blocks.pt", data_dir / "eval_blocks.pt"


def run_training(cfg: TrainConfig, *, inject_failure: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train; ``inject_failure`` ({"step", "rank", "marker"}) kills one worker once, for recovery tests."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from moe_train.loop import train_loop_per_worker
    from moe_train.stopping import start_stop_flag, stop_on_signal

    validate_before_start(cfg)
    check_memory_plan(cfg)
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg.out = str(out)
    (out / "train_config.json").write_text(json.dumps(cfg.as_dict(), indent=2) + "\n")
    if not ray.is_initialized():  # before Ray Data, which would otherwise start a local Ray of its own
        ray.init(address=cfg.ray_address, log_to_driver=False, configure_logging=False)
    blocks_path, eval_path = prepare_blocks(cfg)
    stop_flag = start_stop_flag()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": cfg.as_dict(),
            "blocks_path": str(blocks_path),
            "eval_blocks_path": str(eval_path) if eval_path else None,
            "stop_flag": stop_flag,
            "inject_failure": inject_failure,
        },
        # PACK keeps consecutive ranks (one EP group) on one node where they fit.
        scaling_config=ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.gpus_per_worker > 0, placement_strategy="PACK"
        ),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=str(out / "ray"),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    try:
        with stop_on_signal(stop_flag):
            result = trainer.fit()
    finally:
        ray.kill(stop_flag)
    metrics = read_metrics(out / "metrics.jsonl")
    write_loss_curve(out / "metrics.jsonl", out / "loss.png")
    hint = sync_hint(out)
    if hint:
        print(f"W&B ran offline; upload with: {hint}")
    model_cfg = model_config_for(cfg)
    last = metrics[-1]
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    return {
        "final_loss": last.get("lm_loss"),
        "eval_loss": evals[-1] if evals else None,
        "steps": last["step"],
        "stopped_early": last["step"] < cfg.steps,
        "tokens": cfg.workers * cfg.micro_batch * cfg.grad_accum * cfg.seq_len * last["step"],
        "tokens_per_s": sum(m["tokens_per_s"] for m in metrics[-5:]) / len(metrics[-5:]),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "params_activated": count_parameters(model_cfg).activated,
    }
