"""``upmoe export``: stream a training run's checkpoint into one HF Qwen2-MoE directory.

Two checkpoint formats. Rank files (``--sharding none|zero1|zero2``): each rank's file holds the non-expert
weights (identical on every rank) and its block of experts, and the first EP group's ranks together hold every
expert once. Sharded DCP checkpoints (``--sharding fsdp``, ``sharded_checkpoint``): every tensor whole, read
without a process group. Either way the export reads one decoder layer's tensors at a time and writes each
tensor into its place in the output shards as it comes (the shards are laid out first from the model's shapes),
so the host holds about one layer, never the model. The output is what ``save_model`` writes for the same
weights, byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from moe_core.checkpoint_io import CheckpointError, TensorSpec, save_hf_dir
from moe_core.config import ModelConfig
from moe_core.loading import TOKENIZER_FILES, config_with_dtype, parse_dtype
from moe_core.model import CausalLM
from moe_core.state_dict_adapter import expert_block, hf_tensors, is_expert_param
from moe_train.config import TrainConfig, model_config_for
from moe_train.loop import META_FILE, RANK_FILE
from moe_train.sharded_checkpoint import is_sharded_checkpoint, model_keys, read_tensors
from moe_train.trainer import RUN_NAME

EXPORT_DTYPES = ("bf16", "fp32", "source")


def checkpoints(run_dir: Path) -> dict[int, Path]:
    """Step -> checkpoint directory, for every checkpoint Ray Train kept."""
    found = {}
    for meta in (run_dir / "ray" / RUN_NAME).glob(f"checkpoint_*/{META_FILE}"):
        found[json.loads(meta.read_text())["step"]] = meta.parent
    return found


def export_dtype(train: TrainConfig, cfg: ModelConfig, choice: str | None) -> torch.dtype:
    """``--dtype``: by default bf16 for a run that computed in bf16 (on GPUs), fp32 otherwise; ``source`` is the
    dtype of the model the run started from."""
    if choice is None:
        choice = "bf16" if train.gpus_per_worker > 0 else "fp32"
    if choice not in EXPORT_DTYPES:
        raise ValueError(f"--dtype {choice!r}: choose one of {', '.join(EXPORT_DTYPES)}")
    if choice == "source":
        return parse_dtype(cfg.extra.get("dtype") or cfg.extra.get("torch_dtype") or "float32")
    return parse_dtype(choice)


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    step: int | None = None,
    overwrite: bool = False,
    dtype: str | None = None,
    progress: bool = False,
) -> Path:
    run_dir = Path(run_dir)
    config_path = run_dir / "train_config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{run_dir} is not an upmoe training run (no train_config.json)")
    train = TrainConfig(**json.loads(config_path.read_text()))
    found = checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"{run_dir} holds no checkpoint: the run stopped before its first step ended")
    if step is None:
        step = max(found)
    if step not in found:
        raise ValueError(f"no checkpoint for step {step} in {run_dir}; available: {sorted(found)}")
    cfg = model_config_for(train)
    ep = train.ep if cfg.is_moe else 1
    return export_checkpoint(
        found[step], cfg, out_dir, ep=ep, dtype=export_dtype(train, cfg, dtype), tokenizer_dir=train.model,
        overwrite=overwrite, progress=progress,
    )  # fmt: skip


def export_checkpoint(
    checkpoint_dir: Path,
    cfg: ModelConfig,
    out_dir: str | Path,
    *,
    ep: int,
    dtype: torch.dtype,
    tokenizer_dir: str | Path,
    overwrite: bool,
    progress: bool = False,
) -> Path:
    """Stream one checkpoint (either format) into an HF directory of ``dtype`` weights."""
    with torch.device("meta"):
        shapes = {name: p for name, p in CausalLM(cfg).named_parameters()}  # the order save_model writes
    groups = layer_groups(list(shapes))
    if is_sharded_checkpoint(checkpoint_dir):
        missing = sorted(set(shapes) - set(model_keys(checkpoint_dir)))
        if missing:
            raise CheckpointError(f"{checkpoint_dir}: no tensors for {', '.join(missing[:5])} (another model?)")
        named = _sharded_tensors(checkpoint_dir, groups, cfg, progress)
    else:
        named = _rank_file_tensors(checkpoint_dir, groups, cfg, ep, progress)
    plan = [TensorSpec(k, dtype, tuple(t.shape)) for k, t in hf_tensors(iter(shapes.items()), cfg)]
    copy_files = [Path(tokenizer_dir) / f for f in TOKENIZER_FILES if (Path(tokenizer_dir) / f).exists()]
    return save_hf_dir(
        out_dir,
        _cast(named, dtype),
        config_with_dtype(cfg, dtype).to_hf_dict(),
        copy_files=copy_files,
        overwrite=overwrite,
        plan=plan,
    )


def _cast(named: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for key, tensor in named:
        yield key, tensor.to(dtype)
        del tensor  # nothing may outlive its group: the next one is read while the loop asks for the next item


def layer_groups(names: list[str]) -> list[list[str]]:
    """Parameter names grouped by decoder layer (``model.layers.{i}.``), everything else one group each."""
    groups: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        key = ".".join(parts[:3]) if name.startswith("model.layers.") else name
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def _bar(groups: list[list[str]], progress: bool) -> tqdm:
    return tqdm(groups, desc="export", unit="group", disable=not progress)


def _sharded_tensors(
    checkpoint_dir: Path, groups: list[list[str]], cfg: ModelConfig, progress: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    for group in _bar(groups, progress):
        yield from hf_tensors(iter(read_tensors(checkpoint_dir, group).items()), cfg)


def _rank_file_tensors(
    checkpoint_dir: Path, groups: list[list[str]], cfg: ModelConfig, ep: int, progress: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    files = [checkpoint_dir / RANK_FILE.format(rank=r) for r in range(ep)]
    for group in _bar(groups, progress):
        yield from _rank_file_group(files, group, cfg)


def _rank_file_group(files: list[Path], group: list[str], cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """One group's tensors from rank files memory-mapped afresh, so the pages it touched go with this frame."""
    shards = [torch.load(f, map_location="cpu", mmap=True, weights_only=False)["model"] for f in files]
    for name in group:
        if not is_expert_param(name):
            yield from hf_tensors(iter([(name, shards[0][name])]), cfg)
            continue
        for rank, shard in enumerate(shards):
            first, _ = expert_block(cfg.num_experts, len(shards), rank)
            yield from hf_tensors(iter([(name, shard[name])]), cfg, first_expert=first)
