"""``upmoe bench train``: training throughput of debug-moe on CPU workers with EP=1 and EP=2, side by side.

Per configuration: tokens/s per worker, the MFU estimate (6·N_active + attention FLOPs per token over the
configured peak), and the share of step time spent inside the all-to-all exchanges (forward and backward,
timed around each call on rank 0). The first steps (warm-up) are left out of the averages.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from bench.timing import markdown_table


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="debug-moe")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup-steps", type=int, default=2, help="steps left out of the averages")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per worker per step")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    import ray

    from moe_train.config import load_train_config
    from moe_train.tracking import read_metrics
    from moe_train.trainer import run_training
    from upmoe.cli import main

    work = Path(tempfile.mkdtemp(prefix="upmoe-bench-train-"))
    try:
        model = work / "model"
        main(["init", str(model), "--preset", args.preset])
        if not ray.is_initialized():
            ray.init(log_to_driver=False, configure_logging=False)
        rows, results = [], []
        for workers, ep in ((1, 1), (2, 2)):
            out = work / f"ep{ep}"
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
                    "wandb_mode": "disabled",
                },
            )
            run_training(cfg)
            timed = read_metrics(out / "metrics.jsonl")[args.warmup_steps :]
            per_worker = sum(m["tokens_per_s"] for m in timed) / len(timed) / workers
            mfu = sum(m["mfu"] for m in timed) / len(timed)
            share = sum(m["all_to_all_share"] for m in timed) / len(timed)
            rows.append(
                [f"EP={ep} ({workers} worker{'s' if workers > 1 else ''})", per_worker, f"{mfu:.2%}", f"{share:.1%}"]
            )
            results.append(
                {
                    "ep": ep,
                    "workers": workers,
                    "tokens_per_s_per_worker": per_worker,
                    "mfu": mfu,
                    "all_to_all_share": share,
                }
            )
        print(
            f"\n{args.preset}, seq {args.seq_len}, {args.micro_batch} sequences per worker per step, "
            f"{args.steps - args.warmup_steps} timed steps, CPU (gloo)"
        )
        print(markdown_table(["configuration", "tokens/s per worker", "MFU", "all-to-all share"], rows))
        if args.json:
            print(json.dumps(results))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0
