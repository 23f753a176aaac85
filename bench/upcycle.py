"""``upmoe bench upcycle``: upcycle a locally generated random dense checkpoint and compare with a plain copy.

In one run: make a random dense checkpoint of a public shape (bf16), upcycle it into 64 routed + 8 shared
experts with the Qwen2 recipe through the Ray job, then copy the same number of bytes on the same disk.
Reports wall time, GB/s written, the peak RSS of any upcycling task against the bound "one dense layer +
one MoE layer in fp32", and the ratio to the copy time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil

from bench.timing import markdown_table


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="qwen2-0.5b", help="dense source shape (qwen2-0.5b, qwen2-1.5b, ...)")
    p.add_argument("--workdir", type=Path, help="where to write (default: a temp dir on the current disk)")
    p.add_argument("--max-parallel", type=int, help="concurrent upcycling tasks (default: the job's)")
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    p.add_argument("--json", action="store_true")


class PeakRSS:
    """Polls the resident memory of Ray task processes (and the driver) in a background thread."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.task_peak, self.driver_peak = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            self.driver_peak = max(self.driver_peak, me.memory_info().rss)
            for proc in psutil.process_iter(["cmdline", "memory_info"]):
                cmd = " ".join(proc.info["cmdline"] or [])
                if "ray::run_task" in cmd or "ray::IDLE" in cmd or "default_worker.py" in cmd:
                    self.task_peak = max(self.task_peak, proc.info["memory_info"].rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _copy_tree_bytes(src: Path, dst: Path) -> tuple[int, float]:
    dst.mkdir(parents=True)
    start, total = time.perf_counter(), 0
    for f in sorted(src.glob("*.safetensors")):
        shutil.copyfile(f, dst / f.name)
        total += f.stat().st_size
    return total, time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    from moe_core.params import count_parameters
    from upcycle.cli import build_plan
    from upcycle.job import JobOptions, run_upcycle, task_memory_bytes
    from upcycle.source import read_source
    from upmoe.cli import main

    work = Path(tempfile.mkdtemp(prefix="upmoe-bench-", dir=args.workdir))
    try:
        dense, out = work / "dense", work / "moe"
        t0 = time.perf_counter()
        main(["init", str(dense), "--preset", args.preset, "--dtype", "bf16"])
        print(f"made a random {args.preset} checkpoint in {time.perf_counter() - t0:.1f} s", flush=True)
        plan_args = argparse.Namespace(
            preset=None,
            num_experts=64,
            num_shared_experts=8,
            top_k=8,
            expert_size=None,
            norm_topk_prob=None,
            vocab_size=None,
            init="qwen2",
            reinit_ratio=0.5,
            reinit_granularity="neuron",
            router_std=0.02,
            seed=0,
        )
        plan = build_plan(plan_args, read_source(dense))
        print(plan.describe(), flush=True)
        import torch

        options = JobOptions(out_dir=out, dtype=torch.bfloat16, max_parallel=args.max_parallel, progress=True)
        import ray

        if not ray.is_initialized():  # a cluster is already up in real use: keep Ray's start-up out of the timing
            ray.init(log_to_driver=False, configure_logging=False)
        with PeakRSS() as rss:
            start = time.perf_counter()
            report = run_upcycle(plan, options)
            upcycle_s = time.perf_counter() - start
        written = report["bytes_written"]
        copied, copy_s = _copy_tree_bytes(out, work / "copy")
        bound = task_memory_bytes(plan, 1)
        rows = [
            ["upcycle (Ray job)", upcycle_s, written / 1e9 / upcycle_s, rss.task_peak / 2**30, 1.0],
            ["copy of the same bytes", copy_s, copied / 1e9 / copy_s, float("nan"), copy_s / upcycle_s],
        ]
        counts = count_parameters(plan.target)
        print(f"\nsource {args.preset} (bf16) -> {counts.total:,}-parameter MoE, {written / 1e9:.2f} GB written")
        print(markdown_table(["step", "seconds", "GB/s", "peak task RSS GiB", "speed vs upcycle"], rows))
        print(
            f"upcycle / copy time: {upcycle_s / copy_s:.2f}x (target <= 1.5x); "
            f"peak task RSS {rss.task_peak / 2**30:.2f} GiB vs bound {bound / 2**30:.2f} GiB "
            "(one dense + one MoE layer, fp32, + 256 MiB)"
        )
        if args.json:
            print(
                json.dumps(
                    {
                        "preset": args.preset,
                        "upcycle_s": upcycle_s,
                        "copy_s": copy_s,
                        "bytes": written,
                        "peak_task_rss": rss.task_peak,
                        "rss_bound": bound,
                    }
                )
            )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0
