"""``upmoe upcycle``: dense Qwen2 / Llama-family checkpoint -> fine-grained Qwen2-MoE checkpoint, as a Ray job."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from moe_core.loading import parse_dtype
from moe_core.params import count_parameters
from upcycle.job import REPORT, JobOptions, run_upcycle
from upcycle.plan import PRESETS, Plan, resolve_shape, target_config
from upcycle.recipe import InitMethod, ReinitGranularity, UpcycleSpec
from upcycle.source import Source, read_source, read_source_config

_EPILOG = """\
defaults without --preset: 64 routed + 8 shared experts, top-8, expert size = dense FFN width / 8 rounded
down to a multiple of 64 (Qwen2-7B: 2368), norm_topk_prob off, aux coef 0.001, the source's vocabulary.
--preset qwen2-57b-a14b gives the Qwen2 report's shape exactly (expert 2560, vocab 151936); flags override it.

inits: qwen2 (report's recipe: replicate, shuffle per copy, cut, re-init 50%% neuron-wise with the dense
matrix's statistics), drop-upcycling (each expert samples its own neurons), virtual-group (NVIDIA: shards,
shared router rows per group, output scaling), preserve (computes exactly the dense function at step 0),
random (from-scratch baseline with the same shapes).

On a cluster (--ray-address), SOURCE_DIR and OUT_DIR must be paths every node sees (shared filesystem).
"""


def configure(name: str, p: argparse.ArgumentParser) -> None:
    p.description = "Upcycle a dense qwen2/llama/mistral checkpoint into a fine-grained Qwen2-MoE checkpoint."
    p.epilog = _EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("source_dir", nargs="?", type=Path, help="dense HF model directory")
    p.add_argument("out_dir", nargs="?", type=Path, help="output directory (created atomically)")
    p.add_argument("--plan", action="store_true", help="print the target config and parameter counts; write nothing")
    p.add_argument("--source-config", type=Path, help="with --plan: a config.json instead of SOURCE_DIR")
    p.add_argument("--preset", choices=sorted(PRESETS), help="target shape preset")
    p.add_argument("--num-experts", type=int, help="routed experts (default 64)")
    p.add_argument("--num-shared-experts", type=int, help="shared experts fused into one MLP (default 8)")
    p.add_argument("--top-k", type=int, help="routed experts per token (default 8)")
    p.add_argument("--expert-size", type=int, help="expert width (default: dense width / 8, see below)")
    p.add_argument("--norm-topk-prob", action=argparse.BooleanOptionalAction, default=None, help="renormalise top-k")
    p.add_argument("--vocab-size", type=int, help="slice or zero-pad the vocabulary to N rows")
    p.add_argument(
        "--init", choices=[m.value for m in InitMethod], default="qwen2", help="initialisation (default qwen2)"
    )
    p.add_argument("--reinit-ratio", type=float, default=0.5, help="share of each expert re-initialised (default 0.5)")
    p.add_argument("--reinit-granularity", choices=[g.value for g in ReinitGranularity], default="neuron")
    p.add_argument("--router-std", type=float, default=0.02, help="router and shared-gate init std (default 0.02)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["source", "bf16", "fp32"], default="source", help="output dtype")
    p.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--max-parallel", type=int, help="concurrent tasks (default: from CPUs and memory)")
    p.add_argument("--layers-per-task", type=int, default=1, help="decoder layers per task/shard (default 1)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    mode.add_argument("--resume", action="store_true", help="continue an interrupted run, reusing verified shards")
    p.add_argument(
        "--eval-tokens", type=int, default=16384, help="held-out tokens for the step-0 quality check (0: skip)"
    )
    p.add_argument("--eval-max-params", type=float, default=2e8, help="skip the quality check above this many params")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")


def _check_counts(args: argparse.Namespace) -> None:
    """Counts that make no sense are refused here, before Ray starts or anything is written."""
    for flag in ("num_experts", "top_k", "expert_size", "vocab_size", "max_parallel", "layers_per_task"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.num_shared_experts is not None and args.num_shared_experts < 0:
        raise ValueError(f"--num-shared-experts must be 0 or more, got {args.num_shared_experts}")


def build_plan(args: argparse.Namespace, source: Source) -> Plan:
    _check_counts(args)
    shape = resolve_shape(
        args.preset,
        num_experts=args.num_experts,
        num_shared=args.num_shared_experts,
        top_k=args.top_k,
        expert_size=args.expert_size,
        norm_topk_prob=args.norm_topk_prob,
        vocab_size=args.vocab_size,
    )
    target = target_config(source, shape)
    spec = UpcycleSpec(
        num_experts=target.num_experts,
        num_shared=shape.num_shared,
        expert_size=target.moe_intermediate_size,
        top_k=target.num_experts_per_tok,
        norm_topk_prob=target.norm_topk_prob,
        init=InitMethod(args.init),
        reinit_ratio=args.reinit_ratio,
        reinit_granularity=ReinitGranularity(args.reinit_granularity),
        router_std=args.router_std,
        init_std=source.config.initializer_range,
        seed=args.seed,
    )
    spec.validate(source.config.intermediate_size)
    return Plan(source=source, target=target, spec=spec)


def _source_dtype(source: Source) -> torch.dtype:
    name = source.raw_config.get("torch_dtype") or source.raw_config.get("dtype") or "float32"
    return parse_dtype(name)


def run(name: str, args: argparse.Namespace) -> int:
    if args.plan:
        if (args.source_dir is None) == (args.source_config is None):
            raise ValueError("--plan needs exactly one of SOURCE_DIR or --source-config config.json")
        source = read_source_config(args.source_config) if args.source_config else read_source(args.source_dir)
        plan = build_plan(args, source)
        print(plan.describe())
        if args.json:
            print(json.dumps(plan.as_dict()))
        return 0
    if args.source_dir is None or args.out_dir is None:
        raise ValueError("upcycling needs SOURCE_DIR and OUT_DIR (or --plan)")
    source = read_source(args.source_dir)
    plan = build_plan(args, source)
    dtype = _source_dtype(source) if args.dtype == "source" else parse_dtype(args.dtype)
    print(plan.describe(), flush=True)
    options = JobOptions(
        out_dir=args.out_dir,
        dtype=dtype,
        ray_address=args.ray_address,
        max_parallel=args.max_parallel,
        layers_per_task=args.layers_per_task,
        overwrite=args.overwrite,
        resume=args.resume,
        progress=not args.no_progress,
    )
    report = run_upcycle(plan, options)
    if args.eval_tokens > 0 and count_parameters(plan.target).total <= args.eval_max_params:
        report = _add_quality(args, report)
    gb, seconds = report["bytes_written"] / 1e9, report["timings"]["total_s"]
    print(f"wrote {args.out_dir}: {gb:.3f} GB in {seconds:.1f} s ({gb / max(seconds, 1e-9):.2f} GB/s)")
    if "step0" in report:
        q = report["step0"]
        print(
            f"step-0 eval loss: dense {q['dense_loss']:.4f}, upcycled {q['moe_loss']:.4f}; aux loss "
            f"{q['aux_loss']:.3f} (balanced: {q['aux_loss_at_balance']}); router entropy {q['router_entropy']:.3f} "
            f"(max {q['router_entropy_max']:.3f})"
        )
    if args.json:
        keys = ("params_total", "params_activated", "bytes_written", "timings", "step0", "source_fingerprint")
        print(json.dumps({"out_dir": str(args.out_dir), **{k: report[k] for k in keys if k in report}}))
    return 0


def _add_quality(args: argparse.Namespace, report: dict) -> dict:
    from moe_core.corpus import embedded_corpus
    from moe_core.fileutil import write_text_atomic
    from upcycle.quality import step0_quality

    if not (args.out_dir / "tokenizer.json").exists():
        return report
    report["step0"] = step0_quality(args.source_dir, args.out_dir, embedded_corpus("eval"), max_tokens=args.eval_tokens)
    write_text_atomic(args.out_dir / REPORT, json.dumps(report, indent=2) + "\n")
    return report
