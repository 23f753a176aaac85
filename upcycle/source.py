"""Read a dense source checkpoint: HF ``qwen2`` (Qwen2, Qwen2.5) or ``llama`` / ``mistral`` architectures.

All three share Qwen2's layer structure (RMSNorm, GQA attention, SwiGLU MLP, rotate-half RoPE); llama and
mistral have no QKV bias, which upcycling turns into zero biases. The source is described by a dense
``ModelConfig`` (``moe_core.config.llama_as_qwen2``) so the rest of the job has one shape vocabulary.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_core.checkpoint_io import TensorReader, read_json
from moe_core.config import DENSE_COMPATIBLE_TYPES, ConfigError, ModelConfig, llama_as_qwen2


@dataclass(frozen=True)
class Source:
    path: Path | None  # None when planning from a bare config.json
    architecture: str  # model_type as read: qwen2, llama or mistral
    config: ModelConfig  # dense, qwen2-shaped
    raw_config: dict[str, Any]

    @property
    def has_qkv_bias(self) -> bool:
        return self.config.qkv_bias


def source_config(raw: dict[str, Any], where: str) -> tuple[str, ModelConfig]:
    """(architecture, dense ModelConfig) from a source config.json dict, or a ConfigError saying why not."""
    arch = raw.get("model_type")
    if arch == "qwen2_moe":
        raise ConfigError(f"{where}: model_type 'qwen2_moe' is already a mixture of experts; upcycle a dense model")
    if arch not in DENSE_COMPATIBLE_TYPES:
        raise ConfigError(
            f"{where}: unsupported model_type {arch!r}; upcycling reads {', '.join(DENSE_COMPATIBLE_TYPES)}"
        )
    if arch == "qwen2":
        return arch, ModelConfig.from_hf_dict(raw, source=where)
    return arch, llama_as_qwen2(raw, where)


def read_source(source_dir: str | Path) -> Source:
    path = Path(source_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"source {path} is not a directory")
    raw = read_json(path / "config.json", "config.json of the source model")
    arch, cfg = source_config(raw, str(path / "config.json"))
    return Source(path=path, architecture=arch, config=cfg, raw_config=raw)


def read_source_config(config_json: str | Path) -> Source:
    """For ``--plan --source-config``: a bare config.json without weights."""
    raw = read_json(config_json, "source config.json")
    arch, cfg = source_config(raw, str(config_json))
    return Source(path=None, architecture=arch, config=cfg, raw_config=raw)


def fingerprint(source: Source) -> str:
    """A cheap identity of the source: config.json plus every weight's key, dtype, shape and file size.

    Hashing all the bytes of a 15 GB checkpoint would cost as much as the upcycling itself; a change of any
    tensor's shape, dtype or file, or of the config, changes this.
    """
    digest = hashlib.sha256(json.dumps(source.raw_config, sort_keys=True).encode())
    if source.path is not None:
        with TensorReader(source.path) as reader:
            for key in reader.keys():
                f = reader.file_of(key)
                digest.update(f"{key}|{reader.dtype(key)}|{reader.shape(key)}|{f.name}|{f.stat().st_size}".encode())
    return digest.hexdigest()
