"""``upmoe bench upcycling-study``: does upcycling pay at the demo's scale, and with which settings?

The demo's pipeline (``upmoe.demo``): one dense ``debug`` base pretrained once, then for every setting of
``SETTINGS`` either a dense continued run or an upcycle (init, re-init ratio, router std) followed by a MoE
continued run (EP=2), all on the same tokens through ``upmoe train`` with Ray Train. Every run logs its loss on
the embedded ``valid`` split every ``--eval-every`` steps: settings are chosen on that split, never on the
held-out ``eval`` one (the demo reports that, once). Results are appended to ``OUT/results.jsonl`` (one line per
setting, re-running a setting replaces it), so the sweep can be run in pieces with ``--only``; every call rewrites
``OUT/study.md`` (the table) and ``OUT/study.png`` (valid loss vs tokens, dense vs each init).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from upmoe.demo import (
    SEQ_LEN,
    Plan,
    Recipe,
    Schedule,
    continue_training,
    crossover,
    fresh_corpus,
    pretrain_base,
    step0_loss,
    upcycle,
)

EVAL_SPLIT = "valid"  # the tuning split; "eval" stays held out
FRESH_CHARS = 8_000_000  # ~2.5M tokens of unseen text: 3x the default 819,200 continued tokens without repeats


@dataclass(frozen=True)
class Setting:
    name: str
    why: str  # the question this run answers
    recipe: Recipe | None = None  # None: the dense baseline
    schedule: Schedule = field(default_factory=Schedule)
    steps_scale: int = 1  # x --train-steps: the token-count question
    corpus: str = "replay"  # "replay": the base's own embedded corpus (the old demo); "fresh": unseen text


def _moe(
    name: str,
    why: str,
    init: str = "qwen2",
    reinit: float = 0.5,
    std: float = 0.02,
    norm: bool = False,
    corpus: str = "replay",
    **sched: Any,
) -> Setting:
    return Setting(name, why, Recipe(init, reinit, std, norm), Schedule(**sched), corpus=corpus)


def _dense(name: str, why: str, corpus: str = "replay", **sched: Any) -> Setting:
    return Setting(name, why, None, Schedule(**sched), corpus=corpus)


def _preserve_norm(name: str, why: str, lr: float, seed: int = 0, std: float = 0.02, **sched: Any) -> Setting:
    """The demo's recipe (exact start, renormalised top-k) on unseen text at ``lr``."""
    return _moe(name, why, init="preserve", std=std, norm=True, corpus="fresh", lr=lr, seed=seed, **sched)


