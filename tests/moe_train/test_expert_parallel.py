"""The defining EP test: EP=N over N CPU processes (gloo) trains exactly like one process with every expert.

Same global batch and data order; per-step losses, the first step's reduced gradients and the weights after 3
AdamW steps agree within 1e-5 (fp32), compared as ``train_parity`` explains (weights where Adam's update is
well-conditioned). Also EP=2 × DP=2 on 4 processes vs one process, and the layout's validation. Each spawn also
trains once with expert gradients reduced over the whole world (the wrong group), which the check must reject.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from train_parity import TOL, ConditioningTracker, assert_matches, max_diffs

from moe_core.loading import load_model, save_model
from moe_core.model import CausalLM, next_token_loss
from moe_core.registry import get_preset
from moe_train.expert_parallel import (
    ParallelLayout,
    ParallelLayoutError,
    ProcessGroups,
    build_process_groups,
    install_expert_parallel,
    reduce_gradients,
)

STEPS, ROWS_PER_RANK, SEQ = 3, 2, 24


def _batches(world: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(0, 1024, (world * ROWS_PER_RANK, SEQ), generator=gen) for _ in range(STEPS)]


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _reference(model_dir: Path, world: int) -> tuple[dict, ConditioningTracker]:
    model = load_model(model_dir).train()
    opt = _optimizer(model)
    tracker = ConditioningTracker(model, opt)
    losses, first_grads = [], {}
    for batch in _batches(world):
        loss = next_token_loss(model(batch).logits, batch)
        opt.zero_grad()
        loss.backward()
        first_grads = first_grads or _grads(model)
        opt.step()
        tracker.after_step()
        losses.append(loss.item())
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"losses": losses, "state": state, "grads": first_grads}, tracker


@torch.no_grad()
def _reduce_over_world(model: torch.nn.Module, groups: ProcessGroups) -> None:
    """The bug the parity check must catch: expert gradients averaged over every rank, not their expert-DP group."""
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad.div_(groups.layout.world_size)


def _train(rank: int, world: int, ep: int, model_dir: str, reduce) -> dict:
    cfg = get_preset("debug-moe")
    layout = ParallelLayout(world_size=world, ep_size=ep, num_experts=cfg.num_experts)
    groups = build_process_groups(layout)
    model = load_model(
        model_dir, first_expert=layout.first_expert(rank), num_local_experts=layout.experts_per_rank
    ).train()
    install_expert_parallel(model, groups)
    opt = _optimizer(model)
    losses, first_grads = [], {}
    for batch in _batches(world):
        mine = batch[rank * ROWS_PER_RANK : (rank + 1) * ROWS_PER_RANK]
        loss = next_token_loss(model(mine).logits, mine)
        opt.zero_grad()
        loss.backward()
        reduce(model, groups)
        first_grads = first_grads or _grads(model)
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / world)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"losses": losses, "state": state, "grads": first_grads, "first": layout.first_expert(rank)}


def _worker(rank: int, world: int, ep: int, model_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/pg", rank=rank, world_size=world)
    for variant, reduce in (("right", reduce_gradients), ("wrong-group", _reduce_over_world)):
        torch.save(_train(rank, world, ep, model_dir, reduce), f"{out_dir}/{variant}-rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _run_parallel(tmp_path: Path, model_dir: Path, world: int, ep: int) -> dict[str, list[dict]]:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    mp.spawn(_worker, args=(world, ep, str(model_dir), str(tmp_path)), nprocs=world, join=True)
    return {v: [torch.load(tmp_path / f"{v}-rank{r}.pt") for r in range(world)] for v in ("right", "wrong-group")}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    model = CausalLM(get_preset("debug-moe"))
    model.init_weights(torch.Generator().manual_seed(0))
    # Stronger routers than the default init so the top-k choices are decisive and balanced-ish.
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    out = tmp_path_factory.mktemp("ep") / "model"
    save_model(model, out)
    return out


def _assert_same_training(results: dict[str, list[dict]], model_dir: Path, world: int, ep: int) -> None:
    ref, tracker = _reference(model_dir, world)
    for rank, record in enumerate(results["right"]):
        diffs = max_diffs(record, ref, tracker, per_rank=64 // ep)
        print(f"EP={ep} world={world} rank {rank}: {diffs}")
        assert_matches(diffs, f"rank {rank}")
    for rank, record in enumerate(results["wrong-group"]):
        diffs = max_diffs(record, ref, tracker, per_rank=64 // ep)
        print(f"EP={ep} world={world} rank {rank}, expert gradients reduced over the world: {diffs}")
        assert diffs["grads"] > 100 * TOL and diffs["weights"] > 10 * TOL, diffs


@pytest.mark.slow
def test_ep2_matches_single_process(tmp_path: Path, model_dir: Path) -> None:
    _assert_same_training(_run_parallel(tmp_path, model_dir, world=2, ep=2), model_dir, world=2, ep=2)


@pytest.mark.slow
def test_ep2_dp2_matches_single_process(tmp_path: Path, model_dir: Path) -> None:
    _assert_same_training(_run_parallel(tmp_path, model_dir, world=4, ep=2), model_dir, world=4, ep=2)


def test_layout_groups_and_validation() -> None:
    layout = ParallelLayout(world_size=8, ep_size=4, num_experts=64)
    assert layout.experts_per_rank == 16
    assert layout.ep_group_ranks(5) == [4, 5, 6, 7]
    assert layout.expert_dp_group_ranks(5) == [1, 5]
    assert layout.first_expert(6) == 32
    with pytest.raises(ParallelLayoutError, match="divide the world size"):
        ParallelLayout(world_size=6, ep_size=4, num_experts=64)
    with pytest.raises(ParallelLayoutError, match="routed expert count"):
        ParallelLayout(world_size=6, ep_size=6, num_experts=64)
