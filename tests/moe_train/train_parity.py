"""A well-conditioned comparison of a parallel training run with the one-process reference.

Losses, gradient norms and gradients are compared tightly: they are sums of the same terms in another order, so
they agree to fp32 rounding whatever the BLAS kernels. Weights after AdamW steps are not, element by element:
Adam's update lr·m̂/(√v̂ + ε) divides by the gradient's own magnitude, so where an element's gradient has
cancelled to almost nothing (an embedding row whose occurrences pull in opposite directions) rounding noise of
1e-12 becomes an update of order lr. Such an element says nothing about parallelism.

So the reference run records, per element, whether √v̂ ever fell below ``CONDITION`` × the RMS √v̂ of its tensor
(of its expert, for expert parameters) while being nonzero (``ill``). Examples: attention's key bias, whose exact
gradient is zero (softmax ignores a shift shared by all keys), and embedding elements whose gradient cancels.
Well-conditioned elements must match within ``TOL``; ill-conditioned ones only within what
Adam can move any element in the run (``adam_step_bound`` per step, for both runs), and they must stay rare. A
gradient reduced over the wrong group changes every expert gradient by O(1) relative, which the gradient check and
the well-conditioned weights both catch (the tests prove it with a deliberately broken run).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp

from moe_core.loading import load_model, save_model
from moe_core.model import CausalLM, next_token_loss
from moe_core.registry import get_preset
from moe_core.state_dict_adapter import is_expert_param
from moe_train.config import TrainConfig
from moe_train.loop import accumulate_global_batch, build_rank_model, build_stepper, lr_at, mean_over_ranks
from moe_train.optim import ADAM_BETAS, build_adamw

STEPS, ROWS_PER_RANK, SEQ, LR = 3, 2, 24, 1e-3
TOL = 1e-5
CONDITION = 1e-3  # an element is ill-conditioned where √v̂ < CONDITION · RMS(√v̂) of its tensor
MAX_ILL_FRACTION = 0.01


def adam_step_bound(step: int, betas: tuple[float, float] = ADAM_BETAS) -> float:
    """The largest |m̂/√v̂| torch's AdamW can take at ``step`` (1-based), whatever the gradients.

    m̂ = Σ_k w_k g_k and v̂ = Σ_k u_k g_k² with the bias-corrected EMA weights, so by Cauchy-Schwarz
    |m̂| ≤ √(Σ w_k²/u_k) · √v̂.
    """
    b1, b2 = betas
    w = [(1 - b1) * b1 ** (step - k) / (1 - b1**step) for k in range(1, step + 1)]
    u = [(1 - b2) * b2 ** (step - k) / (1 - b2**step) for k in range(1, step + 1)]
    return math.sqrt(sum(wk * wk / uk for wk, uk in zip(w, u, strict=True)))


def ill_conditioned(name: str, exp_avg_sq: torch.Tensor, step: int, beta2: float = ADAM_BETAS[1]) -> torch.Tensor:
    """The elements of parameter ``name`` whose AdamW update is ill-conditioned after ``step`` steps: √v̂ above 0
    but below ``CONDITION`` · the RMS of √v̂ over its tensor."""
    root_v = (exp_avg_sq / (1 - beta2**step)).sqrt()
    # Each expert is a tensor of its own: a rarely routed one has small gradients, not noisy ones.
    dims = tuple(range(1, root_v.ndim)) if is_expert_param(name) else tuple(range(root_v.ndim))
    rms = root_v.pow(2).mean(dim=dims, keepdim=True).sqrt()
    return (root_v > 0) & (root_v < CONDITION * rms)


class ConditioningTracker:
    """Follows a reference torch AdamW: which elements' updates were ill-conditioned, and the bound on drift."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        self.names = {p: n for n, p in model.named_parameters()}
        self.opt = opt
        self.ill: dict[str, torch.Tensor] = {n: torch.zeros_like(p, dtype=torch.bool) for p, n in self.names.items()}
        self.drift_bound = 0.0

    def after_step(self) -> None:
        """Call after each ``opt.step()``."""
        step = 0
        for group in self.opt.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                state = self.opt.state[p]
                step = int(state["step"])
                name = self.names[p]
                self.ill[name] |= ill_conditioned(name, state["exp_avg_sq"], step, beta2)
        lr = max(group["lr"] for group in self.opt.param_groups)
        # Both runs may move an ill-conditioned element this far, in opposite directions.
        self.drift_bound += 2 * lr * adam_step_bound(step)


def local_part(name: str, full: torch.Tensor, first_expert: int, per_rank: int) -> torch.Tensor:
    """The slice of a reference tensor a rank holds: its experts for expert parameters, everything otherwise."""
    return full[first_expert : first_expert + per_rank] if is_expert_param(name) else full


