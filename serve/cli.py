"""``upmoe serve``: deploy a model directory as an OpenAI-compatible Ray Serve endpoint."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serve.options import ServeOptions


def configure(name: str, p: argparse.ArgumentParser) -> None:
    p.description = (
        "Serve MODEL_DIR (qwen2 or qwen2_moe, HF format) with Ray Serve as an OpenAI-compatible endpoint: "
        "/v1/completions, /v1/chat/completions (SSE streaming), /v1/models, /health. Each model replica is a "
        "gang of --ep expert-parallel ranks; replicas autoscale between --min-replicas and --max-replicas. "
        "Blocks until Ctrl-C. With --emit-config, prints a Ray Serve config for `serve deploy` instead."
    )
    p.add_argument(
        "model_dir", type=Path, nargs="?", metavar="MODEL_DIR", help="HF model directory (config, weights, tokenizer)"
    )
    p.add_argument("--ep", type=int, help="expert-parallel ranks per replica (divides the expert count) (default 1)")
    p.add_argument("--gpus-per-rank", type=int, choices=[0, 1], help="1 on GPU clusters (NCCL) (default 0)")
    p.add_argument("--min-replicas", type=int, help="autoscaling floor (default 1)")
    p.add_argument("--max-replicas", type=int, help="autoscaling ceiling (default 4)")
    p.add_argument(
        "--target-ongoing-requests", type=float, help="requests per replica the autoscaler aims for (default 4)"
    )
    p.add_argument("--upscale-delay-s", type=float, help="load must stay high this long to add replicas (default 5.0)")
    p.add_argument("--downscale-delay-s", type=float, help="load must stay low this long to remove one (default 30.0)")
    p.add_argument("--max-batch-size", type=int, help="sequences running together per replica (default 16)")
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        help="tokens per forward step: one per decoding sequence, the rest prefill chunks; bounds a step's "
        "activation memory (default 2048)",
    )
    p.add_argument("--max-seq-len", type=int, help="tokens per sequence, prompt + output (default: model context)")
    p.add_argument(
        "--kv-cache-gib",
        type=float,
        help="KV-cache memory per rank, in 16-token blocks taken as sequences grow (default: on GPU, 90%% of the "
        "device less the weights and the planned activation peak; on CPU, --max-batch-size full-context "
        "sequences, at most 2 GiB)",
    )
    p.add_argument("--max-queued-requests", type=int, help="per-replica queue; beyond it requests get 429 (default 64)")
    p.add_argument(
        "--max-request-bytes",
        type=int,
        help="refuse larger request bodies with 413 before parsing them "
        "(default: 32 bytes per context token, at least 1 MiB)",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights (default auto: bf16 on GPU, fp32 on CPU)",
    )
    p.add_argument("--host", help="HTTP bind address (0.0.0.0 to listen on all interfaces) (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $UPMOE_API_KEY, else none)")
    p.add_argument("--model-name", help="name clients pass as `model` (default: MODEL_DIR's folder name)")
    p.add_argument("--ray-address", help="Ray cluster to deploy to (default: start a local one)")
    p.add_argument("--config", type=Path, help="YAML file with any of these options (flags win)")
    p.add_argument("--emit-config", action="store_true", help="print a `serve deploy`-able config and exit")
    plan = p.add_argument_group(
        "memory plan",
        "--plan serves nothing: it runs one step of rank 0 of a replica at the token budget on fake CUDA tensors "
        "in a fake EP process group and prints the rank's memory (weights, activation peak, KV blocks) and how "
        "many sequences of --plan-seq-len tokens fit. MODEL_DIR may be a config.json: no weights are read.",
    )
    plan.add_argument("--plan", action="store_true", help="print the per-rank serving memory plan and exit")
    plan.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80)")
    plan.add_argument(
        "--plan-seq-len", type=int, default=4096, help="tokens per sequence (prompt + output) to count (default 4096)"
    )
    plan.add_argument("--json", action="store_true", help="with --plan: also print the plan as JSON")


def run(name: str, args: argparse.Namespace) -> int:
    from serve.launch import emit_config, run_serve
    from serve.options import load_serve_options

    plan_only = ("config", "emit_config", "plan", "gpu_memory_gib", "plan_seq_len", "json")
    overrides = {k: v for k, v in vars(args).items() if k not in plan_only}
    overrides["model_dir"] = str(args.model_dir) if args.model_dir is not None else None
    opts = load_serve_options(args.config, overrides)
    if args.plan:
        return run_plan(opts, args)
    if args.emit_config:
        print(emit_config(opts), end="")
        return 0
    return run_serve(opts)


def run_plan(opts: ServeOptions, args: argparse.Namespace) -> int:
    import json

    from serve.app import resolve_dtype
    from serve.plan import plan_serving
    from serve.runner import check_expert_split

    if args.plan_seq_len < 2:
        raise SystemExit("--plan-seq-len must be at least 2")
    try:
        cfg = check_expert_split(opts.model_dir, opts.ep)
    except ValueError as exc:
        raise SystemExit(f"upmoe serve --plan: {exc}") from None
    plan = plan_serving(
        cfg,
        name=opts.model_name or "model",
        ep=opts.ep,
        dtype=resolve_dtype(opts, gpu=True),
        gpu_memory_gib=args.gpu_memory_gib,
        max_num_batched_tokens=opts.max_num_batched_tokens,
        max_num_seqs=opts.max_batch_size,
        context=min(args.plan_seq_len, cfg.max_position_embeddings),
        seq_len=args.plan_seq_len,
    )
    print(plan.table())
    if args.json:
        print(json.dumps(plan.as_dict()))
    return 0 if plan.fits else 3
