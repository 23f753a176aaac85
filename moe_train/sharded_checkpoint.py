"""Sharded checkpoints (``--sharding fsdp``) with ``torch.distributed.checkpoint`` (DCP): every rank writes only
its shards, nothing is gathered whole on a device, and a checkpoint loads into any layout.

A checkpoint directory holds DCP's files (one ``__{rank}_0.distcp`` per rank and ``.metadata``) for three
groups of keys: ``model.*`` (parameters, fp32), ``optim.*`` (AdamW state) and ``train.*`` (step, RNG state,
the routers' selection bias). Expert tensors are stored as one global tensor over all experts
(``FsdpStepper.global_experts``), so a run checkpointed at EP=2 on 2 ranks resumes on 1 rank, or on 4 at
EP=2 × DP=2: each rank reads the slices its layout gives it. ``read_tensors`` reads whole tensors without a
process group, a few at a time, for ``upmoe export``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

MARKER = ".metadata"  # DCP's metadata file: its presence marks a sharded checkpoint
MODEL_PREFIX = "model."


def is_sharded_checkpoint(directory: Path) -> bool:
    return (Path(directory) / MARKER).exists()


def _train_state(model: Any, step: int) -> dict[str, torch.Tensor]:
    state = {"step": torch.tensor(step), "rng": torch.get_rng_state()}
    for i, moe in enumerate(model.moe_layers()):
        state[f"selection_bias.{i}"] = moe.gate.selection_bias
    return state


def save(directory: Path, stepper: Any, step: int) -> None:
    """Every rank writes its shards into ``directory`` (collective)."""
    view, _, _ = stepper.sharded_state()
    dcp.save({**view, "train": _train_state(stepper.model, step)}, checkpoint_id=str(directory))


def load(directory: Path, stepper: Any) -> int:
    """Load a sharded checkpoint into this rank's layout, whatever layout wrote it (collective); returns its step."""
    view, model_sd, optim_sd = stepper.sharded_state()
    train = _train_state(stepper.model, 0)  # holds the selection-bias buffers themselves: DCP loads in place
    dcp.load({**view, "train": train}, checkpoint_id=str(directory))
    stepper.load_sharded_state(model_sd, optim_sd)
    torch.set_rng_state(train["rng"])
    return int(train["step"])


def model_keys(directory: Path) -> list[str]:
    """The model's parameter names in a sharded checkpoint, in the order they were written."""
    metadata = FileSystemReader(str(directory)).read_metadata()
    return [k[len(MODEL_PREFIX) :] for k in metadata.state_dict_metadata if k.startswith(MODEL_PREFIX)]


def read_tensors(directory: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Whole tensors for ``names`` (parameter names), on the host, without a process group."""
    with warnings.catch_warnings():  # "no process group: loading in one process" is the point here
        warnings.filterwarnings("ignore", "torch.distributed is unavailable", UserWarning)
        loaded = _load_state_dict_from_keys({MODEL_PREFIX + n for n in names}, checkpoint_id=str(directory))
    return {n: loaded["model"][n] for n in names}
