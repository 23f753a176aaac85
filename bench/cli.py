"""``upmoe bench NAME``: dispatch to one benchmark module."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "moe-layer": ("bench.moe_layer", "MoE block throughput: upmoe backends vs transformers' implementations"),
    "upcycle-quality": ("bench.upcycle_quality", "step-0 loss, aux loss and router entropy of every init (debug)"),
    "train": ("bench.train", "training tokens/s, MFU and all-to-all share with EP=1 and EP=2 (CPU workers)"),
    "serve": ("bench.serve", "endpoint tokens/s, TTFT and TPOT under concurrent clients vs transformers or vLLM"),
    "gpu-readiness": (
        "bench.gpu_readiness",
        "training forward and serving of a layout on fake CUDA devices: CPU/CUDA mixes, collectives, dtypes",
    ),
    "export": ("bench.export", "peak RSS and time of upmoe export on a sharded checkpoint of an upcycled shape"),
    "upcycling-study": (
        "bench.upcycling_study",
        "does upcycling pay at the demo's scale: dense vs MoE continued training over LR, init, aux, tokens",
    ),
    "upcycle": ("bench.upcycle", "upcycle a random dense checkpoint vs copying the same bytes: time, GB/s, RSS"),
}


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for bench_name, (module, summary) in BENCHMARKS.items():
        p = sub.add_parser(bench_name, help=summary, description=summary)
        importlib.import_module(module).configure(p)


def run(name: str, args: argparse.Namespace) -> int:
    return importlib.import_module(BENCHMARKS[args.benchmark][0]).run(args)
