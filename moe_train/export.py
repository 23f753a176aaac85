"""``upmoe export``: gather a training run's sharded checkpoint into one HF Qwen2-MoE directory.

Each rank's shard holds the non-expert weights (identical on every rank) and its block of experts; the
first EP group's ranks together hold every expert once. The result is written with ``save_model``, with the
tokenizer files of the model the run started from.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moe_core.loading import save_model
from moe_core.model import CausalLM
from moe_train.config import TrainConfig, model_config_for
from moe_train.loop import META_FILE, RANK_FILE
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
    model = CausalLM(cfg)
    model.load_state_dict(gather_state(found[step], train["ep"] if cfg.is_moe else 1))
    return save_model(model, out_dir, tokenizer_dir=train["model"], overwrite=overwrite)
