"""``upmoe demo``: what exists so far, end to end on the embedded defaults, with real measured numbers.

1. make a tiny dense Qwen2 (`debug`) and a tiny fine-grained Qwen2-MoE (`debug-moe`: 64 routed + 8 shared,
   top-8) with a BPE tokenizer trained on the embedded corpus;
2. evaluate both on the embedded held-out text (`upmoe eval`'s convention);
3. decode greedily with the batched KV cache from a ChatML prompt and check it against a full forward;
4. print a summary table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from moe_core.cli import run_init
from moe_core.corpus import embedded_corpus
from moe_core.evaluate import evaluate_text
from moe_core.generate import greedy_generate
from moe_core.loading import load_model
from moe_core.losses import expert_counts, load_stats
from moe_core.params import count_parameters
from moe_core.tokenizer import Tokenizer


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="working directory")
    parser.add_argument("--seq-len", type=int, default=256, help="eval block length")


def _stage(n: int, text: str) -> None:
    print(f"\n[{n}] {text}", flush=True)


def run(name: str, args: argparse.Namespace) -> int:
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    eval_text = embedded_corpus("eval")
    rows = []
    for step, preset in enumerate(["debug", "debug-moe"], start=1):
        model_dir = args.out / preset
        _stage(step, f"upmoe init --preset {preset} {model_dir}")
        run_init(
            argparse.Namespace(
                out_dir=model_dir,
                preset=preset,
                seed=0,
                dtype="fp32",
                tokenizer=None,
                tokenizer_vocab=None,
                max_shard_size=5 * 2**30,
                overwrite=True,
                json=False,
            )
        )
        model, tokenizer = load_model(model_dir), Tokenizer.from_dir(model_dir)
        t0 = time.perf_counter()
        result = evaluate_text(model, tokenizer, eval_text, seq_len=args.seq_len, max_tokens=32 * args.seq_len)
        seconds = time.perf_counter() - t0
        print(f"    eval loss {result.loss:.4f} over {result.tokens} tokens ({result.tokens / seconds:,.0f} tok/s)")
        cv = "-"
        if model.config.is_moe:
            batch = torch.tensor(tokenizer.encode(eval_text)[: 8 * args.seq_len]).view(8, args.seq_len)
            with torch.no_grad():
                routing = model(batch).routings[0]
            cv = f"{load_stats(expert_counts(routing.experts_TK, model.config.num_experts))['cv']:.3f}"
        counts = count_parameters(model.config)
        rows.append((preset, counts.total, counts.activated, result.loss, cv, result.tokens / seconds))

    _stage(3, "greedy decoding with the batched KV cache (debug-moe, random weights: expect gibberish)")
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": text}])
        for text in ("What is seven plus five?", "Tell me a story about a fox.")
    ]
    ids = [tokenizer.encode(p) for p in prompts]
    new = greedy_generate(model, ids, 16, stop_ids=tokenizer.stop_token_ids)
    with torch.no_grad():
        full = model(torch.tensor([ids[0] + new[0][:-1]])).logits[0, -1]
    print(f"    reply 1: {tokenizer.decode(new[0])!r}")
    print(f"    cached decoding's last token equals a full forward's argmax: {int(full.argmax()) == new[0][-1]}")

    print("\nsummary")
    print("| model | params | activated | eval loss (random init) | expert-load CV | eval tok/s |")
    print("|---|---|---|---|---|---|")
    for preset, total, active, loss, cv, tps in rows:
        print(f"| {preset} | {total:,} | {active:,} | {loss:.4f} | {cv} | {tps:,.0f} |")
    print(f"\ndone in {time.perf_counter() - start:.1f} s; model directories under {args.out}/")
    print(json.dumps({"models": [r[0] for r in rows], "eval_loss": [r[3] for r in rows]}))
    return 0
