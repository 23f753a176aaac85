"""Model-agnostic file layer for Hugging Face model directories (safetensors shards + JSON files).

This module knows nothing about parameter names or architectures; it only reads and writes
``model.safetensors`` / ``model-XXXXX-of-YYYYY.safetensors`` + ``model.safetensors.index.json``
directories so that other modules can map model parameters to HF keys on top of it.

Design choices, and why:

* Reading is lazy and mmap-backed (``safetensors.safe_open``) so converting a multi-GB checkpoint
  only touches the tensors actually requested.
* Every shard header is validated with a few small reads *before* safetensors opens it, so a
  truncated download or a half-written file produces an error naming the file and the byte
  counts instead of an opaque Rust error (or a silent short read).
* Shards are written by our own small serializer rather than ``safetensors.torch.save_file``:
  the Rust writer emits ``__metadata__`` in hash-map order, which varies between processes as soon
  as there is more than one metadata entry, and we want byte-identical output for identical input.
  The file format is the plain safetensors format and is read back by ``safetensors`` itself.
* Output directories are assembled in a sibling temp directory and renamed into place, so a
  crash never leaves something at the target path that looks like a complete checkpoint.
"""

from __future__ import annotations

import ctypes
import difflib
import hashlib
import json
import math
import os
import secrets
import shutil
import struct
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import safe_open

from moe_core.fileutil import write_text_atomic

