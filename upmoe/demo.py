"""``upmoe demo``: the whole product on the embedded defaults, end to end, with real measured numbers.

1. ``upmoe init`` a tiny dense Qwen2 (``debug``) with a BPE tokenizer trained on the embedded corpus, and
   pretrain it with ``upmoe train`` (Ray Train, 1 worker); ``upmoe export`` it;
2. ``upmoe upcycle`` it with the Qwen2 recipe into 64 routed + 8 shared experts, top-8 (a Ray job);
3. continue pretraining the MoE with ``upmoe train --workers 2 --ep 2`` (all-to-all expert parallelism) and,
   as the baseline, the dense model for the same number of tokens; export both;
4. evaluate both on the held-out embedded text;
5. serve the MoE with Ray Serve (one EP=2 replica, autoscaling on) and ask it a question through the
   OpenAI-compatible API; shut down;
6. print a summary table and write a loss-curve PNG.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from upmoe.cli import main as upmoe

SEQ_LEN = 128


@dataclass(frozen=True)
class Plan:
    pretrain_steps: int
    train_steps: int
    micro_batch: int  # per worker; both continued runs use 2 workers, so they see the same tokens

    @property
    def continued_tokens(self) -> int:
        return self.train_steps * 2 * self.micro_batch * SEQ_LEN


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="working directory (replaced)")
    parser.add_argument("--pretrain-steps", type=int, default=300, help="steps of the dense base's pretraining")
    parser.add_argument("--train-steps", type=int, default=400, help="continued-pretraining steps (MoE and dense)")
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per worker per continued step")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port of the demo's endpoint")


def _stage(n: int, text: str) -> None:
    print(f"\n[{n}/6] {text}", flush=True)


def _run(*args: str) -> None:
    print(f"    $ upmoe {' '.join(args)}", flush=True)
    if upmoe(list(args)) != 0:
        raise RuntimeError(f"upmoe {args[0]} failed (see above)")


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    from moe_train.tracking import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


def _train(model: Path, run_dir: Path, steps: int, micro_batch: int, *extra: str) -> list[dict[str, Any]]:
    _run(
        "train",
        "--model",
        str(model),
        "--data",
        "embedded",
        "--out",
        str(run_dir),
        "--steps",
        str(steps),
        "--seq-len",
        str(SEQ_LEN),
        "--micro-batch",
        str(micro_batch),
        "--heatmap-every",
        "0",
        "--checkpoint-every",
        str(steps),  # one checkpoint, at the end: what `upmoe export` reads
        *extra,
    )
    return _metrics(run_dir)


def _eval_loss(model_dir: Path) -> float:
    from moe_core.corpus import embedded_corpus
    from moe_core.evaluate import evaluate_text
    from moe_core.loading import load_model
    from moe_core.tokenizer import Tokenizer

    model = load_model(model_dir).eval()
    text = embedded_corpus("eval")
    return evaluate_text(model, Tokenizer.from_dir(model_dir), text, seq_len=SEQ_LEN, max_tokens=32768).loss


def _tokens_per_s(rows: list[dict[str, Any]], workers: int) -> float:
    tail = rows[len(rows) // 2 :]  # the second half: past Ray's warm-up
    return workers * sum(r["tokens_per_s"] for r in tail) / len(tail)


def _chat(model_dir: Path, port: int) -> tuple[str, float]:
    """Deploy the model (EP=2 replica, autoscaling 1..2), ask one question through the OpenAI API, tear down."""
    import openai
    from ray import serve

    from serve.app import build_app

    options = {
        "model_dir": str(model_dir),
        "model_name": "upmoe-demo",
        "ep": 2,
        "max_seq_len": 512,
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 4,
    }
    started = time.perf_counter()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(options), name="upmoe", route_prefix="/")
        ready_s = time.perf_counter() - started
        print(f"    endpoint ready in {ready_s:.0f} s at http://127.0.0.1:{port}/v1 (one replica = 2 EP ranks)")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="demo", max_retries=0, timeout=120)
        question = "Tell me a short story about a fox."
        reply = client.chat.completions.create(
            model="upmoe-demo", messages=[{"role": "user", "content": question}], max_tokens=48, temperature=0
        )
        print(f"    user: {question}\n    upmoe-demo: {reply.choices[0].message.content!r}")
        return reply.choices[0].message.content or "", ready_s
    finally:
        serve.shutdown()


def _loss_png(out: Path, curves: dict[str, list[dict[str, Any]]], tokens_per_step: dict[str, int]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, rows in curves.items():
        ax.plot([r["step"] * tokens_per_step[label] for r in rows], [r["lm_loss"] for r in rows], label=label)
    ax.set_xlabel("continued-pretraining tokens")
    ax.set_ylabel("training LM loss")
    ax.set_title("upcycled MoE vs dense, same tokens")
    ax.legend()
    fig.tight_layout()
    path = out / "loss_curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(name: str, args: argparse.Namespace) -> int:
    import ray

    start = time.perf_counter()
    plan = Plan(args.pretrain_steps, args.train_steps, args.micro_batch)
    out = args.out.absolute()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    runs = out / "runs"
    seed, dense, moe0 = out / "dense-init", out / "dense", out / "moe-upcycled"
    try:
        _stage(1, f"a tiny dense Qwen2, pretrained for {plan.pretrain_steps} steps with Ray Train")
        _run("init", str(seed), "--preset", "debug")
        _train(seed, runs / "pretrain", plan.pretrain_steps, 16, "--lr", "3e-3", "--warmup", "20")
        _run("export", str(runs / "pretrain"), str(dense))

        _stage(2, "upcycle with the Qwen2 recipe: 64 routed + 8 shared experts of 32, top-8 (a Ray job)")
        _run("upcycle", str(dense), str(moe0), "--expert-size", "32", "--no-progress")
        step0 = json.loads((moe0 / "upcycle_report.json").read_text())["step0"]

        _stage(3, f"continue pretraining for {plan.continued_tokens:,} tokens: MoE with EP=2, dense as baseline")
        common = ("--workers", "2", "--lr", "1e-3", "--warmup", "10")
        moe_rows = _train(
            moe0, runs / "moe", plan.train_steps, plan.micro_batch, *common, "--ep", "2", "--aux-loss", "global"
        )
        dense_rows = _train(dense, runs / "dense", plan.train_steps, plan.micro_batch, *common)
        _run("export", str(runs / "moe"), str(out / "moe"))
        _run("export", str(runs / "dense"), str(out / "dense-continued"))

        _stage(4, "evaluate both on the held-out embedded text")
        final = {"moe": _eval_loss(out / "moe"), "dense": _eval_loss(out / "dense-continued")}

        _stage(5, "serve the trained MoE with Ray Serve and chat with it through the OpenAI API")
        reply, ready_s = _chat(out / "moe", args.port)

        _stage(6, "summary")
        tokens_per_step = {
            "upcycled MoE (EP=2)": 2 * plan.micro_batch * SEQ_LEN,
            "dense baseline": 2 * plan.micro_batch * SEQ_LEN,
        }
        png = _loss_png(out, {"upcycled MoE (EP=2)": moe_rows, "dense baseline": dense_rows}, tokens_per_step)
        summary = {
            "step0_dense_loss": step0["dense_loss"],
            "step0_upcycled_loss": step0["moe_loss"],
            "final_moe_loss": final["moe"],
            "final_dense_loss": final["dense"],
            "continued_tokens": plan.continued_tokens,
            "moe_load_cv_first": moe_rows[0]["load/cv_mean"],
            "moe_load_cv_last": moe_rows[-1]["load/cv_mean"],
            "moe_tokens_per_s": _tokens_per_s(moe_rows, 2),
            "dense_tokens_per_s": _tokens_per_s(dense_rows, 2),
            "endpoint_ready_s": ready_s,
            "reply": reply,
            "seconds": time.perf_counter() - start,
        }
        _print_summary(summary, png)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    return 0


def _print_summary(s: dict[str, Any], png: Path) -> None:
    print("| measurement | dense | upcycled MoE |")
    print("|---|---|---|")
    print(
        f"| held-out loss at step 0 (right after upcycling) | {s['step0_dense_loss']:.4f} | "
        f"{s['step0_upcycled_loss']:.4f} |"
    )
    print(
        f"| held-out loss after {s['continued_tokens']:,} more tokens | {s['final_dense_loss']:.4f} | "
        f"{s['final_moe_loss']:.4f} |"
    )
    print(
        f"| expert-load CV (first → last training step) | - | {s['moe_load_cv_first']:.3f} → "
        f"{s['moe_load_cv_last']:.3f} |"
    )
    print(f"| training tokens/s (2 CPU workers) | {s['dense_tokens_per_s']:,.0f} | {s['moe_tokens_per_s']:,.0f} |")
    print(f"\nloss curves: {png}")
    print(f"done in {s['seconds'] / 60:.1f} min")
    print(json.dumps(s))
