"""``upmoe serve``: deploy a model directory as an OpenAI-compatible Ray Serve endpoint."""

from __future__ import annotations

import argparse
from pathlib import Path


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
    p.add_argument("--max-batch-size", type=int, help="sequences decoded together (KV-cache slots) (default 16)")
    p.add_argument("--max-seq-len", type=int, help="tokens per sequence, prompt + output (default: model context)")
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


def run(name: str, args: argparse.Namespace) -> int:
    from serve.launch import emit_config, run_serve
    from serve.options import load_serve_options

    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "emit_config")}
    overrides["model_dir"] = str(args.model_dir) if args.model_dir is not None else None
    opts = load_serve_options(args.config, overrides)
    if args.emit_config:
        print(emit_config(opts), end="")
        return 0
    return run_serve(opts)