__all__ = [
    "CONFIG_FILE",
    "INDEX_FILE",
    "SINGLE_FILE",
    "CheckpointError",
    "TensorReader",
    "TensorSpec",
    "atomic_output_dir",
    "dir_nbytes",
    "read_json",
    "save_hf_dir",
    "file_sha256",
    "shard_name",
    "write_index",
    "write_safetensors_file",
    "write_safetensors_shards",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
_METADATA_KEY = "__metadata__"
# safetensors itself refuses headers above 100 MB; checking first avoids reading a garbage length.
_MAX_HEADER_BYTES = 100 * 1000 * 1000
_HEADER_ALIGN = 8


class CheckpointError(ValueError):
    """A checkpoint file or directory is missing, malformed, or inconsistent.

    Subclasses ValueError so callers that already treat bad input as ValueError keep working.
    """


# ----------------------------------------------------------------------------------------------
# dtype table (safetensors dtype string <-> torch dtype)
# ----------------------------------------------------------------------------------------------


def _build_dtype_table() -> dict[str, torch.dtype]:
    """Map safetensors dtype names to torch dtypes, skipping those this torch build lacks."""
    names = {
        "F64": "float64",
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "I64": "int64",
        "I32": "int32",
        "I16": "int16",
        "I8": "int8",
        "U8": "uint8",
        "U16": "uint16",
        "U32": "uint32",
        "U64": "uint64",
        "BOOL": "bool",
        "C64": "complex64",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
        "F8_E8M0": "float8_e8m0fnu",
    }
    return {st: getattr(torch, tn) for st, tn in names.items() if hasattr(torch, tn)}


_ST_TO_TORCH: dict[str, torch.dtype] = _build_dtype_table()
_TORCH_TO_ST: dict[torch.dtype, str] = {dt: st for st, dt in _ST_TO_TORCH.items()}


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


_ST_ITEMSIZE: dict[str, int] = {st: _itemsize(dt) for st, dt in _ST_TO_TORCH.items()}


# ----------------------------------------------------------------------------------------------
# JSON helpers
# ----------------------------------------------------------------------------------------------


def read_json(path: str | Path, what: str) -> dict:
    """Load a JSON object, turning the usual failure modes into errors that name the file.

    ``what`` describes the file's role ("config", "weights index") so the message tells the user
    what was expected, not just which path failed.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"missing {what}: {path}") from None
    except IsADirectoryError:
        raise CheckpointError(f"{what} {path} is a directory, expected a JSON file") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{what} {path} is not UTF-8 text: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{what} {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {path}: expected a JSON object, found {type(data).__name__}")
    return data


def _json_text(obj: Any, name: str) -> str:
    """Serialize deterministically (sorted keys, trailing newline) so reruns give identical files."""
    try:
        return json.dumps(obj, indent=2, sort_keys=True) + "\n"
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot serialize {name} to JSON: {e}") from None


# ----------------------------------------------------------------------------------------------
# Shard header parsing / validation
# ----------------------------------------------------------------------------------------------


class _TensorInfo:
    """Header entry of one tensor; kept tiny because large checkpoints have ~10^5 of them."""

    __slots__ = ("dtype", "shape", "start", "end")

    def __init__(self, dtype: str, shape: tuple[int, ...], start: int, end: int) -> None:
        self.dtype = dtype
        self.shape = shape
        self.start = start
        self.end = end


def _read_raw_header(path: Path) -> tuple[int, bytes, int]:
    """Return (header_len, header_bytes, file_size), checking lengths before trusting them."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"missing weights file: {path}") from None
    if size < 8:
        raise CheckpointError(
            f"{path} is truncated or corrupt: expected at least 8 bytes (header length), file holds {size}"
        )
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise CheckpointError(
                f"{path} is truncated or corrupt: header length field says {header_len} bytes, "
                f"file holds {size - 8} bytes after it"
            )
        raw = f.read(header_len)
    return header_len, raw, size


def _parse_entry(path: Path, key: str, entry: Any) -> _TensorInfo:
    """Validate one header entry; the byte-count check catches headers edited by hand or by bugs."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: header entry {key!r} should be an object, found {entry!r}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _ST_ITEMSIZE:
        raise CheckpointError(
            f"{path}: tensor {key!r} has unsupported dtype {dtype!r}; expected one of {sorted(_ST_ITEMSIZE)}"
        )
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise CheckpointError(f"{path}: tensor {key!r} has invalid shape {shape!r}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(f"{path}: tensor {key!r} has invalid data_offsets {offsets!r}")
    expected = math.prod(shape) * _ST_ITEMSIZE[dtype]
    if offsets[1] - offsets[0] != expected:
        raise CheckpointError(
            f"{path}: tensor {key!r} ({dtype}{shape}) needs {expected} bytes, "
            f"header data_offsets span {offsets[1] - offsets[0]}"
        )
    return _TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])


def _read_header(path: Path) -> dict[str, _TensorInfo]:
    """Parse and validate a safetensors header without touching the tensor data.

    Checks that the data region declared by the header is exactly what the file holds: a shorter
    file is a truncated download/write, a longer one means garbage was appended (or the header is
    wrong); either way the tensors cannot be trusted.
    """
    header_len, raw, size = _read_raw_header(path)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path} is truncated or corrupt: header should be a JSON object, found {type(header).__name__}"
        )
    infos = {k: _parse_entry(path, k, v) for k, v in header.items() if k != _METADATA_KEY}
    declared = max((info.end for info in infos.values()), default=0)
    held = size - 8 - header_len
    if declared != held:
        raise CheckpointError(
            f"{path} is truncated or corrupt: header declares {declared} bytes of tensor data, file holds {held}"
        )
    return infos


# ----------------------------------------------------------------------------------------------
# Weight discovery
# ----------------------------------------------------------------------------------------------


def _shard_path(model_dir: Path, index_path: Path, name: Any) -> Path:
    """Resolve a shard name from the index, refusing names that would escape the model directory."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointError(f"{index_path}: weight_map points to invalid shard name {name!r}")
    return model_dir / name


def _load_index(model_dir: Path, index_path: Path) -> dict[str, Path]:
    """Read the index and check every referenced shard exists, so failures happen up front."""
    index = read_json(index_path, "weights index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: expected a 'weight_map' object, found {type(weight_map).__name__}")
    resolved: dict[str, Path] = {}
    by_name: dict[str, Path] = {}
    for key, name in weight_map.items():
        if name not in by_name:
            by_name[name] = _shard_path(model_dir, index_path, name)
        resolved[key] = by_name[name]
    missing = sorted(name for name, p in by_name.items() if not p.is_file())
    if missing:
        raise CheckpointError(
            f"{index_path} references missing shard(s): {', '.join(missing)} (expected in {model_dir})"
        )
    return resolved


def _discover(model_dir: Path) -> tuple[Path | None, dict[str, Path] | None, list[Path]]:
    """Return (index path, key -> shard map, weight files); the index wins, as in transformers.

    Without an index the key map is None: it comes from the single file's header.
    """
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory {model_dir} does not exist or is not a directory")
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        key_file = _load_index(model_dir, index_path)
        return index_path, key_file, sorted(set(key_file.values()))
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return None, None, [single]
    raise CheckpointError(f"no weights in {model_dir}: expected {SINGLE_FILE} or {INDEX_FILE}")


def dir_nbytes(model_dir: str | Path) -> int:
    """Total on-disk size of the weight files (for progress bars and disk-space checks)."""
    _, _, files = _discover(Path(model_dir))
    return sum(f.stat().st_size for f in files)


# ----------------------------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------------------------


class TensorReader:
    """Lazy, validated access to the tensors of an HF model directory.

    Shard headers are parsed (and validated) on first use of a shard and safetensors handles are
    kept open (mmap), so random access across many keys costs no repeated opens and tensors that
    are never asked for are never read.
    """

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self._index_path, key_file, files = _discover(self.model_dir)
        self._headers: dict[Path, dict[str, _TensorInfo]] = {}
        self._handles: dict[Path, Any] = {}
        self._closed = False
        if key_file is None:
            key_file = dict.fromkeys(self._header(files[0]), files[0])
        self._key_file: dict[str, Path] = key_file
        self._sorted_keys: list[str] | None = None

    # -- context manager ------------------------------------------------------------------------

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release the mmaps now instead of at garbage collection (matters on Windows and for rm)."""
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()
        self._closed = True

    def __repr__(self) -> str:
        return f"TensorReader({str(self.model_dir)!r}, {len(self._key_file)} tensors)"

    # -- key lookup -----------------------------------------------------------------------------

    def keys(self) -> list[str]:
        """All tensor names, sorted (so iteration order never depends on the index file's order)."""
        if self._sorted_keys is None:
            self._sorted_keys = sorted(self._key_file)
        return list(self._sorted_keys)

    def __contains__(self, key: object) -> bool:
        return key in self._key_file

    def __len__(self) -> int:
        return len(self._key_file)

    def file_of(self, key: str) -> Path:
        """The weight file holding ``key``."""
        try:
            return self._key_file[key]
        except KeyError:
            raise self._missing_key(key) from None

    def _missing_key(self, key: str) -> CheckpointError:
        """Build an error with close matches: most misses are a prefix or naming-scheme mismatch."""
        matches = difflib.get_close_matches(str(key), self._key_file.keys(), n=3, cutoff=0.6)
        hint = f"; close matches: {', '.join(matches)}" if matches else ""
        return CheckpointError(f"tensor {key!r} not found in {self.model_dir} ({len(self)} tensors){hint}")

    # -- headers & handles ----------------------------------------------------------------------

    def _header(self, path: Path) -> dict[str, _TensorInfo]:
        """Parsed header of ``path``, validated once; cross-checks the index against it."""
        header = self._headers.get(path)
        if header is None:
            header = _read_header(path)
            if self._index_path is not None:
                self._check_index_against(path, header)
            self._headers[path] = header
        return header

    def _check_index_against(self, path: Path, header: dict[str, _TensorInfo]) -> None:
        missing = sorted(k for k, p in self._key_file.items() if p == path and k not in header)
        if missing:
            shown = ", ".join(repr(k) for k in missing[:5])
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise CheckpointError(
                f"{self._index_path} maps {shown}{more} to {path.name}, but {path} has no such tensor"
            )

    def validate(self) -> None:
        """Validate every shard header now (cheap), to fail before a long conversion starts."""
        for path in sorted(set(self._key_file.values())):
            self._header(path)

    def _info(self, key: str) -> _TensorInfo:
        return self._header(self.file_of(key))[key]

    def _handle(self, path: Path) -> Any:
        if self._closed:
            raise ValueError(f"TensorReader for {self.model_dir} is closed")
        handle = self._handles.get(path)
        if handle is None:
            self._header(path)  # validate before letting safetensors mmap the file
            handle = safe_open(str(path), framework="pt")
            self._handles[path] = handle
        return handle

    # -- metadata without data ------------------------------------------------------------------

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape from the header; no tensor data is read."""
        return self._info(key).shape

    def dtype(self, key: str) -> torch.dtype:
        """Stored dtype from the header; no tensor data is read."""
        return _ST_TO_TORCH[self._info(key).dtype]

    def nbytes(self, key: str) -> int:
        """Stored size in bytes from the header; no tensor data is read."""
        info = self._info(key)
        return info.end - info.start

    # -- data -----------------------------------------------------------------------------------

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Load one tensor, optionally converted to ``dtype``."""
        path = self.file_of(key)
        tensor = self._handle(path).get_tensor(key)
        return _convert(tensor, dtype)

    def get_slice(self, key: str, dim0_start: int, dim0_stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Load rows ``[dim0_start, dim0_stop)`` only, e.g. one expert's rows of a fused weight."""
        path = self.file_of(key)
        shape = self._header(path)[key].shape
        if not shape:
            raise CheckpointError(f"{path}: tensor {key!r} is a scalar, cannot slice along dim 0")
        if not (0 <= dim0_start <= dim0_stop <= shape[0]):
            raise CheckpointError(
                f"{path}: rows [{dim0_start}, {dim0_stop}) out of range for tensor {key!r} with shape {list(shape)}"
            )
        tensor = self._handle(path).get_slice(key)[dim0_start:dim0_stop]
        return _convert(tensor, dtype)


def _convert(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)


# ----------------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------------


def _prepare_tensor(key: Any, tensor: Any) -> torch.Tensor:
    """Detach, move to CPU and make contiguous: the on-disk layout is dense row-major."""
    if not isinstance(key, str) or not key or key == _METADATA_KEY:
        raise CheckpointError(f"invalid tensor key {key!r}: expected a non-empty str, not {_METADATA_KEY}")
    if not isinstance(tensor, torch.Tensor):
        raise CheckpointError(f"value for key {key!r} is {type(tensor).__name__}, expected torch.Tensor")
    if tensor.dtype not in _TORCH_TO_ST:
        raise CheckpointError(f"tensor {key!r} has dtype {tensor.dtype}, which safetensors cannot store")
    return tensor.detach().to("cpu").contiguous()


def _tensor_nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _tensor_buffer(tensor: torch.Tensor) -> memoryview:
    """Zero-copy view of a contiguous CPU tensor's bytes (numpy has no bfloat16, so avoid it).

    The caller must keep ``tensor`` alive while the view is used.
    """
    n = _tensor_nbytes(tensor)
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * n).from_address(tensor.data_ptr())).cast("B")


@dataclass(frozen=True)
class TensorSpec:
    """What the writer needs to lay a tensor out before it has the data: its key, dtype and shape."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @classmethod
    def of(cls, key: str, tensor: torch.Tensor) -> TensorSpec:
        return cls(key, tensor.dtype, tuple(tensor.shape))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _shard_layout(specs: list[TensorSpec], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """A shard's padded header and each tensor's offset in the file.

    Data is laid out by descending element size, then name (the order safetensors' own writer uses), so every
    tensor starts at a multiple of its element size and zero-copy readers that need aligned buffers can map it
    directly. Keys sorted and compact separators keep the header byte-deterministic.
    """
    specs = sorted(specs, key=lambda t: (-t.dtype.itemsize, t.key))
    header: dict[str, Any] = {_METADATA_KEY: dict(sorted(metadata.items()))}
    offset, offsets = 0, {}
    for spec in specs:
        if spec.dtype not in _TORCH_TO_ST:
            raise CheckpointError(f"tensor {spec.key!r} has dtype {spec.dtype}, which safetensors cannot store")
        header[spec.key] = {
            "dtype": _TORCH_TO_ST[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offsets[spec.key] = offset
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # Pad with spaces (as safetensors does) so tensor data starts 8-byte aligned.
    raw += b" " * (-len(raw) % _HEADER_ALIGN)
    start = 8 + len(raw)
    return raw, {key: start + off for key, off in offsets.items()}


def _write_shard(
    path: Path, items: list[tuple[str, torch.Tensor]], metadata: dict[str, str], digest: Any = None
) -> None:
    """Write one safetensors file, streaming tensor bytes straight from tensor memory."""
    header, offsets = _shard_layout([TensorSpec.of(k, t) for k, t in items], metadata)
    chunks = [struct.pack("<Q", len(header)), header]
    chunks += [_tensor_buffer(t) for _, t in sorted(items, key=lambda kv: offsets[kv[0]])]
    with path.open("wb") as f:
        for chunk in chunks:
            f.write(chunk)
            if digest is not None:
                digest.update(chunk)


def _check_writer_args(out_dir: Path, max_shard_bytes: int, metadata: dict[str, str] | None) -> dict[str, str]:
    if sys.byteorder != "little":
        raise CheckpointError("safetensors is little-endian; writing from a big-endian host is not supported")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    meta = {"format": "pt", **(metadata or {})}
    bad = {k: v for k, v in meta.items() if not (isinstance(k, str) and isinstance(v, str))}
    if bad:
        raise CheckpointError(f"safetensors metadata must map str to str, got {bad!r}")
    stale = [p.name for p in (out_dir / INDEX_FILE, out_dir / SINGLE_FILE) if p.exists()]
    stale += sorted(p.name for p in out_dir.glob("model-*-of-*.safetensors"))
    if stale:
        # Old shards with a different shard count would survive next to ours and confuse readers.
        raise CheckpointError(f"{out_dir} already holds weights ({', '.join(stale)}); write into an empty directory")
    return meta


class _ShardFlusher:
    """Writes numbered temp shard files; final names need the shard count, known only at the end."""

    def __init__(self, out_dir: Path, metadata: dict[str, str]) -> None:
        self.out_dir = out_dir
        self.metadata = metadata
        self.count = 0
        self.temp_paths: list[Path] = []
        self.total_size = 0

    def _next_path(self, nbytes: int) -> Path:
        path = self.out_dir / f".model-{self.count:05d}.safetensors.partial"
        self.temp_paths.append(path)
        self.total_size += nbytes
        self.count += 1
        return path

    def __call__(self, items: list[tuple[str, torch.Tensor]]) -> None:
        _write_shard(self._next_path(sum(_tensor_nbytes(t) for _, t in items)), items, self.metadata)

    def open(self, specs: list[TensorSpec]) -> tuple[Any, dict[str, int]]:
        """A shard file with its header written and its full size allocated, and where each tensor goes."""
        header, offsets = _shard_layout(specs, self.metadata)
        nbytes = sum(s.nbytes for s in specs)
        f = self._next_path(nbytes).open("wb")
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + nbytes)
        return f, offsets


def _pack_shards(
    tensors: Iterable[tuple[str, torch.Tensor]],
    max_shard_bytes: int,
    flush: _ShardFlusher,
) -> dict[str, int]:
    """Group the stream into shards of at most ``max_shard_bytes``; returns key -> shard number.

    Only the current shard's tensors are held, so peak memory is one shard regardless of model size.
    """
    shard_of: dict[str, int] = {}
    current: list[tuple[str, torch.Tensor]] = []
    current_bytes = 0
    for key, tensor in tensors:
        tensor = _prepare_tensor(key, tensor)
        if key in shard_of:
            raise CheckpointError(f"duplicate tensor key {key!r} in checkpoint being written")
        n = _tensor_nbytes(tensor)
        if current and current_bytes + n > max_shard_bytes:
            flush(current)
            current, current_bytes = [], 0
        current.append((key, tensor))
        current_bytes += n
        shard_of[key] = flush.count  # the number the pending shard will get when flushed
    if current:
        flush(current)
    return shard_of


def write_safetensors_shards(
    tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: str | Path,
    max_shard_bytes: int = 5 * 2**30,
    metadata: dict[str, str] | None = None,
    plan: list[TensorSpec] | None = None,
) -> dict:
    """Stream (key, tensor) pairs into ``model-KKKKK-of-NNNNN.safetensors`` shards plus an index.

    Without ``plan`` the current shard's tensors are held until it is full. With ``plan`` (every tensor's key,
    dtype and shape, in stream order) each tensor is written where it belongs as it arrives and nothing is held,
    so peak memory is the largest tensor; the files are byte-identical either way.

    The index is always written (even for a single shard) so readers have one code path, and it is
    written last, after the shards have their final names, so its presence means the set is complete.
    Returns the index dict.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = _check_writer_args(out_dir, max_shard_bytes, metadata)
    flusher = _ShardFlusher(out_dir, meta)
    final_paths: list[Path] = []
    try:
        if plan is None:
            shard_of = _pack_shards(tensors, max_shard_bytes, flusher)
        else:
            shard_of = _write_planned(tensors, _plan_shards(plan, max_shard_bytes), flusher)
        if not shard_of:
            raise CheckpointError(f"no tensors to write to {out_dir}")
        n = flusher.count
        names = [shard_name(k, n) for k in range(n)]
        for tmp, name in zip(flusher.temp_paths, names, strict=True):
            os.replace(tmp, out_dir / name)
            final_paths.append(out_dir / name)
        index = write_index(out_dir, {key: names[shard_of[key]] for key in shard_of}, flusher.total_size)
    except BaseException:
        for p in flusher.temp_paths + final_paths:
            p.unlink(missing_ok=True)
        raise
    return index


def _plan_shards(plan: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """The shards ``_pack_shards`` would make of a stream of these tensors."""
    shards: list[list[TensorSpec]] = []
    current_bytes = 0
    for spec in plan:
        if not shards or (shards[-1] and current_bytes + spec.nbytes > max_shard_bytes):
            shards.append([])
            current_bytes = 0
        shards[-1].append(spec)
        current_bytes += spec.nbytes
    return shards


def _write_planned(
    tensors: Iterable[tuple[str, torch.Tensor]], shards: list[list[TensorSpec]], flush: _ShardFlusher
) -> dict[str, int]:
    """Write the stream into pre-laid-out shards, each tensor at its offset as it comes; returns key -> shard."""
    expected = iter([(k, spec) for k, shard in enumerate(shards) for spec in shard])
    shard_of: dict[str, int] = {}
    file, offsets, shard = None, {}, -1
    try:
        for key, tensor in tensors:
            k, spec = next(expected, (None, None))
            if spec is None or TensorSpec.of(key, tensor) != spec:
                raise CheckpointError(f"tensor {key!r} {list(tensor.shape)} {tensor.dtype} is not the planned {spec}")
            if k != shard:
                if file is not None:
                    file.close()
                file, offsets = flush.open(shards[k])
                shard = k
            tensor = _prepare_tensor(key, tensor)
            file.seek(offsets[key])
            file.write(_tensor_buffer(tensor))
            del tensor  # not held while the stream produces the next one
            shard_of[key] = k
        left = next(expected, None)
        if left is not None:
            raise CheckpointError(f"the stream ended before the planned tensor {left[1].key!r}")
    finally:
        if file is not None:
            file.close()
    return shard_of


# ----------------------------------------------------------------------------------------------
# Atomic directories
# ----------------------------------------------------------------------------------------------


def _make_sibling_dir(parent: Path, prefix: str) -> Path:
    """Create a fresh randomly named directory; os.mkdir honours the umask, unlike mkdtemp's 0700."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(6)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return  # e.g. directories cannot be opened on Windows; durability is best effort there
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush file data and directory entries so the rename publishes durable content."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath), directory=True)


def _publish(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``out_dir``; an old directory is moved aside first and deleted last."""
    old: Path | None = None
    if out_dir.exists() or out_dir.is_symlink():
        if not overwrite:
            raise CheckpointError(f"{out_dir} exists; pass overwrite=True to replace it")
        old = out_dir.parent / f".{out_dir.name}.old-{secrets.token_hex(6)}"
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.rename(old, out_dir)  # put the previous checkpoint back
        raise
    _fsync_path(out_dir.parent, directory=True)
    if old is not None:
        # The new directory is already in place; failing to delete the old one must not raise.
        if old.is_symlink():
            old.unlink(missing_ok=True)
        else:
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp directory that becomes ``out_dir`` only if the body finishes without error.

    The temp directory is a sibling (same filesystem) so publishing is a rename, never a copy; on
    error it is deleted, so a crash never leaves a complete-looking directory at ``out_dir``.
    (A hard kill can leave a ``.NAME.partial-*`` sibling behind; it is never mistaken for output.)
    """
    out_dir = Path(out_dir).absolute()
    if not out_dir.name or out_dir.name in (".", ".."):
        raise CheckpointError(f"invalid output directory {out_dir}")
    if out_dir.exists() or out_dir.is_symlink():
        if not overwrite:
            raise CheckpointError(f"{out_dir} exists; pass overwrite=True to replace it")
        if not out_dir.is_dir():
            raise CheckpointError(f"{out_dir} exists and is not a directory; refusing to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_sibling_dir(out_dir.parent, f".{out_dir.name}.partial-")
    try:
        yield tmp
        _fsync_tree(tmp)
        _publish(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------
# Whole HF directory
# ----------------------------------------------------------------------------------------------

_RESERVED_NAMES = frozenset({CONFIG_FILE, INDEX_FILE, SINGLE_FILE})


def _plan_extra_files(
    copy_files: Iterable[str | Path], extra_json: dict[str, dict] | None
) -> tuple[list[Path], dict[str, dict]]:
    """Check names and sources before any weights are written, so mistakes fail fast and cheaply."""
    sources = [Path(p) for p in copy_files]
    extra = dict(extra_json or {})
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        raise CheckpointError(f"files to copy into the model directory are missing: {', '.join(missing)}")
    for name in extra:
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise CheckpointError(f"extra_json name {name!r} must be a plain file name")
        if not isinstance(extra[name], dict):
            found = type(extra[name]).__name__
            raise CheckpointError(f"extra_json[{name!r}]: expected a dict, found {found}")
    names = [p.name for p in sources] + list(extra)
    clashes = sorted({n for n in names if n in _RESERVED_NAMES or n.startswith("model-") or names.count(n) > 1})
    if clashes:
        raise CheckpointError(f"extra files would overwrite weights, config or each other: {', '.join(clashes)}")
    return sources, extra


def save_hf_dir(
    out_dir: str | Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    config: dict,
    *,
    max_shard_bytes: int = 5 * 2**30,
    copy_files: Iterable[str | Path] = (),
    extra_json: dict[str, dict] | None = None,
    overwrite: bool = False,
    plan: list[TensorSpec] | None = None,
) -> Path:
    """Write a complete HF model directory (shards, index, config.json, extra files) atomically.

    ``plan``: see ``write_safetensors_shards``."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{CONFIG_FILE}: expected a dict, found {type(config).__name__}")
    config_text = _json_text(config, CONFIG_FILE)
    sources, extra = _plan_extra_files(copy_files, extra_json)
    extra_text = {name: _json_text(obj, name) for name, obj in extra.items()}
    out_dir = Path(out_dir).absolute()
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        write_safetensors_shards(tensors, tmp, max_shard_bytes=max_shard_bytes, plan=plan)
        (tmp / CONFIG_FILE).write_text(config_text, encoding="utf-8")
        for src in sources:
            shutil.copyfile(src, tmp / src.name)
        for name, text in extra_text.items():
            (tmp / name).write_text(text, encoding="utf-8")
    return out_dir


def shard_name(k: int, n: int) -> str:
    """HF's name for shard k (0-based) of n."""
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def write_index(out_dir: str | Path, weight_map: dict[str, str], total_size: int) -> dict:
    """Write ``model.safetensors.index.json`` (keys sorted) and return it."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    write_text_atomic(Path(out_dir) / INDEX_FILE, _json_text(index, INDEX_FILE))
    return index


def write_safetensors_file(
    path: str | Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
    digest: Any = None,
) -> int:
    """Write one deterministic safetensors file (via a temp name + rename); returns its tensor bytes.

    For writers that decide their own sharding, e.g. one shard per upcycling task. ``digest`` (a hashlib
    object) is fed the file's bytes as they are written, which saves reading the file back to checksum it.
    """
    path = Path(path)
    if sys.byteorder != "little":
        raise CheckpointError("safetensors is little-endian; writing from a big-endian host is not supported")
    items = [(k, _prepare_tensor(k, t)) for k, t in tensors]
    keys = [k for k, _ in items]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise CheckpointError(f"duplicate tensor keys for {path.name}: {', '.join(dup[:5])}")
    tmp = path.with_name(f".{path.name}.partial")
    try:
        _write_shard(tmp, items, {"format": "pt", **(metadata or {})}, digest)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return sum(_tensor_nbytes(t) for _, t in items)


def file_sha256(path: str | Path, chunk_bytes: int = 16 * 2**20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
