"""``upmoe bench train``: training throughput of debug-moe on CPU workers with EP=1 and EP=2, side by side
(``--ep`` picks the layouts; each runs on as many workers as its EP size).

Per configuration: tokens/s per worker, the MFU estimate (6·N_active + attention FLOPs per token over the
configured peak), and the share of step time spent inside the all-to-all exchanges (forward and backward,
timed around each call on rank 0). The first steps (warm-up) are left out of the averages. ``--zero-stages 0,1``
runs each configuration with the plain optimizer and with DeepSpeed ZeRO-1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bench.timing import markdown_table


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="debug-moe")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup-steps", type=int, default=2, help="steps left out of the averages")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per worker per step")
    p.add_argument(
        "--ep",
        default="1,2",
        help="comma-separated EP sizes, one configuration each on that many workers (default 1,2)",
    )
    p.add_argument(
        "--zero-stages", default="0", help="comma-separated optimizer paths per configuration, e.g. 0,1 (default 0)"
    )
    p.add_argument("--json", action="store_true")


def _summarise(
    out: Path,
    label: str,
    workers: int,
    ep: int,
    zero_stage: int,
    warmup_steps: int,
    rows: list[list[Any]],
    results: list[dict[str, Any]],
) -> None:
    """One table row and one JSON record from a run's metrics, warm-up steps left out."""
    from moe_train.tracking import read_metrics

    timed = read_metrics(out / "metrics.jsonl")[warmup_steps:]
    per_worker = sum(m["tokens_per_s"] for m in timed) / len(timed) / workers
    mfu = sum(m["mfu"] for m in timed) / len(timed)
    share = sum(m["all_to_all_share"] for m in timed) / len(timed)
    step_s = sorted(m["step_seconds"] for m in timed)[len(timed) // 2]
    rows.append([label, per_worker, f"{mfu:.2%}", f"{share:.1%}", f"{step_s * 1000:.0f}"])
    results.append(
        {
            "ep": ep,
            "workers": workers,
            "zero_stage": zero_stage,
            "tokens_per_s_per_worker": per_worker,
            "mfu": mfu,
            "all_to_all_share": share,
            "median_step_seconds": step_s,
        }
    )


def _int_list(text: str, option: str, allowed: range) -> list[int]:
    """``"1,2"`` -> [1, 2], each value in ``allowed``; a clear error otherwise."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v not in allowed for v in values):
        raise SystemExit(f"{option}: comma-separated integers from {allowed.start} to {allowed.stop - 1}, not {text!r}")
    return values


def run(args: argparse.Namespace) -> int:
    import ray

    from moe_train.config import load_train_config
    from moe_train.trainer import run_training
    from upmoe.cli import main

    ep_sizes = _int_list(args.ep, "--ep", range(1, 65))
    stages = _int_list(args.zero_stages, "--zero-stages", range(0, 3))
    work = Path(tempfile.mkdtemp(prefix="upmoe-bench-train-"))
    try:
        model = work / "model"
        main(["init", str(model), "--preset", args.preset])
        if not ray.is_initialized():
            ray.init(log_to_driver=False, configure_logging=False)
        rows, results = [], []
        for ep in ep_sizes:
            workers = ep  # one expert block per worker, no data-parallel replicas
            for zero_stage in stages:
                out = work / f"ep{ep}-zero{zero_stage}"
                cfg = load_train_config(
                    None,
                    {
                        "model": str(model),
                        "data": "embedded",
                        "out": str(out),
                        "workers": workers,
                        "ep": ep,
                        "steps": args.steps,
                        "seq_len": args.seq_len,
                        "micro_batch": args.micro_batch,
                        "zero_stage": zero_stage,
                        "wandb_mode": "disabled",
                    },
                )
                run_training(cfg)
                label = f"EP={ep} ({workers} worker{'s' if workers > 1 else ''})"
                if len(stages) > 1:
                    label += ", plain AdamW" if zero_stage == 0 else f", ZeRO-{zero_stage}"
                _summarise(out, label, workers, ep, zero_stage, args.warmup_steps, rows, results)
        print(
            f"\n{args.preset}, seq {args.seq_len}, {args.micro_batch} sequences per worker per step, "
            f"{args.steps - args.warmup_steps} timed steps, CPU (gloo)"
        )
        headers = ["configuration", "tokens/s per worker", "MFU", "all-to-all share", "median step ms"]
        print(markdown_table(headers, rows))
        if args.json:
            print(json.dumps(results))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0
