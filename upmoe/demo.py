"""``upmoe demo``: the whole product on the embedded defaults, end to end, with real measured numbers.

1. ``upmoe init`` a tiny dense Qwen2 (``debug``) with a BPE tokenizer trained on the embedded corpus, and
   pretrain it with ``upmoe train`` (Ray Train, 1 worker); ``upmoe export`` it;
2. ``upmoe upcycle`` it into 64 routed + 8 shared experts, top-8 (a Ray job), with the init the upcycling study
   chose (``DEMO_RECIPE``; docs/upcycling.md);
3. continue pretraining the MoE with ``upmoe train --workers 2 --ep 2`` (all-to-all expert parallelism) and,
   as the baseline, the dense model on the same tokens of text neither has seen (``fresh_corpus``), with the
   study's schedule (``DEMO_SCHEDULE``); both log their held-out loss 8 times on the way; export both;
4. the two held-out curves from step 0, the token count from which the MoE stays ahead (if any), and the
   compute each used (active parameters, training FLOPs per token);
5. serve the MoE with Ray Serve (one EP=2 replica, autoscaling on) and ask it a question through the
   OpenAI-compatible API; shut down;
6. print a summary table and the verdict, write ``summary.json`` and a loss-curve PNG.

``bench/upcycling_study.py`` reuses stages 1-3 (with the ``valid`` split instead of the held-out one) to sweep
the settings.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass
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


def run_upmoe(*args: str) -> None:
    """Run one ``upmoe`` subcommand in this process (Ray, once started, stays up for the next one)."""
    print(f"    $ upmoe {' '.join(args)}", flush=True)
    if upmoe(list(args)) != 0:
        raise RuntimeError(f"upmoe {args[0]} failed (see above)")


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    from moe_train.tracking import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


def train(
    model: Path, run_dir: Path, steps: int, micro_batch: int, *extra: str, data: str = "embedded"
) -> list[dict[str, Any]]:
    """``upmoe train`` on ``data`` at SEQ_LEN, one checkpoint at the end; returns metrics.jsonl's rows."""
    run_upmoe(
        "train",
        "--model",
        str(model),
        "--data",
        data,
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


def pretrain_base(out: Path, steps: int) -> Path:
    """``upmoe init`` a ``debug`` dense Qwen2, pretrain it for ``steps`` and export it to ``out/dense``."""
    seed, dense = out / "dense-init", out / "dense"
    run_upmoe("init", str(seed), "--preset", "debug")
    train(seed, out / "runs" / "pretrain", steps, 16, "--lr", "3e-3", "--warmup", "20")
    run_upmoe("export", str(out / "runs" / "pretrain"), str(dense))
    return dense


@dataclass(frozen=True)
class Recipe:
    """How the dense base becomes a MoE: 64 routed + 8 shared experts of 32, top-8, with this init."""

    init: str = "qwen2"
    reinit_ratio: float = 0.5
    router_std: float = 0.02
    # Renormalise the top-8 weights to sum to 1: without it they sum to ~8/64 at a near-uniform router, which
    # scales the routed experts' outputs, and so their gradients, down 8x.
    norm_topk_prob: bool = False

    def upcycle_args(self) -> tuple[str, ...]:
        args = ("--init", self.init, "--reinit-ratio", str(self.reinit_ratio), "--router-std", str(self.router_std))
        return (*args, "--norm-topk-prob" if self.norm_topk_prob else "--no-norm-topk-prob")


def upcycle(dense: Path, moe_dir: Path, recipe: Recipe) -> dict[str, float]:
    """``upmoe upcycle`` with ``recipe``; returns the report's step-0 losses (held-out, dense and MoE)."""
    run_upmoe("upcycle", str(dense), str(moe_dir), "--expert-size", "32", "--no-progress", *recipe.upcycle_args())
    return json.loads((moe_dir / "upcycle_report.json").read_text())["step0"]


@dataclass(frozen=True)
class Schedule:
    """Continued pretraining after upcycling, the same for the MoE and the dense baseline (2 workers each)."""

    lr: float = 1e-3
    warmup: int = 10
    aux_coef: float = 0.001  # MoE only: the global load-balancing loss
    seed: int = 0  # data order: another seed measures how much of a gap is noise

    def train_args(self, moe: bool) -> tuple[str, ...]:
        args = ("--workers", "2", "--lr", str(self.lr), "--warmup", str(self.warmup), "--seed", str(self.seed))
        return (*args, "--ep", "2", "--aux-loss", "global", "--aux-coef", str(self.aux_coef)) if moe else args


# The setting docs/upcycling.md's study chose on the valid split (bench/upcycling_study.py): an exact start with the
# routed experts' output not scaled down 8x, both models continued at the base's pretraining peak LR, where the
# MoE led the dense run at every evaluation for both data orders tried. (At 6e-3, the dense model's best LR, the
# lead was within seed noise: one seed each way.)
DEMO_RECIPE = Recipe(init="preserve", norm_topk_prob=True)
DEMO_SCHEDULE = Schedule(lr=3e-3)
# The embedded corpus has ~3.1 characters per token: 4 per continued token leave every block unrepeated.
CHARS_PER_TOKEN = 4


def fresh_corpus(path: Path, num_chars: int) -> Path:
    """``num_chars`` of embedded-corpus text that comes after the base's pretraining text: new documents of
    the same distribution (the same invented world, so its facts agree), none of which the base has seen.

    Continuing on the base's own corpus instead replays it: the same seed gives the same block order, so the
    continued run's first epoch repeats pretraining batch for batch, and what extra capacity buys there is
    memorised training text, not held-out loss (docs/upcycling.md).
    """
    from moe_core.corpus import embedded_corpus

    seen = len(embedded_corpus("train"))
    # A shorter request is a prefix of a longer one, so everything past the default split is unseen text.
    text = embedded_corpus("train", seen + num_chars)[seen:].lstrip("\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def continue_training(
    model: Path,
    run_dir: Path,
    plan: Plan,
    schedule: Schedule,
    *,
    moe: bool,
    data: str,
    eval_split: str,
    eval_every: int,
) -> list[dict[str, Any]]:
    """Continue pretraining ``model`` on ``data`` (EP=2 if ``moe``), logging ``eval_split``'s loss every
    ``eval_every`` steps and at the end (``eval_loss`` rows)."""
    evals = ("--eval-data", f"embedded:{eval_split}", "--eval-every", str(eval_every))
    return train(model, run_dir, plan.train_steps, plan.micro_batch, *schedule.train_args(moe), *evals, data=data)


def step0_loss(model_dir: Path, run_dir: Path) -> float:
    """``model_dir``'s loss on the eval blocks ``upmoe train`` logged for ``run_dir``: the curve's point at 0 tokens,
    measured exactly as its ``eval_loss`` rows are (same packed blocks, same mean)."""
    import torch

    from moe_core.evaluate import evaluate_blocks
    from moe_core.loading import load_model

    return evaluate_blocks(load_model(model_dir), torch.load(run_dir / "data" / "eval_blocks.pt"))


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


def crossover(moe: list[tuple[int, float]], dense: list[tuple[int, float]]) -> int | None:
    """The first evaluated token count (past 0) from which the MoE's loss stays below the dense one to the end of
    the run; None if it never does. Both curves are (tokens, loss) at the same token counts."""
    pairs = [(t, m, d) for (t, m), (_, d) in zip(moe, dense, strict=True) if t > 0]
    for i, (tokens, _, _) in enumerate(pairs):
        if all(m < d for _, m, d in pairs[i:]):
            return tokens
    return None


def loss_curve(model_dir: Path, run_dir: Path, rows: list[dict[str, Any]], plan: Plan) -> list[tuple[int, float]]:
    """(continued tokens, eval loss) from step 0 to the end of a continued run."""
    per_step = plan.continued_tokens // plan.train_steps
    logged = [(r["step"] * per_step, r["eval_loss"]) for r in rows if "eval_loss" in r]
    return [(0, step0_loss(model_dir, run_dir)), *logged]


def _compute(model_dir: Path, tokens: int) -> dict[str, float]:
    """Active parameters, training FLOPs per token (6·N_active + attention, the MFU convention) and in total."""
    from moe_core.config import load_config
    from moe_core.params import count_parameters
    from moe_train.tracking import flops_per_token

    cfg = load_config(model_dir)
    per_token = flops_per_token(cfg, SEQ_LEN)
    return {"active_params": count_parameters(cfg).activated, "flops_per_token": per_token, "flops": per_token * tokens}


def _loss_png(out: Path, curves: dict[str, list[tuple[int, float]]], cross: int | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, curve in curves.items():
        ax.plot(*zip(*curve, strict=True), marker=".", label=label)
    if cross is not None:
        ax.axvline(cross, color="gray", ls=":", label=f"MoE ahead from {cross:,} tokens")
    ax.set_xlabel("continued-pretraining tokens")
    ax.set_ylabel("held-out loss")
    ax.set_ylim(top=min(ax.get_ylim()[1], 2 * curves["dense baseline"][0][1]))
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
    runs, moe0 = out / "runs", out / "moe-upcycled"
    try:
        _stage(1, f"a tiny dense Qwen2, pretrained for {plan.pretrain_steps} steps with Ray Train")
        dense = pretrain_base(out, plan.pretrain_steps)

        _stage(2, f"upcycle with the {DEMO_RECIPE.init} init: 64 routed + 8 shared experts of 32, top-8 (a Ray job)")
        upcycle(dense, moe0, DEMO_RECIPE)

        _stage(3, f"continue pretraining both on the same {plan.continued_tokens:,} unseen tokens: MoE with EP=2")
        data = str(fresh_corpus(out / "corpus" / "fresh.txt", CHARS_PER_TOKEN * plan.continued_tokens))
        every = -(-plan.train_steps // 8)  # 8 points on each curve, besides step 0
        train_runs = {"moe": (moe0, runs / "moe", True), "dense": (dense, runs / "dense", False)}
        rows = {
            key: continue_training(
                model, run_dir, plan, DEMO_SCHEDULE, moe=moe, data=data, eval_split="eval", eval_every=every
            )
            for key, (model, run_dir, moe) in train_runs.items()
        }
        run_upmoe("export", str(runs / "moe"), str(out / "moe"))
        run_upmoe("export", str(runs / "dense"), str(out / "dense-continued"))

        _stage(4, "held-out loss curves of both, from step 0, and the compute each used")
        curves = {key: loss_curve(model, run_dir, rows[key], plan) for key, (model, run_dir, _) in train_runs.items()}
        compute = {key: _compute(model, plan.continued_tokens) for key, (model, _, _) in train_runs.items()}

        _stage(5, "serve the trained MoE with Ray Serve and chat with it through the OpenAI API")
        reply, ready_s = _chat(out / "moe", args.port)

        _stage(6, "summary")
        cross = crossover(curves["moe"], curves["dense"])
        png = _loss_png(out, {"upcycled MoE (EP=2)": curves["moe"], "dense baseline": curves["dense"]}, cross)
        summary = _summary(plan, curves, compute, cross, rows["moe"])
        summary.update(
            moe_tokens_per_s=_tokens_per_s(rows["moe"], 2),
            dense_tokens_per_s=_tokens_per_s(rows["dense"], 2),
            endpoint_ready_s=ready_s,
            reply=reply,
            seconds=time.perf_counter() - start,
        )
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        _print_summary(summary, png)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    return 0


def _summary(
    plan: Plan,
    curves: dict[str, list[tuple[int, float]]],
    compute: dict[str, dict[str, float]],
    cross: int | None,
    moe_rows: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "tokens": plan.continued_tokens,
        "dense_step0_loss": curves["dense"][0][1],
        "moe_step0_loss": curves["moe"][0][1],
        "dense_final_loss": curves["dense"][-1][1],
        "moe_final_loss": curves["moe"][-1][1],
        "crossover_tokens": cross,
        "dense_curve": curves["dense"],
        "moe_curve": curves["moe"],
        **{f"{key}_{k}": v for key, c in compute.items() for k, v in c.items()},
        "moe_load_cv_first": moe_rows[0]["load/cv_mean"],
        "moe_load_cv_last": moe_rows[-1]["load/cv_mean"],
        "recipe": asdict(DEMO_RECIPE),
        "schedule": asdict(DEMO_SCHEDULE),
    }


def _verdict(s: dict[str, Any]) -> str:
    if s["crossover_tokens"] is not None:
        return (
            f"the upcycled MoE passes the dense baseline at {s['crossover_tokens']:,} tokens and stays ahead: "
            f"{s['moe_final_loss']:.4f} vs {s['dense_final_loss']:.4f} after {s['tokens']:,}, at "
            f"{s['moe_flops_per_token'] / s['dense_flops_per_token']:.2f}x the FLOPs per token\n"
            "(a lead of thousandths of a nat at this toy scale; docs/upcycling.md has the seeds and LRs behind it)"
        )
    gaps = [m - d for (_, m), (_, d) in zip(s["moe_curve"], s["dense_curve"], strict=True)]
    return (
        f"the upcycled MoE does NOT pass the dense baseline within {s['tokens']:,} tokens; its gap went "
        f"{gaps[1]:+.4f} -> {gaps[-1]:+.4f} (docs/upcycling.md has the study and the trend)"
    )


def _print_summary(s: dict[str, Any], png: Path) -> None:
    print("| measurement | dense | upcycled MoE |")
    print("|---|---|---|")
    row = "| held-out loss {} | {:.4f} | {:.4f} |"
    print(row.format("at step 0 (right after upcycling)", s["dense_step0_loss"], s["moe_step0_loss"]))
    print(row.format(f"after {s['tokens']:,} more tokens", s["dense_final_loss"], s["moe_final_loss"]))
    print(f"| active parameters | {s['dense_active_params']:,} | {s['moe_active_params']:,} |")
    print(
        f"| training FLOPs per token (6·N_active + attention) | {s['dense_flops_per_token'] / 1e6:.2f} M | "
        f"{s['moe_flops_per_token'] / 1e6:.2f} M |"
    )
    print(f"| training FLOPs, continued run | {s['dense_flops']:.3g} | {s['moe_flops']:.3g} |")
    print(
        f"| expert-load CV (first → last training step) | - | {s['moe_load_cv_first']:.3f} → "
        f"{s['moe_load_cv_last']:.3f} |"
    )
    print(f"| training tokens/s (2 CPU workers) | {s['dense_tokens_per_s']:,.0f} | {s['moe_tokens_per_s']:,.0f} |")
    print(f"\n{_verdict(s)}")
    print(f"loss curves: {png}; summary: {png.parent / 'summary.json'}")
    print(f"done in {s['seconds'] / 60:.1f} min")
    print(json.dumps(s))
