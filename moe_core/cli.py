"""``upmoe init`` and ``upmoe eval``: the commands that need nothing beyond moe_core."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from moe_core.corpus import embedded_corpus
from moe_core.evaluate import evaluate_text, read_text
from moe_core.loading import load_model, parse_dtype, save_model
from moe_core.model import CausalLM
from moe_core.params import count_parameters
from moe_core.registry import get_preset, preset_names
from moe_core.tokenizer import Tokenizer, train_bpe_tokenizer


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    {"init": _configure_init, "eval": _configure_eval}[name](parser)


def run(name: str, args: argparse.Namespace) -> int:
    return {"init": run_init, "eval": run_eval}[name](args)


# ---------------------------------------------------------------------------------------------- init
def _configure_init(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Create a randomly initialised model directory: config.json, sharded safetensors and a byte-level BPE "
        "tokenizer trained on the embedded corpus (or copied from --tokenizer). For tests, demos, benchmarks."
    )
    p.add_argument("out_dir", type=Path, help="directory to create")
    p.add_argument("--preset", default="debug-moe", choices=preset_names(), help="model shape")
    p.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="dtype of saved weights")
    p.add_argument("--tokenizer", type=Path, help="copy this directory's tokenizer instead of training one")
    p.add_argument(
        "--tokenizer-vocab",
        type=int,
        help="vocabulary of the trained tokenizer (default: the model's vocab_size, at most 1024)",
    )
    p.add_argument("--max-shard-size", type=int, default=5 * 2**30, help="max bytes per safetensors shard")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")


def run_init(args: argparse.Namespace) -> int:
    if args.out_dir.exists() and not args.overwrite:
        raise ValueError(f"{args.out_dir} exists; pass --overwrite to replace it")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = args.tokenizer or Path(tmp)
        if args.tokenizer is None:
            cfg = get_preset(args.preset)
            vocab = args.tokenizer_vocab or min(cfg.vocab_size, 1024)
            tokenizer = train_bpe_tokenizer([embedded_corpus("train")], vocab, tokenizer_dir)
        else:
            tokenizer = Tokenizer.from_dir(args.tokenizer)
        eos = tokenizer.eos_token_id
        cfg = get_preset(args.preset, bos_token_id=eos, eos_token_id=eos)
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but preset {args.preset} only {cfg.vocab_size}"
            )
        model = CausalLM(cfg)
        model.init_weights(torch.Generator().manual_seed(args.seed))
        save_model(
            model,
            args.out_dir,
            dtype=parse_dtype(args.dtype),
            tokenizer_dir=tokenizer_dir,
            max_shard_bytes=args.max_shard_size,
            overwrite=args.overwrite,
        )
    counts = count_parameters(cfg)
    summary = {
        "out_dir": str(args.out_dir),
        "preset": args.preset,
        "model_type": cfg.model_type.value,
        "params_total": counts.total,
        "params_activated": counts.activated,
        "tokenizer_vocab": tokenizer.vocab_size,
        "seconds": round(time.perf_counter() - start, 2),
    }
    print(
        f"wrote {args.out_dir}: {args.preset} ({cfg.model_type.value}), {counts.total:,} parameters "
        f"({counts.activated:,} activated), tokenizer of {tokenizer.vocab_size} tokens"
    )
    if args.json:
        print(json.dumps(summary))
    return 0


# ---------------------------------------------------------------------------------------------- eval
def _configure_eval(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Mean next-token cross-entropy of MODEL_DIR on a text file. The text is tokenised whole (no BOS/EOS), "
        "cut into consecutive blocks of --seq-len tokens (remainder dropped), and the loss of predicting "
        "tokens 2..N of each block is averaged — the same convention as computing it with transformers."
    )
    p.add_argument("model_dir", type=Path, help="HF model directory (qwen2 or qwen2_moe)")
    p.add_argument("--data", help="UTF-8 text file (default: the embedded eval corpus)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per block")
    p.add_argument("--max-tokens", type=int, help="evaluate only the first N tokens of the text")
    p.add_argument("--batch-size", type=int, default=8, help="blocks per forward pass")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="compute dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--expert-backend", choices=["eager", "grouped", "megablocks"], help="MoE expert kernels")
    p.add_argument("--json", action="store_true", help='print {"loss": ..., "tokens": ...} as the last line')


def run_eval(args: argparse.Namespace) -> int:
    text = read_text(args.data) if args.data else embedded_corpus("eval")
    tokenizer = Tokenizer.from_dir(args.model_dir)
    model = load_model(
        args.model_dir, dtype=parse_dtype(args.dtype), device=args.device, expert_backend=args.expert_backend
    )
    result = evaluate_text(
        model,
        tokenizer,
        text,
        seq_len=args.seq_len,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        progress=sys.stderr.isatty(),
    )
    print(
        f"{args.model_dir}: loss {result.loss:.4f} (perplexity {result.perplexity:.2f}) over "
        f"{result.blocks} blocks x {result.seq_len} tokens"
    )
    if args.json:
        print(json.dumps(result.as_dict()))
    return 0
