"""Sharded (DCP) checkpoints of ``--sharding fsdp`` runs: they reshard into other layouts, and export streams them.

Spawned CPU ranks (gloo) run the loop's own pieces (stepper, ``rank_batches``, ``save_rank_checkpoint`` and
``load_rank_checkpoint``). A run at EP=2 on 2 ranks is checkpointed after 2 steps and resumed on 1 rank; a run on
1 rank is resumed on 4 ranks at EP=2 × DP=2. Each continues to step 4 with the same global batches (the data
position depends only on the global batch size), and must end where the uninterrupted run ends. Loading a
checkpoint into another layout and saving it again must give back every tensor bit for bit.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from train_parity import MAX_ILL_FRACTION, adam_step_bound, ill_conditioned, parity_model

from moe_core.loading import load_model, save_model
from moe_train.config import TrainConfig
from moe_train.export import export_checkpoint
from moe_train.sharded_checkpoint import model_keys, read_tensors

STEPS, ROWS, SEQ = 4, 4, 24  # ROWS: the global batch
LR, TOL = 1e-3, 1e-6


def _config(model_dir: Path, world: int, ep: int) -> TrainConfig:
    micro = 1 if world == 4 else 2
    return TrainConfig(
        model=str(model_dir), data="unused", out="unused", workers=world, ep=ep, steps=STEPS, seq_len=SEQ,
        micro_batch=micro, grad_accum=ROWS // (world * micro), lr=LR, grad_clip=0.5, aux_loss="none",
        sharding="fsdp",
    )  # fmt: skip


def _run(rank: int, world: int, ep: int, model_dir: str, out: str, stop: int, resume: str | None) -> None:
    """Train steps [resume's step or 0, stop) and checkpoint at ``stop`` into ``out``."""
    from moe_train.data import rank_batches
    from moe_train.loop import (
        accumulate_global_batch,
        build_rank_model,
        build_stepper,
        load_rank_checkpoint,
        lr_at,
        save_rank_checkpoint,
    )

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}.pg", rank=rank, world_size=world)
    cfg = _config(Path(model_dir), world, ep)
    model, groups = build_rank_model(cfg, rank, world)
    stepper = build_stepper(cfg, model, groups, world)
    start = load_rank_checkpoint(Path(resume), rank, stepper, 0) if resume else 0
    blocks = torch.randint(0, 1024, (64, SEQ), generator=torch.Generator().manual_seed(3))
    batches = rank_batches(
        blocks, dp_rank=rank, dp_size=world, micro_batch=cfg.micro_batch, grad_accum=cfg.grad_accum, seed=0,
        start_step=start,
    )  # fmt: skip
    for step in range(start, stop):
        stepper.set_lr(lr_at(step, cfg))
        accumulate_global_batch(stepper, next(batches))
        stepper.step()
    Path(out).mkdir(exist_ok=True)
    save_rank_checkpoint(Path(out), rank, stepper, stop, 0)
    dist.barrier()
    dist.destroy_process_group()


def _spawn(world: int, ep: int, model_dir: Path, out: Path, stop: int, resume: Path | None = None) -> Path:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    args = (world, ep, str(model_dir), str(out), stop, str(resume) if resume else None)
    mp.spawn(_run, args=args, nprocs=world, join=True)
    return out


def _everything(directory: Path) -> dict[str, torch.Tensor]:
    """Every stored tensor of a checkpoint, whole: model, AdamW state and training state."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    keys = set(FileSystemReader(str(directory)).read_metadata().state_dict_metadata)
    loaded = _load_state_dict_from_keys(keys, checkpoint_id=str(directory))

    def flat(prefix: str, d: dict) -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(f"{prefix}{k}.", v) if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    return {k: v for k, v in flat("", loaded).items() if isinstance(v, torch.Tensor)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return parity_model(tmp_path_factory.mktemp("dcp") / "model")


@pytest.mark.parametrize(("first", "then"), [((2, 2), (1, 1)), ((1, 1), (4, 2))], ids=["ep2-to-1", "1-to-ep2xdp2"])
def test_resume_in_another_layout_ends_like_the_uninterrupted_run(
    first: tuple[int, int], then: tuple[int, int], model_dir: Path, tmp_path: Path
) -> None:
    whole = _everything(_spawn(*first, model_dir, tmp_path / "whole", STEPS))
    half = _spawn(*first, model_dir, tmp_path / "half", 2)
    # Resharded and saved again without a step: every tensor comes back bit for bit.
    again = _everything(_spawn(*then, model_dir, tmp_path / "again", 2, resume=half))
    stored = _everything(half)
    assert set(again) == set(stored)
    for k in stored:
        assert torch.equal(again[k], stored[k]), k
    # Resumed in the other layout for the last 2 steps: the uninterrupted run's weights and AdamW state.
    resumed = _everything(_spawn(*then, model_dir, tmp_path / "resumed", STEPS, resume=half))
    assert int(resumed["train.step"]) == STEPS
    ill = _ill_conditioned(whole, step=STEPS)
    assert sum(int(m.sum()) for m in ill.values()) <= MAX_ILL_FRACTION * sum(m.numel() for m in ill.values())
    # Both runs may move an ill-conditioned element this far from each other in the resumed steps.
    drift = 2 * LR * sum(adam_step_bound(step) for step in range(3, STEPS + 1)) + TOL
    worst = ill_worst = 0.0
    for k in whole:
        if k == "train.rng":
            continue
        diff = (resumed[k].double() - whole[k].double()).abs()
        if k in ill:
            ill_worst = max(ill_worst, diff[ill[k]].max().item() if ill[k].any() else 0.0)
            diff = diff[~ill[k]]
        worst = max(worst, diff.max().item() if diff.numel() else 0.0)
    print(f"{first} -> {then}: largest difference {worst:.2e}, ill-conditioned {ill_worst:.2e} (bound {drift:.1e})")
    assert worst <= TOL
    assert ill_worst <= drift


def _ill_conditioned(state: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    """Model key -> the elements whose AdamW update is ill-conditioned, where the exact gradient is about zero and
    the update is rounding noise amplified by Adam (attention's key bias is the usual case: softmax ignores it)."""
    return {
        key: ill_conditioned(key[len("model.") :], state[f"optim.state.{key[len('model.') :]}.exp_avg_sq"], step)
        for key in state
        if key.startswith("model.")
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_streams_a_sharded_checkpoint_byte_for_byte(model_dir: Path, tmp_path: Path, dtype) -> None:
    checkpoint = _spawn(2, 2, model_dir, tmp_path / "ckpt", 1)
    cfg = load_model(model_dir).config
    streamed = export_checkpoint(
        checkpoint, cfg, tmp_path / "streamed", ep=2, dtype=dtype, tokenizer_dir=model_dir, overwrite=False
    )
    # The in-memory export: the whole model assembled, then saved.
    whole = load_model(model_dir)
    whole.load_state_dict(read_tensors(checkpoint, model_keys(checkpoint)))
    in_memory = save_model(whole, tmp_path / "in-memory", dtype=dtype)
    assert_same_files(streamed, in_memory)
    trained = load_model(streamed).model.layers[0].mlp.experts.down_proj
    assert not torch.equal(trained, load_model(model_dir, dtype=dtype).model.layers[0].mlp.experts.down_proj)


def assert_same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
