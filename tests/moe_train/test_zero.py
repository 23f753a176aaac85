"""The EP parity test under DeepSpeed ZeRO: spawned CPU ranks (gloo) train like one plain AdamW process.

Each case runs the training loop's own pieces (``build_rank_model``, ``build_stepper``,
``accumulate_global_batch``) for 3 optimizer steps on the same global batches as a single process holding every
expert, which uses torch's AdamW and ``clip_grad_norm_`` directly. Compared, as ``train_parity`` explains: per-step
losses and gradient norms, the first step's reduced gradients (before clipping) and the weights after 3 steps
where Adam's update is well-conditioned, all within 1e-5 (fp32).

Adam's update g / (√v + ε) is nearly blind to how gradients are scaled, so the gradient and norm comparisons are
what catch a scaling mistake; the weights comparison catches the rest (partitioning, the update, the schedule).
One case marks the experts with DeepSpeed's EP=1 groups, so it reduces expert gradients over the whole world: the
check must reject it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from train_parity import (
    ROWS_PER_RANK,
    TOL,
    assert_matches,
    batches,
    max_diffs,
    parity_config,
    parity_model,
    reference_run,
    spawn_cases,
    train_rank,
)

from moe_train.config import TrainConfig, load_train_config

WRONG_GROUP = "-wrong-group"  # a case whose expert gradients DeepSpeed reduces over the whole world


def _mark_experts_with_world_group() -> None:
    """The bug the check must catch: expert parameters marked with DeepSpeed's EP=1 groups, whose expert-DP group
    is the whole world, so their gradients are averaged with other experts'. Stays on for the process."""
    from deepspeed.utils import groups as ds_groups

    import moe_train.zero

    right = moe_train.zero.mark_expert_params

    def mark_wrong(model: torch.nn.Module, group_name: str) -> None:
        wrong = moe_train.zero.expert_group_name(1)
        if wrong not in ds_groups._get_expert_data_parallel_group_dict():
            ds_groups._create_expert_and_data_parallel(1)
        right(model, wrong)

    moe_train.zero.mark_expert_params = mark_wrong


def _worker(rank: int, world: int, configs: dict[str, dict], out_dir: str) -> None:
    """Every case of one world size in one process group: spawning and importing DeepSpeed once saves time."""
    torch.set_num_threads(1)
    os.environ["LOCAL_RANK"] = str(rank)  # DeepSpeed insists on it; Ray Train sets it for real runs
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/pg", rank=rank, world_size=world)
    for case, config in configs.items():
        if case.endswith(WRONG_GROUP):
            _mark_experts_with_world_group()
        torch.save(train_rank(rank, world, TrainConfig(**config)), f"{out_dir}/{case}-rank{rank}.pt")
        if case == PARTITIONED:
            torch.save(_partitions(rank, world, TrainConfig(**config)), f"{out_dir}/partitions-rank{rank}.pt")
        if case == RESUMED:
            _checkpoint_and_resume(rank, world, TrainConfig(**config), Path(out_dir))
    dist.barrier()
    dist.destroy_process_group()


def _checkpoint_and_resume(rank: int, world: int, cfg: TrainConfig, out: Path) -> None:
    """The run uninterrupted, and checkpointed after its first step then resumed by a freshly built stepper,
    each checkpointed at the end (``out/whole``, ``out/resumed``), with the training loop's own functions."""
    from moe_train.loop import (
        accumulate_global_batch,
        build_rank_model,
        build_stepper,
        load_rank_checkpoint,
        lr_at,
        save_rank_checkpoint,
    )

    def train(resume: Path | None, stop: int, into: Path) -> None:
        model, groups = build_rank_model(cfg, rank, world)
        stepper = build_stepper(cfg, model, groups, world)
        start = load_rank_checkpoint(resume, rank, stepper, cfg.zero_stage) if resume else 0
        for step, batch in list(enumerate(batches(world)))[start:stop]:
            stepper.set_lr(lr_at(step, cfg))
            mine = batch[rank * ROWS_PER_RANK : (rank + 1) * ROWS_PER_RANK]
            accumulate_global_batch(stepper, list(mine.split(cfg.micro_batch)))
            stepper.step()
        into.mkdir(exist_ok=True)
        save_rank_checkpoint(into, rank, stepper, stop, cfg.zero_stage)
        dist.barrier()

    train(None, cfg.steps, out / "whole")
    train(None, 1, out / "half")
    train(out / "half", cfg.steps, out / "resumed")