# In the order docs/upcycling.md ran them: the old demo's setting, the corpus (replaying the base's text vs unseen
# text), then on unseen text the init and the learning rate after upcycling (for both models: the baseline gets its
# best LR too), with a second data order for the close pairs.
SETTINGS: tuple[Setting, ...] = (
    _dense("dense-lr1e-3", "the old demo's baseline (replays the base's corpus)"),
    _moe("qwen2-lr1e-3", "the old demo's MoE"),
    _dense("fresh-dense-lr1e-3", "unseen text for the baseline", corpus="fresh"),
    _moe("fresh-qwen2-lr1e-3", "unseen text after upcycling", corpus="fresh"),
    _moe("fresh-preserve-lr1e-3", "exact dense function at step 0", init="preserve", corpus="fresh"),
    _moe("preserve-lr1e-3", "exact start, replayed corpus", init="preserve"),
    _preserve_norm("fresh-preserve-norm-lr1e-3", "exact start, top-k renormalised (8x the routed output)", 1e-3),
    _dense("fresh-dense-lr3e-3", "the pretraining peak LR for the baseline", corpus="fresh", lr=3e-3),
    _preserve_norm("fresh-preserve-norm-lr3e-3", "exact start, renormalised top-k, pretraining peak LR", 3e-3),
    _moe("fresh-preserve-lr3e-3", "exact start, pretraining peak LR", init="preserve", corpus="fresh", lr=3e-3),
    _moe("fresh-vgroup-lr1e-3", "NVIDIA virtual groups, no re-init", init="virtual-group", corpus="fresh"),
    _moe("fresh-drop-lr1e-3", "Drop-Upcycling, r=0.5", init="drop-upcycling", corpus="fresh"),
    _moe("fresh-qwen2-lr3e-3", "the pretraining peak LR after upcycling", corpus="fresh", lr=3e-3),
    _dense("fresh-dense-lr3e-3-seed1", "noise: another data order", corpus="fresh", lr=3e-3, seed=1),
    _preserve_norm("fresh-preserve-norm-lr3e-3-seed1", "noise: another data order", 3e-3, seed=1),
    _dense("fresh-dense-lr6e-3", "above the pretraining peak LR, baseline", corpus="fresh", lr=6e-3),
    _preserve_norm("fresh-preserve-norm-lr6e-3", "above the pretraining peak LR", 6e-3),
    _moe("fresh-qwen2-lr6e-3", "above the pretraining peak LR", corpus="fresh", lr=6e-3),
    _dense("fresh-dense-lr1e-2", "brackets the baseline's best LR", corpus="fresh", lr=1e-2),
    _moe("fresh-qwen2-lr3e-3-seed1", "noise: another data order", corpus="fresh", lr=3e-3, seed=1),
    _dense("fresh-dense-lr6e-3-seed1", "noise: another data order", corpus="fresh", lr=6e-3, seed=1),
    _preserve_norm("fresh-preserve-norm-lr6e-3-seed1", "noise: another data order", 6e-3, seed=1),
    # The remaining factors, at the demo's LR (3e-3) and, where the factor applies to it, the demo's recipe.
    _preserve_norm(
        "fresh-preserve-norm-aux1e-2-lr3e-3", "the demo's recipe, 10x aux-loss coefficient", 3e-3, aux_coef=0.01
    ),
    _preserve_norm("fresh-preserve-norm-std2e-3-lr3e-3", "the demo's recipe, 10x smaller router init", 3e-3, std=0.002),
    _moe("fresh-qwen2-r0-lr3e-3", "qwen2 without re-init", reinit=0.0, corpus="fresh", lr=3e-3),
    _moe("fresh-qwen2-r1-lr3e-3", "qwen2, every expert re-initialised", reinit=1.0, corpus="fresh", lr=3e-3),
    _dense("fresh-dense-warm100-lr3e-3", "a long warm-up, baseline", corpus="fresh", lr=3e-3, warmup=100),
    _preserve_norm("fresh-preserve-norm-warm100-lr3e-3", "the demo's recipe, a long warm-up", 3e-3, warmup=100),
    _dense("fresh-dense-lr3e-3-seed2", "noise: a third data order", corpus="fresh", lr=3e-3, seed=2),
    _preserve_norm("fresh-preserve-norm-lr3e-3-seed2", "noise: a third data order", 3e-3, seed=2),
    # Listed, not run for docs/upcycling.md (the factors above decided the question first).
    _dense("fresh-dense-lr3e-4", "lower LR for the baseline", corpus="fresh", lr=3e-4),
    _moe("fresh-qwen2-lr3e-4", "lower LR after upcycling", corpus="fresh", lr=3e-4),
    _moe("fresh-vgroup-lr3e-3", "NVIDIA virtual groups, no re-init", init="virtual-group", corpus="fresh", lr=3e-3),
    _moe("fresh-drop-lr3e-3", "Drop-Upcycling, r=0.5", init="drop-upcycling", corpus="fresh", lr=3e-3),
)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("upcycling_study"), help="working directory (kept: results accrue)")
    p.add_argument("--only", help="comma-separated setting names to (re-)run; default: all. --list shows them")
    p.add_argument("--list", action="store_true", help="print the settings and exit")
    p.add_argument("--pretrain-steps", type=int, default=300, help="steps of the dense base (as the demo)")
    p.add_argument("--train-steps", type=int, default=400, help="continued-pretraining steps of every run")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per worker per continued step (2 workers)")
    p.add_argument("--eval-every", type=int, default=50, help="steps between valid-split evaluations")
    p.add_argument(
        "--scale-tokens",
        type=int,
        default=1,
        help="also run the chosen settings (--only) for this many times --train-steps, as NAME-xN",
    )


