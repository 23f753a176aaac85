"""``upmoe bench upcycle-quality``: the step-0 quality table of every init at the debug scale.

A tiny dense Qwen2 (`debug`) is briefly pretrained on the embedded corpus (a plain single-process AdamW
loop: enough to make the dense loss meaningful), then upcycled with each init into 64 routed + 8 shared
experts (top-8). For each: held-out loss of the dense model and of the upcycled one on the same text,
the aux loss (= top_k at perfect balance), router entropy (ln 64 = 4.159 for a uniform router) and the
expert-load coefficient of variation.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from bench.timing import markdown_table

INITS = ["qwen2", "drop-upcycling", "virtual-group", "preserve", "random"]


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=300, help="pretraining steps of the dense base")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workdir", type=Path)
    p.add_argument("--json", action="store_true")


def pretrain_dense(model_dir: Path, steps: int, seq_len: int, batch: int) -> float:
    from moe_core.corpus import embedded_corpus
    from moe_core.evaluate import token_blocks
    from moe_core.loading import load_model, save_model
    from moe_core.model import next_token_loss
    from moe_core.tokenizer import Tokenizer

    model = load_model(model_dir).train()
    blocks = token_blocks(Tokenizer.from_dir(model_dir).encode(embedded_corpus("train")), seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    loss = torch.tensor(0.0)
    for step in range(steps):
        batch_ids = blocks[torch.randint(0, len(blocks), (batch,), generator=gen)]
        loss = next_token_loss(model(batch_ids).logits, batch_ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"  pretrain step {step}: loss {loss.item():.3f}", flush=True)
    save_model(model, model_dir, tokenizer_dir=model_dir, overwrite=True)
    return float(loss)


def run(args: argparse.Namespace) -> int:
    from upmoe.cli import main

    work = Path(tempfile.mkdtemp(prefix="upmoe-quality-", dir=args.workdir))
    try:
        dense = work / "dense"
        main(["init", str(dense), "--preset", "debug"])
        keep = work / "tokenizer"
        shutil.copytree(dense, keep)
        print(f"pretraining the dense base for {args.steps} steps", flush=True)
        pretrain_dense(dense, args.steps, args.seq_len, args.batch)
        rows, results = [], []
        for init in INITS:
            out = work / init
            flags = ["--init", init, "--no-progress", "--json"]
            if init == "virtual-group":
                flags += ["--expert-size", "32"]
            code = main(["upcycle", str(dense), str(out), *flags])
            if code != 0:
                print(f"  {init}: failed")
                continue
            q = json.loads((out / "upcycle_report.json").read_text())["step0"]
            results.append({"init": init, **q})
            rows.append([init, q["dense_loss"], q["moe_loss"], q["aux_loss"], q["router_entropy"], q["expert_load_cv"]])
        print("\nstep-0 quality, debug scale (hidden 64, 2 layers; 64 routed + 8 shared experts of 32, top-8):")
        print(markdown_table(["init", "dense loss", "upcycled loss", "aux loss", "router entropy", "load CV"], rows))
        if args.json:
            print(json.dumps(results))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0