def _partitions(rank: int, world: int, cfg: TrainConfig) -> dict[str, tuple[int, int]]:
    """Each ZeRO parameter group of this rank: (elements in the group, elements of its fp32 partition here)."""
    from moe_train.loop import build_rank_model, build_stepper

    model, groups = build_rank_model(cfg, rank, world)
    opt = build_stepper(cfg, model, groups, world).engine.optimizer
    return {
        group["name"]: (sum(p.numel() for p in opt.bit16_groups[i]), opt.single_partition_of_fp32_groups[i].numel())
        for i, group in enumerate(opt.optimizer.param_groups)
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return parity_model(tmp_path_factory.mktemp("zero") / "model")


CASES = {
    # world, ep, zero_stage, grad_accum, grad_clip (the global norm is about 1.0-1.6: 0.5 clips every step)
    "ep2-zero1-clip": (2, 2, 1, 1, 0.5),
    "ep2-zero2-accum2-clip": (2, 2, 2, 2, 0.5),
    "ep2-zero0-accum2-clip": (2, 2, 0, 2, 0.5),  # the plain path in the same harness, for comparison
    "ep2xdp2-zero2-clip": (4, 2, 2, 1, 0.5),
    "ep2xdp2-zero1-accum2": (4, 2, 1, 2, 0.0),
    # Last in its world: the marking stays off for the rest of the process.
    "ep2xdp2-zero2-clip" + WRONG_GROUP: (4, 2, 2, 1, 0.5),
}


PARTITIONED = "ep2xdp2-zero2-clip"  # the case whose optimizer partitions are recorded too
RESUMED = "ep2-zero1-clip"  # the case also checkpointed after step 1 and resumed (test_zero1_resumes_bit_for_bit)


def _case_config(model_dir: Path, case: str) -> dict:
    world, ep, zero_stage, grad_accum, grad_clip = CASES[case]
    return parity_config(
        model_dir, world=world, ep=ep, zero_stage=zero_stage, grad_accum=grad_accum, grad_clip=grad_clip
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_dir: Path) -> dict[int, Path]:
    configs = {case: (c[0], _case_config(model_dir, case)) for case, c in CASES.items()}
    return spawn_cases(tmp_path_factory, configs, _worker, "zero")


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_zero_matches_single_process(case: str, runs: dict[int, Path], model_dir: Path) -> None:
    world, ep, zero_stage, _, grad_clip = CASES[case]
    ref, tracker = reference_run(model_dir, TrainConfig(**_case_config(model_dir, case)), world)
    if grad_clip:
        assert min(ref["norms"]) > grad_clip, "the case should clip"
    for rank in range(world):
        diffs = max_diffs(torch.load(runs[world] / f"{case}-rank{rank}.pt"), ref, tracker, per_rank=64 // ep)
        print(f"{case} rank {rank}: {diffs}")
        assert "grad_norm" in diffs and (zero_stage == 0 or "grads" in diffs)
        if case.endswith(WRONG_GROUP):
            assert diffs["grads"] > 100 * TOL and diffs["weights"] > 10 * TOL, diffs
        else:
            assert_matches(diffs, f"{case} rank {rank}")


@pytest.mark.slow
def test_zero2_partitions_expert_state_over_the_expert_dp_group(runs: dict[int, Path]) -> None:
    """EP2 × DP2, ZeRO-2: non-expert gradients and fp32 state are split 4 ways, the experts' over the 2 ranks that
    hold the same experts (DeepSpeed's MoE groups), so every rank keeps a quarter and a half respectively."""
    for rank in range(4):
        parts = torch.load(runs[4] / f"partitions-rank{rank}.pt")
        assert set(parts) == {"dense", "ep_size_2"}, parts
        total, mine = parts["dense"]
        assert mine == -(-total // 4), parts  # DeepSpeed pads the flat group to a multiple of the ranks
        total, mine = parts["ep_size_2"]
        assert mine == -(-total // 2), parts


def _assert_same(a: object, b: object, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__"):  # DeepSpeed's state objects (its loss scaler) have no __eq__
        assert type(a) is type(b), where
        _assert_same(vars(a), vars(b), where)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.slow
def test_zero1_resumes_bit_for_bit(runs: dict[int, Path]) -> None:
    """EP=2, ZeRO-1: checkpointed after step 1 and resumed by a new stepper, each rank's weights, optimizer
    partition and RNG state at the end equal the uninterrupted run's. (Ray Train's restart of a killed worker
    group around this is tested with FSDP in test_train_job.)"""
    from moe_train.loop import RANK_FILE

    for rank in range(2):
        whole, resumed = (
            torch.load(runs[2] / d / RANK_FILE.format(rank=rank), weights_only=False) for d in ("whole", "resumed")
        )
        assert whole["step"] == resumed["step"] == 3 and whole["zero_stage"] == 1
        _assert_same(whole, resumed, f"rank {rank}")


def test_zero_stage_option(tmp_path: Path) -> None:
    """Default 0 on CPU (and on GPUs, where the default sharding is FSDP2); settable from YAML and the command line;
    anything else refused."""
    from upmoe.cli import build_parser

    base = {"model": "m", "data": "d", "out": "o"}
    assert load_train_config(None, base).zero_stage == 0
    assert load_train_config(None, {**base, "gpus_per_worker": 1}).zero_stage == 0
    assert load_train_config(None, {**base, "gpus_per_worker": 1, "zero_stage": 1}).sharding == "zero1"
    yaml_path = tmp_path / "train.yaml"
    yaml_path.write_text("zero-stage: 2\n")
    assert load_train_config(yaml_path, base).zero_stage == 2
    args = build_parser("train")[1].parse_args(["--zero-stage", "1"])
    assert load_train_config(yaml_path, {**base, "zero_stage": args.zero_stage}).zero_stage == 1
    with pytest.raises(ValueError, match="--zero-stage must be one of"):
        load_train_config(None, {**base, "zero_stage": 3})
