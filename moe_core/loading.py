"""Load and save whole models as Hugging Face directories (config.json + sharded safetensors + tokenizer).

Loading is lazy and exact: the model is built on the meta device, materialised empty directly in the target
dtype on the target device, and filled tensor by tensor from mmap'd safetensors, so peak memory is the model
itself (no fp32 copy of a bf16 model first). A model built owning a subset of the
routed experts reads only those experts' tensors. Every missing, unexpected or mis-shaped tensor is an
error that names the key, the file and what the config implies.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from moe_core.checkpoint_io import CheckpointError, TensorReader, save_hf_dir
from moe_core.config import ModelConfig, read_model_config
from moe_core.experts import ExpertBackend
from moe_core.model import CausalLM
from moe_core.state_dict_adapter import IGNORED_KEY, expected_hf_keys, expert_rows, hf_tensors, stacked_param

# Files copied next to the weights when saving: tokenizer (v4 and v5 layouts) and generation settings.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
)

# A tensor is read in pieces of at most this many bytes (of its stored dtype): the loader's host transient.
READ_CHUNK_BYTES = 64 * 2**20

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    key = aliases.get(name, name)
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of fp32, bf16, fp16")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


def load_model(
    model_dir: str | Path,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    expert_backend: ExpertBackend | str | None = None,
    first_expert: int = 0,
    num_local_experts: int | None = None,
    config: ModelConfig | None = None,
) -> CausalLM:
    """Build the model described by MODEL_DIR/config.json and fill it from the directory's safetensors."""
    model_dir = Path(model_dir)
    cfg = config or read_model_config(model_dir)
    with torch.device("meta"):
        model = CausalLM(
            cfg, expert_backend=expert_backend, first_expert=first_expert, num_local_experts=num_local_experts
        )
    model.to(parse_dtype(dtype))  # on meta, free: the weights are then allocated once, in their dtype
    materialise_and_fill(model, model_dir, device)
    return model


def materialise_and_fill(model: CausalLM, model_dir: str | Path, device: torch.device | str) -> None:
    """Allocate a model built on the meta device on ``device`` and fill it from MODEL_DIR's safetensors.

    The model may be sharded already (FSDP2's ``fully_shard`` on meta): each process then allocates and reads
    only its own shard of every parameter, so nothing is ever whole on a device.
    """
    model.to_empty(device=device)
    model.tie_weights()
    model.reset_buffers()
    with TensorReader(model_dir) as reader:
        check_keys(reader, model.config, Path(model_dir))
        fill_parameters(model, reader)


def check_keys(reader: TensorReader, cfg: ModelConfig, model_dir: Path) -> None:
    present = {k for k in reader.keys() if not IGNORED_KEY.search(k)}
    expected = expected_hf_keys(cfg)
    if cfg.tie_word_embeddings:
        present.discard("lm_head.weight")  # some writers store the tied copy; it is the embedding
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing:
        raise CheckpointError(
            f"{model_dir}: {len(missing)} tensor(s) that config.json implies are missing, e.g. "
            + ", ".join(missing[:5])
        )
    if unexpected:
        raise CheckpointError(
            f"{model_dir}: {len(unexpected)} tensor(s) not part of a {cfg.model_type.value} model with this "
            "config.json, e.g. " + ", ".join(unexpected[:5])
        )


@torch.no_grad()
def fill_parameters(model: CausalLM, reader: TensorReader) -> None:
    first = model.expert_placement.first
    for name, param in model.named_parameters():
        part, row = local_rows(param)
        if part.numel() == 0:
            continue  # an FSDP2 shard past the end of a short dimension
        stacked = stacked_param(name)
        if stacked is None:
            _check_shape(reader, name, tuple(param.shape))
            # In row chunks: the host never holds more than READ_CHUNK_BYTES of a big tensor (the embedding)
            per_row = max(1, reader.nbytes(name) // param.shape[0])
            step = max(1, READ_CHUNK_BYTES // per_row)
            for lo in range(0, part.shape[0], step):
                hi = min(lo + step, part.shape[0])
                _fill(part[lo:hi], reader.get_slice(name, row + lo, row + hi))
            continue
        layer, kind = stacked
        for local in range(part.shape[0]):
            for key, rows in expert_rows(kind, layer, first + row + local, param.shape[1]):
                dst = part[local, rows]
                _check_shape(reader, key, tuple(dst.shape))
                _fill(dst, reader.get(key))


def _fill(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy a tensor read from the file into its parameter, converting the dtype without a copy of the whole
    tensor in the other dtype where it would cost: on the host ``copy_`` converts in place; for a GPU the host
    converts first (a cross-device ``copy_`` would stage the file's dtype on the device)."""
    dst.copy_(src if dst.device == src.device or src.dtype == dst.dtype else src.to(dst.dtype))


def local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The part of ``param`` this process holds and the index of its first row: all of it, or for a DTensor
    sharded on dim 0 (FSDP2's layout) the local shard and its offset in the whole tensor."""
    if not isinstance(param, DTensor):
        return param, 0
    if any(not (p.is_shard(0) or p.is_replicate()) for p in param.placements):
        raise ValueError(f"cannot load a parameter placed as {param.placements}: only dim-0 shards are read")
    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return param.to_local(), offset[0]


def _check_shape(reader: TensorReader, key: str, shape: tuple[int, ...]) -> None:
    """The stored tensor has the ``shape`` the config implies."""
    found = tuple(reader.shape(key))
    if found != shape:
        raise CheckpointError(
            f"{reader.file_of(key)}: tensor {key} has shape {list(found)} but config.json implies {list(shape)}"
        )


def model_hf_tensors(model: CausalLM, dtype: torch.dtype | None = None) -> Iterable[tuple[str, torch.Tensor]]:
    """The model's weights as (HF key, tensor) pairs, optionally cast, in a deterministic order."""
    named = ((n, p.detach() if dtype is None else p.detach().to(dtype)) for n, p in model.named_parameters())
    return hf_tensors(named, model.config, model.expert_placement.first)


def config_with_dtype(cfg: ModelConfig, dtype: torch.dtype) -> ModelConfig:
    """Record the weights' dtype in config.json under the key this config's generation uses."""
    extra = dict(cfg.extra)
    key = "dtype" if "dtype" in extra else "torch_dtype"
    extra[key] = dtype_name(dtype)
    return cfg.replace(extra=extra)


def save_model(
    model: CausalLM,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
) -> Path:
    """Write MODEL as an HF directory, atomically (a crash leaves nothing that looks complete)."""
    if "converted_from" in model.config.extra:
        raise ValueError(
            f"save_model writes Qwen2 checkpoints; this model was read from a {model.config.extra['converted_from']} "
            "directory without QKV bias (upcycle it, or save it with transformers)"
        )
    if model.expert_placement.first != 0 or (model.expert_placement.count not in (None, model.config.num_experts)):
        raise ValueError("save_model needs a model that owns every expert; gather expert shards first")
    dtype = parse_dtype(dtype) if dtype is not None else next(model.parameters()).dtype
    copy_files = []
    if tokenizer_dir is not None:
        copy_files = [Path(tokenizer_dir) / f for f in TOKENIZER_FILES if (Path(tokenizer_dir) / f).exists()]
    return save_hf_dir(
        out_dir,
        model_hf_tensors(model, dtype),
        config_with_dtype(model.config, dtype).to_hf_dict(),
        max_shard_bytes=max_shard_bytes,
        copy_files=copy_files,
        overwrite=overwrite,
    )
