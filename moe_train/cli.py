"""``upmoe train`` and ``upmoe export``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moe_train.config import SHARDINGS, ZERO_STAGES, AuxLoss, load_train_config


def configure(name: str, p: argparse.ArgumentParser) -> None:
    {"train": _configure_train, "export": _configure_export}[name](p)


def run(name: str, args: argparse.Namespace) -> int:
    return {"train": run_train, "export": run_export}[name](args)


def _configure_train(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Continue pretraining a qwen2 / qwen2_moe checkpoint with Ray Train: expert parallelism over --ep ranks "
        "(all-to-all dispatch), load-balancing loss, AdamW or DeepSpeed ZeRO 1/2, checkpoints in RUN_DIR. "
        "Re-running the same command "
        "continues from the latest checkpoint. Options can also come from --config train.yaml (flags win)."
    )
    p.add_argument("--model", help="HF model directory to start from")
    p.add_argument(
        "--data",
        help="PATH[,PATH...]: text, jsonl (a text field) or parquet files, dirs, globs; "
        "'embedded' for the built-in corpus",
    )
    p.add_argument("--out", help="RUN_DIR: metrics.jsonl, loss.png, checkpoints")
    p.add_argument("--config", type=Path, help="YAML file with any of these options")
    p.add_argument(
        "--preset", choices=["long-context"], help="long-context: seq 32768, rope_theta 1e6 (Qwen2's second stage)"
    )
    p.add_argument("--rope-theta", type=float, help="override the model's rope_theta (kept in exports)")
    p.add_argument("--max-position-embeddings", type=int, help="override the model's context length")
    p.add_argument(
        "--eval-data",
        help="held-out data (same forms as --data): its mean next-token loss is logged as eval_loss at the end "
        "(and every --eval-every steps) to metrics.jsonl, W&B and loss.png",
    )
    p.add_argument("--eval-every", type=int, help="steps between held-out evaluations (default 0: only at the end)")
    p.add_argument("--workers", type=int, help="training workers (default 1)")
    p.add_argument("--ep", type=int, help="expert-parallel size; must divide --workers and the expert count")
    p.add_argument("--gpus-per-worker", type=int, choices=[0, 1], help="1 on GPU clusters")
    p.add_argument("--steps", type=int, help="optimizer steps (default 100)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 4096)")
    p.add_argument("--micro-batch", type=int, help="sequences per micro-batch per worker (default 1)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 3e-4)")
    p.add_argument("--min-lr-ratio", type=float, help="cosine floor as a fraction of --lr (default 0.1)")
    p.add_argument("--warmup", type=int, help="linear warm-up steps (default 0)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.1)")
    p.add_argument("--grad-clip", type=float, help="global gradient-norm clip (default 1.0)")
    p.add_argument("--aux-loss", choices=[a.value for a in AuxLoss], help="load-balancing loss (default switch)")
    p.add_argument("--aux-coef", type=float, help="load-balancing loss coefficient (default 0.001)")
    p.add_argument("--z-loss-coef", type=float, help="router z-loss coefficient (default 0)")
    p.add_argument("--aux-free-bias-rate", type=float, help="auxiliary-loss-free balancing step γ (default 0: off)")
    p.add_argument("--expert-backend", choices=["eager", "grouped", "megablocks"], help="expert kernels")
    p.add_argument(
        "--activation-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="recompute each decoder layer in backward instead of keeping its activations (default: on with "
        "--gpus-per-worker 1, off on CPU)",
    )
    p.add_argument(
        "--sharding",
        choices=list(SHARDINGS),
        help="how parameters, gradients and optimizer state are spread: fsdp = PyTorch FSDP2 (non-expert weights "
        "over all ranks, each rank's experts over the ranks holding the same experts; bf16 compute, fp32 master "
        "and AdamW state; sharded checkpoints that resume in any layout); zero1/zero2 = DeepSpeed ZeRO; none = "
        "plain PyTorch AdamW, the reference. Default: fsdp with --gpus-per-worker 1, none on CPU",
    )
    p.add_argument(
        "--zero-stage",
        type=int,
        choices=list(ZERO_STAGES),
        help="the older spelling of --sharding none (0), zero1 (1) or zero2 (2)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        help="also checkpoint every N steps (default 0). The last step is always checkpointed, and so is the step "
        "in progress when the job is stopped (SIGTERM / upmoe jobs stop / Ctrl-C)",
    )
    p.add_argument("--max-failures", type=int, help="automatic restarts after a worker failure (default 0)")
    p.add_argument("--wandb-project", help="W&B project (default upmoe)")
    p.add_argument(
        "--wandb-mode", choices=["online", "offline", "disabled"], help="default: online iff WANDB_API_KEY is set"
    )
    p.add_argument("--heatmap-every", type=int, help="steps between expert-load heatmaps (default 50, 0: never)")
    p.add_argument("--peak-flops", type=float, help="device peak FLOP/s for the MFU estimate")
    p.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--seed", type=int, help="seed for data order and initialisation (default 0)")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    plan = p.add_argument_group(
        "memory plan",
        "--plan trains nothing: it runs one real training step of rank 0 of this layout on fake tensors with a "
        "fake process group and prints the GPU memory it needs per rank, by kind, with a verdict",
    )
    plan.add_argument("--plan", action="store_true", help="print the per-rank memory plan of this layout and exit")
    plan.add_argument(
        "--model-config", type=Path, help="with --plan: an HF config.json (or its directory) instead of --model"
    )
    plan.add_argument(
        "--gpu-memory-gib", type=float, help="memory of one GPU, for --plan and the check of GPU runs (default 80)"
    )
    plan.add_argument(
        "--plan-check",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="before a GPU run starts, plan its memory and refuse a layout that does not fit (default: on)",
    )
    plan.add_argument(
        "--headroom", type=float, default=0.10, help="fraction of GPU memory kept free (CUDA context, NCCL, fragments)"
    )


PLAN_ONLY = ("plan", "model_config", "headroom")


def run_train(args: argparse.Namespace) -> int:
    if args.plan:
        return run_plan(args)
    if args.model_config is not None:
        raise SystemExit("--model-config is for --plan; training needs --model (a directory with weights)")
    from moe_train.trainer import run_training

    options = {k: v for k, v in vars(args).items() if k not in ("config", "json", "preset", *PLAN_ONLY)}
    cfg = load_train_config(args.config, options, preset=args.preset)
    summary = run_training(cfg)
    if summary["stopped_early"]:
        print(f"stopped at step {summary['steps']} of {cfg.steps}, checkpointed: re-run the same command to continue")
    print(
        f"trained {summary['steps']} steps: final LM loss {summary['final_loss']:.4f}, "
        f"{summary['tokens_per_s']:,.0f} tokens/s; run dir {cfg.out}"
        + (f"; held-out loss {summary['eval_loss']:.4f}" if summary["eval_loss"] is not None else "")
    )
    if args.json:
        print(json.dumps(summary))
    return 0


def run_plan(args: argparse.Namespace) -> int:
    from moe_train.plan import PlanError, plan_training

    options = {k: v for k, v in vars(args).items() if k not in ("config", "json", "preset", *PLAN_ONLY)}
    if args.model_config is not None:
        if args.model is not None:
            raise SystemExit("give --model or --model-config, not both")
        options["model"] = str(args.model_config)
    # Nothing is read or written: data and run directory only matter to a real run.
    options = {"data": "embedded", "out": "plan", **{k: v for k, v in options.items() if v is not None}}
    cfg = load_train_config(args.config, options, preset=args.preset)
    try:
        plan = plan_training(cfg, gpu_memory_gib=cfg.gpu_memory_gib, headroom=args.headroom)
    except PlanError as e:
        raise SystemExit(f"upmoe train --plan: {e}") from None
    print(plan.table())
    if args.json:
        print(json.dumps(plan.as_dict()))
    return 0 if plan.fits else 3


def _configure_export(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Stream a training run's checkpoint (any --sharding) into an HF directory that transformers, vLLM and "
        "upmoe load; the host holds about one decoder layer at a time."
    )
    p.add_argument("run_dir", type=Path, help="the run's --out directory (holds train_config.json and ray/)")
    p.add_argument("out_dir", type=Path, help="the HF directory to write (written whole, or not at all)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument(
        "--dtype",
        choices=("bf16", "fp32", "source"),
        help="dtype of the exported weights (default: bf16 for a run trained on GPUs, which computes in bf16, "
        "fp32 otherwise; source: the dtype of the model the run started from)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")


def run_export(args: argparse.Namespace) -> int:
    from moe_train.export import export_run

    path = export_run(
        args.run_dir, args.out_dir, step=args.step, overwrite=args.overwrite, dtype=args.dtype, progress=True
    )
    print(f"exported {args.run_dir} -> {path}")
    return 0
