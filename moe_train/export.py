"""``upmoe export``: gather a training run's sharded checkpoint into one HF Qwen2-MoE directory.

Two checkpoint formats. Rank files (``--sharding none|zero1|zero2``): each rank's file holds the non-expert
weights (identical on every rank) and its block of experts, and the first EP group's ranks together hold every
expert once; the model is assembled and written with ``save_model``. Sharded DCP checkpoints (``--sharding
fsdp``, ``sharded_checkpoint``): read one decoder layer's tensors at a time and written out as they come, so the
host holds about one layer, never the model. Either way with the tokenizer files of the model the run started
from.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from moe_core.checkpoint_io import save_hf_dir
from moe_core.config import ModelConfig
from moe_core.hf_keys import hf_tensors
from moe_core.loading import TOKENIZER_FILES, config_with_dtype, save_model
from moe_core.model import CausalLM
from moe_train.config import TrainConfig, model_config_for
from moe_train.loop import META_FILE, RANK_FILE
from moe_train.sharded_checkpoint import is_sharded_checkpoint, model_keys, read_tensors
from moe_train.trainer import RUN_NAME


def checkpoints(run_dir: Path) -> dict[int, Path]:
    """Step -> checkpoint directory, for every checkpoint Ray Train kept."""
    found = {}
    for meta in (run_dir / "ray" / RUN_NAME).glob(f"checkpoint_*/{META_FILE}"):
        found[json.loads(meta.read_text())["step"]] = meta.parent
    return found


def gather_state(checkpoint_dir: Path, ep: int) -> dict[str, torch.Tensor]:
    shards = [torch.load(checkpoint_dir / RANK_FILE.format(rank=r), weights_only=False)["model"] for r in range(ep)]
    state = dict(shards[0])
    for name in state:
        if ".mlp.experts." in name:
            state[name] = torch.cat([s[name] for s in shards])
    return state


def export_run(run_dir: str | Path, out_dir: str | Path, step: int | None = None, overwrite: bool = False) -> Path:
    run_dir = Path(run_dir)
    config_path = run_dir / "train_config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{run_dir} is not an upmoe training run (no train_config.json)")
    train = json.loads(config_path.read_text())
    found = checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"{run_dir} holds no checkpoint: the run stopped before its first step ended")
    if step is None:
        step = max(found)
    if step not in found:
        raise ValueError(f"no checkpoint for step {step} in {run_dir}; available: {sorted(found)}")
    cfg = model_config_for(TrainConfig(**train))
    if is_sharded_checkpoint(found[step]):
        return export_sharded(found[step], cfg, out_dir, tokenizer_dir=train["model"], overwrite=overwrite)
    model = CausalLM(cfg)
    model.load_state_dict(gather_state(found[step], train["ep"] if cfg.is_moe else 1))
    return save_model(model, out_dir, tokenizer_dir=train["model"], overwrite=overwrite)


def layer_groups(names: list[str]) -> list[list[str]]:
    """Parameter names grouped by decoder layer (``model.layers.{i}.``), everything else one group each."""
    groups: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        key = ".".join(parts[:3]) if name.startswith("model.layers.") else name
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def export_sharded(
    checkpoint_dir: Path, cfg: ModelConfig, out_dir: str | Path, *, tokenizer_dir: str | Path, overwrite: bool
) -> Path:
    """Stream a sharded checkpoint into an HF directory, one decoder layer's tensors on the host at a time."""

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for group in layer_groups(model_keys(checkpoint_dir)):
            loaded = read_tensors(checkpoint_dir, group)
            yield from hf_tensors(iter(loaded.items()), cfg)

    copy_files = [Path(tokenizer_dir) / f for f in TOKENIZER_FILES if (Path(tokenizer_dir) / f).exists()]
    config = config_with_dtype(cfg, torch.float32).to_hf_dict()
    return save_hf_dir(out_dir, tensors(), config, copy_files=copy_files, overwrite=overwrite)