def _selected(only: str | None, scale: int) -> list[Setting]:
    by_name = {s.name: s for s in SETTINGS}
    names = [n.strip() for n in only.split(",")] if only else list(by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown setting(s) {', '.join(unknown)}; --list shows them")
    chosen = [by_name[n] for n in names]
    if scale > 1:
        chosen = [
            Setting(f"{s.name}-x{scale}", f"{s.why}, {scale}x tokens", s.recipe, s.schedule, scale, s.corpus)
            for s in chosen
        ]
    return chosen


def _base(out: Path, steps: int) -> Path:
    """The dense base, pretrained once per study directory and reused by every setting."""
    dense = out / "base" / "dense"
    if not (dense / "config.json").is_file():
        pretrain_base(out / "base", steps)
    return dense


def _data(out: Path, corpus: str) -> str:
    """``--data`` for a setting's corpus; the fresh text is written once, big enough for 3x the default tokens."""
    if corpus == "replay":
        return "embedded"
    path = out / "corpus" / "fresh.txt"
    return str(path if path.is_file() else fresh_corpus(path, FRESH_CHARS))


def _run_setting(out: Path, base: Path, s: Setting, args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    plan = Plan(0, args.train_steps * s.steps_scale, args.micro_batch)
    model, run_dir = base, out / "runs" / s.name
    # A re-run starts over: `upmoe train` would otherwise resume the old run's checkpoint.
    shutil.rmtree(run_dir, ignore_errors=True)
    if s.recipe is not None:
        model = out / "moe" / s.name
        shutil.rmtree(model, ignore_errors=True)
        upcycle(base, model, s.recipe)
    rows = continue_training(
        model,
        run_dir,
        plan,
        s.schedule,
        moe=s.recipe is not None,
        data=_data(out, s.corpus),
        eval_split=EVAL_SPLIT,
        eval_every=args.eval_every,
    )
    tokens_per_step = 2 * plan.micro_batch * SEQ_LEN
    curve = [(0, step0_loss(model, run_dir))]
    curve += [(r["step"] * tokens_per_step, r["eval_loss"]) for r in rows if "eval_loss" in r]
    return {
        "name": s.name,
        "why": s.why,
        "model": "dense" if s.recipe is None else "moe",
        "recipe": asdict(s.recipe) if s.recipe else None,
        "schedule": asdict(s.schedule),
        "corpus": s.corpus,
        "tokens": plan.continued_tokens,
        "valid_curve": curve,
        "final_train_loss": sum(r["lm_loss"] for r in rows[-20:]) / len(rows[-20:]),
        "seconds": time.perf_counter() - started,
    }


def _load(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    results = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {r["name"]: r for r in results}


def _save(path: Path, results: dict[str, dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in results.values()))


def _dense_at(results: dict[str, dict[str, Any]], r: dict[str, Any]) -> dict[str, Any] | None:
    """The dense run with the same LR, warm-up, seed, corpus and token count as ``r``: its equal-tokens baseline."""
    for d in results.values():
        same = d["tokens"] == r["tokens"] and all(
            d["schedule"].get(k, 0) == r["schedule"].get(k, 0) for k in ("lr", "warmup", "seed")
        )
        if d["model"] == "dense" and same and d.get("corpus", "replay") == r.get("corpus", "replay"):
            return d
    return None


def _table(results: dict[str, dict[str, Any]]) -> str:
    head = "| setting | question | corpus | init, re-init, router std, top-k norm | LR, warm-up, aux | tokens "
    head += "| valid step 0 | valid final | vs dense, same LR | crossover tokens | train loss (last 20) |"
    head += "\n|" + "---|" * 11
    lines = [head]
    for r in results.values():
        rec, sch = r["recipe"], r["schedule"]
        # virtual-group re-initialises nothing, whatever the ratio says
        reinit = "-" if rec and rec["init"] == "virtual-group" else rec and rec["reinit_ratio"]
        recipe = "dense" if rec is None else f"{rec['init']}, {reinit}, {rec['router_std']}"
        recipe += ", norm top-k" if rec and rec.get("norm_topk_prob") else ""
        sched = f"{sch['lr']:g}, {sch['warmup']}" + ("" if rec is None else f", {sch['aux_coef']:g}")
        base = _dense_at(results, r)
        gap = cross = "-"
        if rec is not None and base is not None:
            gap = f"{r['valid_curve'][-1][1] - base['valid_curve'][-1][1]:+.4f}"
            c = crossover(r["valid_curve"], base["valid_curve"])
            cross = "none" if c is None else f"{c:,}"
        lines.append(
            f"| {r['name']} | {r['why']} | {r.get('corpus', 'replay')} | {recipe} | {sched} | {r['tokens']:,} | "
            f"{r['valid_curve'][0][1]:.4f} | "
            f"{r['valid_curve'][-1][1]:.4f} | {gap} | {cross} | {r['final_train_loss']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def _plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Left: valid loss vs tokens of the dense baseline and each init on unseen text, at the LR with the most
    such runs (the old demo's 1e-3 in the full study). Right: MoE minus dense (same LR, seed, corpus and tokens)
    vs tokens for every MoE run: the trend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def comparable(r: dict[str, Any]) -> bool:
        plain = r["schedule"].get("seed", 0) == 0 and r["schedule"]["warmup"] == 10
        return r.get("corpus") == "fresh" and r["tokens"] == min_tokens(results) and plain

    lrs = Counter(r["schedule"]["lr"] for r in results.values() if comparable(r))
    left_lr = max(sorted(lrs), key=lambda lr: lrs[lr]) if lrs else 1e-3
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5))
    right.set_prop_cycle(color=plt.get_cmap("tab20").colors)
    for r in results.values():
        if comparable(r) and r["schedule"]["lr"] == left_lr:
            style = {"color": "k", "ls": "--", "marker": "."} if r["model"] == "dense" else {}
            left.plot(*zip(*r["valid_curve"], strict=True), label=r["name"], lw=1.2, **style)
        base = _dense_at(results, r)
        if r["model"] == "moe" and base is not None:
            gaps = [(t, m - d) for (t, m), (_, d) in zip(r["valid_curve"], base["valid_curve"], strict=True) if t > 0]
            right.plot(*zip(*gaps, strict=True), marker=".", lw=1, label=r["name"])
    left.set_ylim(top=0.85)  # the step-0 points of re-initialising inits (~1.2) would flatten the rest
    left.set(
        xlabel="continued-pretraining tokens", ylabel=f"{EVAL_SPLIT}-split loss", title=f"each init, LR {left_lr:g}"
    )
    right.axhline(0, color="k", lw=0.8)
    right.set(
        xlabel="continued-pretraining tokens",
        ylabel="MoE loss - dense loss (same LR, seed, tokens)",
        title="below 0: the upcycled MoE is ahead",
    )
    right.set_ylim(-0.03, 0.03)
    for ax in (left, right):
        ax.legend(fontsize=6.5, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def min_tokens(results: dict[str, dict[str, Any]]) -> int:
    return min(r["tokens"] for r in results.values())


def run(args: argparse.Namespace) -> int:
    import ray

    if args.list:
        for s in SETTINGS:
            print(f"{s.name:28} {s.why}")
        return 0
    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.jsonl"
    try:
        base = _base(out, args.pretrain_steps)
        for s in _selected(args.only, args.scale_tokens):
            print(f"\n== {s.name}: {s.why}", flush=True)
            results = _load(path)
            results[s.name] = _run_setting(out, base, s, args)
            _save(path, results)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    results = _load(path)
    (out / "study.md").write_text(_table(results))
    _plot(results, out / "study.png")
    print(_table(results))
    print(f"plot: {out / 'study.png'}")
    return 0