def max_diffs(
    record: dict, ref: dict, tracker: ConditioningTracker, per_rank: int, kinds: tuple[str, ...] = ("grads",)
) -> dict[str, float]:
    """Largest deviations of one rank's ``record`` from the reference, by kind.

    ``record`` and ``ref`` hold ``losses``, optionally ``norms``, the first step's reduced gradients under each
    of ``kinds`` and the final ``state`` (the model's state dict); ``record["first"]`` is the rank's first expert.
    The returned ``ill_drift`` is the largest ill-conditioned deviation as a fraction of its bound (≤ 1 passes),
    ``ill_fraction`` the share of ill-conditioned elements in the rank's parameters.
    """
    first = record["first"]
    diffs = {"loss": max(abs(a - b) for a, b in zip(record["losses"], ref["losses"], strict=True))}
    if "norms" in record:
        diffs["grad_norm"] = max(abs(a - b) for a, b in zip(record["norms"], ref["norms"], strict=True))
    for kind in kinds:
        if record.get(kind):
            assert set(record[kind]) == set(ref[kind]), kind
            diffs[kind] = max(
                (v - local_part(n, ref[kind][n], first, per_rank)).abs().max().item() for n, v in record[kind].items()
            )
    assert set(record["state"]) == set(ref["state"])
    weights = ill_drift = 0.0
    ill_count = total = 0
    for name, value in record["state"].items():
        diff = (value - local_part(name, ref["state"][name], first, per_rank)).abs()
        if name in tracker.ill:
            ill = local_part(name, tracker.ill[name], first, per_rank)
            ill_count, total = ill_count + int(ill.sum()), total + ill.numel()
            if ill.any():
                ill_drift = max(ill_drift, diff[ill].max().item() / (tracker.drift_bound + TOL))
            diff = diff[~ill]
        if diff.numel():
            weights = max(weights, diff.max().item())
    diffs.update(weights=weights, ill_drift=ill_drift, ill_fraction=ill_count / max(total, 1))
    return diffs


def assert_matches(diffs: dict[str, float], context: str) -> None:
    tight = {k: v for k, v in diffs.items() if k not in ("ill_drift", "ill_fraction")}
    assert all(v <= TOL for v in tight.values()), f"{context}: {diffs}"
    assert diffs["ill_drift"] <= 1.0, f"{context}: an ill-conditioned weight moved beyond Adam's bound: {diffs}"
    assert diffs["ill_fraction"] <= MAX_ILL_FRACTION, f"{context}: too many ill-conditioned elements: {diffs}"


def batches(world: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(0, 1024, (world * ROWS_PER_RANK, SEQ), generator=gen) for _ in range(STEPS)]


def parity_config(
    model_dir: Path,
    *,
    world: int,
    ep: int,
    zero_stage: int,
    grad_accum: int,
    grad_clip: float,
    sharding: str | None = None,
) -> dict:
    return dict(
        model=str(model_dir),
        data="unused",
        out="unused",
        workers=world,
        ep=ep,
        steps=STEPS,
        seq_len=SEQ,
        micro_batch=ROWS_PER_RANK // grad_accum,
        grad_accum=grad_accum,
        lr=LR,
        grad_clip=grad_clip,
        aux_loss="none",  # the per-micro-batch Switch loss depends on how the batch is split; the LM loss does not
        zero_stage=zero_stage,
        sharding=sharding,
    )


def reference_run(model_dir: Path, cfg: TrainConfig, world: int) -> tuple[dict, ConditioningTracker]:
    """One process, every expert, the whole global batch at once: torch AdamW and clip_grad_norm_."""
    model = load_model(model_dir).train()
    opt = build_adamw(model.parameters(), cfg)
    tracker = ConditioningTracker(model, opt)
    losses, norms, first_grads = [], [], {}
    for step, batch in enumerate(batches(world)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        opt.zero_grad()
        loss = next_token_loss(model(batch).logits, batch)
        loss.backward()
        first_grads = first_grads or {n: p.grad.clone() for n, p in model.named_parameters()}
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
        opt.step()
        tracker.after_step()
        losses.append(loss.item())
    return {"losses": losses, "norms": norms, "grads": first_grads, "state": model.state_dict()}, tracker


def parity_model(out: Path) -> Path:
    """The debug MoE every parity test trains, with decisive routers (as in test_expert_parallel)."""
    model = CausalLM(get_preset("debug-moe"))
    model.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    save_model(model, out)
    return out


def train_rank(rank: int, world: int, cfg: TrainConfig) -> dict:
    """This rank's share of every global batch, through the loop's stepper, as ``_train_steps`` runs it: losses,
    norms, the first step's reduced gradients and the final weights (this rank's experts, whole)."""
    model, groups = build_rank_model(cfg, rank, world)
    stepper = build_stepper(cfg, model, groups, world)
    losses, norms, first_grads = [], [], {}
    for step, batch in enumerate(batches(world)):
        stepper.set_lr(lr_at(step, cfg))
        mine = batch[rank * ROWS_PER_RANK : (rank + 1) * ROWS_PER_RANK]
        parts, _ = accumulate_global_batch(stepper, list(mine.split(cfg.micro_batch)))
        if not first_grads and hasattr(stepper, "reduced_grads"):
            first_grads = stepper.reduced_grads()
        norms.append(stepper.step())
        losses.append(mean_over_ranks(parts, world)["lm_loss"])
    if hasattr(stepper, "full_rank_state"):
        state = stepper.full_rank_state()
    else:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    first = groups.layout.first_expert(rank)
    return {"losses": losses, "norms": norms, "grads": first_grads, "state": state, "first": first}


def spawn_cases(tmp_path_factory, configs: dict[str, tuple[int, dict]], worker: Callable, prefix: str) -> dict:
    """Run every case (name -> (world, config)) with ``worker(rank, world, {case: config}, out_dir)``, one spawn
    per world size; returns world -> the directory its ranks wrote ``{case}-rank{r}.pt`` into."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    out = {}
    for world in sorted({w for w, _ in configs.values()}):
        mine = {case: config for case, (w, config) in configs.items() if w == world}
        out[world] = tmp_path_factory.mktemp(f"{prefix}-world{world}")
        mp.spawn(worker, args=(world, mine, str(out[world])), nprocs=world, join=True)
    return out
