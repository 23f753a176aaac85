"""``--sharding fsdp``: FSDP2 composed with expert parallelism trains like one plain AdamW process.

Spawned CPU ranks (gloo, fp32) run the training loop's own pieces for 3 optimizer steps on the same global
batches as the single-process reference, compared as ``train_parity`` explains: losses, gradient norms, the first
step's reduced gradients (gathered whole over their mesh) within 1e-5, and well-conditioned weights after 3 steps.
One case leaves out the experts' division by EP (FSDP2 only averages over the expert-DP group): the gradient
check must reject it, since Adam's update barely sees the scale.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from train_parity import (
    TOL,
    assert_matches,
    max_diffs,
    parity_config,
    parity_model,
    reference_run,
    spawn_cases,
    train_rank,
)

from moe_train.config import TrainConfig, load_train_config

UNDIVIDED = "-undivided"  # expert gradients left at FSDP2's mean over the expert-DP group

CASES = {
    # world, ep, grad_accum, grad_clip (the global norm is about 1.0-1.6: 0.5 clips every step)
    "ep2-clip": (2, 2, 1, 0.5),
    "ep1xdp2-accum2": (2, 1, 2, 0.0),
    "ep2xdp2-accum2-clip": (4, 2, 2, 0.5),
    "ep2xdp2-clip" + UNDIVIDED: (4, 2, 1, 0.5),  # last in its world: the patch stays for the process
}


def _case_config(model_dir: Path, case: str) -> dict:
    world, ep, grad_accum, grad_clip = CASES[case]
    return parity_config(
        model_dir, world=world, ep=ep, zero_stage=0, grad_accum=grad_accum, grad_clip=grad_clip, sharding="fsdp"
    )


def _worker(rank: int, world: int, configs: dict[str, dict], out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/pg", rank=rank, world_size=world)
    for case, config in configs.items():
        if case.endswith(UNDIVIDED):
            from moe_train.fsdp import FsdpStepper

            FsdpStepper._finish_expert_reduction = lambda self: None
        torch.save(train_rank(rank, world, TrainConfig(**config)), f"{out_dir}/{case}-rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return parity_model(tmp_path_factory.mktemp("fsdp") / "model")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_dir: Path) -> dict[int, Path]:
    configs = {case: (c[0], _case_config(model_dir, case)) for case, c in CASES.items()}
    return spawn_cases(tmp_path_factory, configs, _worker, "fsdp")


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp_matches_single_process(case: str, runs: dict[int, Path], model_dir: Path) -> None:
    world, ep, _, grad_clip = CASES[case]
    ref, tracker = reference_run(model_dir, TrainConfig(**_case_config(model_dir, case)), world)
    if grad_clip:
        assert min(ref["norms"]) > grad_clip, "the case should clip"
    for rank in range(world):
        diffs = max_diffs(torch.load(runs[world] / f"{case}-rank{rank}.pt"), ref, tracker, per_rank=64 // ep)
        print(f"{case} rank {rank}: {diffs}")
        assert "grads" in diffs and "grad_norm" in diffs
        if case.endswith(UNDIVIDED):
            assert diffs["grads"] > 100 * TOL, diffs
        else:
            assert_matches(diffs, f"{case} rank {rank}")


def test_sharding_option() -> None:
    base = {"model": "m", "data": "d", "out": "o"}
    assert load_train_config(None, base).sharding == "none"
    gpu = load_train_config(None, {**base, "gpus_per_worker": 1})
    assert (gpu.sharding, gpu.zero_stage, gpu.activation_checkpointing) == ("fsdp", 0, True)
    assert load_train_config(None, {**base, "gpus_per_worker": 1, "activation_checkpointing": False}).sharding == "fsdp"
    assert load_train_config(None, base).activation_checkpointing is False
    assert load_train_config(None, {**base, "sharding": "zero2"}).zero_stage == 2
    with pytest.raises(ValueError, match="disagree"):
        load_train_config(None, {**base, "sharding": "fsdp", "zero_stage": 1})
    with pytest.raises(ValueError, match="--sharding must be one of"):
        load_train_config(None, {**base, "sharding": "zero3"})


@pytest.mark.parametrize("rank", [0, 3])
def test_each_rank_reads_only_its_shards_of_the_checkpoint(tmp_path: Path, rank: int) -> None:
    """Rank ``rank`` of EP2 × DP2 (a fake process group): the model is sharded on meta, then only this rank's
    shards are allocated and read, and each equals its slice of the whole checkpoint."""
    from moe_core.fake_devices import fake_world
    from moe_core.loading import load_model, local_rows
    from moe_train.loop import build_rank_model, build_stepper

    model_dir = parity_model(tmp_path / "model")
    params = parity_config(model_dir, world=4, ep=2, zero_stage=0, grad_accum=1, grad_clip=0.0, sharding="fsdp")
    cfg = TrainConfig(**params)
    with fake_world(4, rank=rank):
        model, groups = build_rank_model(cfg, rank, 4)
        assert all(p.is_meta for p in model.parameters())
        build_stepper(cfg, model, groups, 4)
        first, count = groups.layout.first_expert(rank), groups.layout.experts_per_rank
        whole = dict(load_model(model_dir, first_expert=first, num_local_experts=count).named_parameters())
        held = 0
        for name, param in model.named_parameters():
            part, row = local_rows(param)
            assert part.device.type == "cpu"
            assert torch.equal(part, whole[name][row : row + part.shape[0]]), name
            held += part.numel()
    rank_model = sum(p.numel() for p in whole.values())
    assert held <= rank_model // 2 + 4096  # non-experts over 4 ranks, experts over their 2 expert-DP ranks
