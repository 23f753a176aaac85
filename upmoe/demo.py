"""``upmoe demo``: what exists so far, end to end on the embedded defaults, with real measured numbers.

1. make a tiny dense Qwen2 (`debug`) with a BPE tokenizer trained on the embedded corpus, and briefly
   pretrain it (a plain AdamW loop until `upmoe train` lands);
2. upcycle it with the Qwen2 recipe into 64 routed + 8 shared experts, top-8, through the Ray job
   (`upmoe upcycle`), and with `preserve` to show the exact dense function at step 0;
3. evaluate dense and upcycled models on the embedded held-out text (`upmoe eval`'s convention);
4. decode greedily with the batched KV cache from a ChatML prompt and check it against a full forward;
5. print a summary table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from bench.upcycle_quality import pretrain_dense
from moe_core.generate import greedy_generate
from moe_core.loading import load_model
from moe_core.params import count_parameters
from moe_core.tokenizer import Tokenizer
from upmoe.cli import main as upmoe


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="working directory (replaced)")
    parser.add_argument("--pretrain-steps", type=int, default=300, help="steps of the dense base's pretraining")


def _stage(n: int, text: str) -> None:
    print(f"\n[{n}] {text}", flush=True)


def _report(path: Path) -> dict:
    return json.loads((path / "upcycle_report.json").read_text())


def run(name: str, args: argparse.Namespace) -> int:
    start = time.perf_counter()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    dense, moe, preserve = args.out / "dense", args.out / "moe", args.out / "moe-preserve"

    _stage(1, f"upmoe init --preset debug {dense}; pretrain it for {args.pretrain_steps} steps")
    if upmoe(["init", str(dense), "--preset", "debug"]) != 0:
        return 1
    t0 = time.perf_counter()
    pretrain_dense(dense, args.pretrain_steps, seq_len=128, batch=16)
    pretrain_s = time.perf_counter() - t0

    _stage(2, f"upmoe upcycle {dense} {moe}  (Qwen2 recipe: 64 routed + 8 shared experts of 32, top-8; a Ray job)")
    if upmoe(["upcycle", str(dense), str(moe), "--expert-size", "32", "--no-progress"]) != 0:
        return 1
    _stage(3, f"upmoe upcycle {dense} {preserve} --init preserve  (must equal the dense model at step 0)")
    if upmoe(["upcycle", str(dense), str(preserve), "--init", "preserve", "--expert-size", "32", "--no-progress"]):
        return 1

    _stage(4, "greedy decoding with the batched KV cache (upcycled MoE, before any MoE training)")
    model, tokenizer = load_model(moe), Tokenizer.from_dir(moe)
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": text}])
        for text in ("What is seven plus five?", "Tell me a story about a fox.")
    ]
    ids = [tokenizer.encode(p) for p in prompts]
    new = greedy_generate(model, ids, 24, stop_ids=tokenizer.stop_token_ids)
    with torch.no_grad():
        full = model(torch.tensor([ids[1] + new[1][:-1]])).logits[0, -1]
    print(f"    reply: {tokenizer.decode(new[1])!r}")
    print(f"    cached decoding's last token equals a full forward's argmax: {int(full.argmax()) == new[1][-1]}")

    qwen2, exact = _report(moe), _report(preserve)
    q, p = qwen2["step0"], exact["step0"]
    dense_params = count_parameters(load_model(dense).config)
    print("\nsummary (held-out embedded text, step 0 after upcycling)")
    print("| model | params | activated | eval loss | aux loss | router entropy | expert-load CV |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| dense debug (pretrained {pretrain_s:.0f} s) | {dense_params.total:,} | {dense_params.activated:,} | "
        f"{q['dense_loss']:.4f} | - | - | - |"
    )
    for label, rep, s in (("upcycled, qwen2 recipe", qwen2, q), ("upcycled, preserve", exact, p)):
        print(
            f"| {label} | {rep['params_total']:,} | {rep['params_activated']:,} | {s['moe_loss']:.4f} | "
            f"{s['aux_loss']:.3f} | {s['router_entropy']:.3f} | {s['expert_load_cv']:.3f} |"
        )
    print(
        f"\n(aux loss is {q['aux_loss_at_balance']} at perfect balance; router entropy at most "
        f"{q['router_entropy_max']:.3f} = ln 64)"
    )
    print(f"done in {time.perf_counter() - start:.1f} s; models under {args.out}/")
    print(json.dumps({"dense_loss": q["dense_loss"], "qwen2_loss": q["moe_loss"], "preserve_loss": p["moe_loss"]}))
    return 0
