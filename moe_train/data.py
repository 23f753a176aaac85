"""Training data for continued pretraining: resolve ``--data``, read documents with Ray Data, tokenise, pack, shard.

The pipeline is deliberately deterministic end to end, because a restarted run must see exactly the data it
would have seen had it never stopped, and because the data-parallel equivalence tests compare runs row by row:

* ``resolve_inputs`` turns a ``--data`` spec into a fixed list of files (sorted expansions, absolute paths);
* ``read_documents`` reads them with Ray Data in path order (``preserve_order``), one row per document;
* ``tokenize`` encodes documents in parallel ``map_batches`` tasks, each loading the model directory's tokenizer
  once per worker process;
* ``pack_stream`` appends EOS to every document, concatenates and cuts the stream into ``seq_len`` blocks (the
  remainder is dropped); the model learns next-token prediction inside each block, as ``next_token_loss`` does;
* ``rank_batches`` walks a seeded per-epoch permutation of the blocks. The data position is only the step number,
  so resuming is ``start_step=step``, and the rows of a step do not depend on how they are split across ranks.

Local inputs are validated on the driver before any Ray task starts, so a typo or a malformed record fails in
seconds with the file (and line) named, rather than minutes later inside a worker.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data
import torch

from moe_core.corpus import SPLIT_SEEDS, embedded_corpus, write_embedded_corpus
from moe_core.tokenizer import Tokenizer
from moe_train.config import EMBEDDED

__all__ = [
    "SUPPORTED_SUFFIXES",
    "DataError",
    "TokenBlocks",
    "blocks_from_stream",
    "build_blocks",
    "corpus_cache_dir",
    "global_step_batch",
    "pack_stream",
    "rank_batches",
    "read_documents",
    "resolve_inputs",
    "split_documents",
    "steps_per_epoch",
    "token_stream",
    "tokenize",
]

SUPPORTED_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".json", ".parquet")
TEXT_COLUMN = "text"
IDS_COLUMN = "ids"
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_GLOB_CHARS = re.compile(r"[*?\[]")
# Ray re-raises errors from tasks as UserCodeException; the original type is lost but its line is in the message.
_REMOTE_DATA_ERROR = re.compile(r"^(?:[\w.]+\.)?DataError: (.+)$", re.MULTILINE)
_TOKENIZE_BATCH = 256


class DataError(ValueError):
    """The training data is missing or malformed; the message names the path (and line) and what is wrong."""


# --------------------------------------------------------------------------------------------------
# Resolving --data specs
# --------------------------------------------------------------------------------------------------


def corpus_cache_dir() -> Path:
    """Where the embedded corpus is materialised: ``$UPMOE_CACHE/corpus``, else ``~/.cache/upmoe/corpus``."""
    root = os.environ.get("UPMOE_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "upmoe") / "corpus"


def _embedded_path(split: str) -> str:
    """Write the embedded corpus once and reuse it; rewrite it when the generator's output changed (stale cache)."""
    out = corpus_cache_dir()
    path = out / f"{split}.txt"
    try:
        current = path.read_text(encoding="utf-8") if path.is_file() else None
    except (OSError, UnicodeDecodeError):
        current = None
    if current != embedded_corpus(split):
        try:
            write_embedded_corpus(out)
        except OSError as exc:
            raise DataError(f"{out}: could not write the embedded corpus cache ({exc}); set UPMOE_CACHE") from exc
    return str(path.resolve())


def _embedded_split(item: str) -> str | None:
    """``embedded`` → train, ``embedded:train`` / ``:eval`` / ``:valid`` → that split; anything else → None."""
    if item == EMBEDDED:
        return "train"
    if not item.startswith(EMBEDDED + ":"):
        return None
    split = item.split(":", 1)[1]
    if split not in SPLIT_SEEDS:
        expected = ", ".join(repr(s) for s in SPLIT_SEEDS)
        raise DataError(f"--data item {item!r}: unknown embedded split {split!r}; expected one of {expected}")
    return split


def _is_uri(item: str) -> bool:
    return bool(_URI.match(item))


def _has_supported_suffix(path: str) -> bool:
    return path.lower().endswith(SUPPORTED_SUFFIXES)


def _is_hidden(path: Path, root: Path) -> bool:
    """Dot-files and dot-directories (``.cache``, editor swap files) are never training data."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _files_in_dir(root: Path) -> list[Path]:
    """All supported files under ``root`` (recursively, hidden ones skipped), sorted for a stable order."""
    return sorted(
        p for p in root.rglob("*") if p.is_file() and _has_supported_suffix(p.name) and not _is_hidden(p, root)
    )


def _expand_dir(root: Path) -> list[Path]:
    files = _files_in_dir(root)
    if not files:
        raise DataError(f"{root}: directory contains no {'/'.join(SUPPORTED_SUFFIXES)} files")
    return files


def _expand_glob(pattern: str) -> list[Path]:
    """Matches that are directories are expanded; matched files with other suffixes are ignored, like in a dir."""
    files: list[Path] = []
    for match in sorted(glob.glob(os.path.expanduser(pattern), recursive=True)):
        path = Path(match)
        if path.is_dir():
            files += _files_in_dir(path)
        elif path.is_file() and _has_supported_suffix(path.name):
            files.append(path)
    if not files:
        raise DataError(f"{pattern}: glob matched no {'/'.join(SUPPORTED_SUFFIXES)} files")
    return sorted(files)


def _expand_local(item: str) -> list[Path]:
    if _GLOB_CHARS.search(item):
        return _expand_glob(item)
    path = Path(item).expanduser()
    if path.is_dir():
        return _expand_dir(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file or directory")
    if not _has_supported_suffix(path.name):
        raise DataError(f"{path}: unsupported file type; expected one of {', '.join(SUPPORTED_SUFFIXES)}")
    return [path]


def _expand_item(item: str) -> list[str]:
    split = _embedded_split(item)
    if split is not None:
        return [_embedded_path(split)]
    if _is_uri(item):
        return [item]
    return [str(p.resolve()) for p in _expand_local(item)]


def resolve_inputs(spec: str) -> list[str]:
    """Expand ``--data PATH[,PATH...]`` into the files to read, failing before any work starts if one is missing.

    Items keep the order given; a directory or glob expands to its supported files, sorted; local paths come
    back absolute; ``scheme://`` URIs (``s3://`` ...) pass through untouched; ``embedded[:train|:eval]`` is the
    embedded corpus, written to the cache dir. A file named twice is read once (first position).
    """
    items = [item.strip() for item in spec.split(",")]
    if not spec.strip() or not all(items):
        raise DataError(f"--data {spec!r}: expected PATH[,PATH...] with no empty items")
    paths: list[str] = []
    for item in items:
        paths += [p for p in _expand_item(item) if p not in paths]
    return paths


# --------------------------------------------------------------------------------------------------
# Parsing documents (pure functions, run inside Ray tasks and in local validation)
# --------------------------------------------------------------------------------------------------


def split_documents(text: str) -> list[str]:
    """Split plain text into documents at blank (empty or whitespace-only) lines, keeping line breaks inside."""
    docs: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            docs.append("\n".join(current))
            current = []
    if current:
        docs.append("\n".join(current))
    return docs


def _decode(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc})") from exc


def _json_line_text(line: str, path: str, lineno: int) -> str:
    """One JSON-lines record's ``text``; anything else is an error naming the file and line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}); expected one JSON object per line") from exc
    if not isinstance(record, dict):
        raise DataError(
            f"{path}:{lineno}: expected a JSON object with a string 'text' field, got {type(record).__name__}"
        )
    text = record.get(TEXT_COLUMN)
    if not isinstance(text, str):
        got = "no 'text' field" if TEXT_COLUMN not in record else f"'text' of type {type(text).__name__}"
        raise DataError(f"{path}:{lineno}: record has {got}; expected a string 'text' field")
    return text


def _json_lines_documents(text: str, path: str) -> list[str]:
    docs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            docs.append(_json_line_text(line, path, lineno))
    return docs


def _check_parquet_schema(schema: pa.Schema, path: str) -> None:
    if TEXT_COLUMN not in schema.names:
        raise DataError(f"{path}: parquet file has no 'text' column (columns: {', '.join(schema.names) or 'none'})")
    kind = schema.field(TEXT_COLUMN).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{path}: parquet column 'text' has type {kind}; expected string")


def _parquet_documents(data: bytes, path: str) -> list[str]:
    try:
        parquet = pq.ParquetFile(pa.BufferReader(data))
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: could not read as parquet ({exc})") from exc
    _check_parquet_schema(parquet.schema_arrow, path)
    texts = parquet.read(columns=[TEXT_COLUMN]).column(TEXT_COLUMN)
    if texts.null_count:
        raise DataError(f"{path}: column 'text' has {texts.null_count} null values; expected a string in every row")
    return texts.to_pylist()


def _file_documents(data: bytes, path: str) -> list[str]:
    """Documents of one input file, by suffix; empty documents carry no text and are dropped."""
    lower = path.lower()
    if lower.endswith(".parquet"):
        docs = _parquet_documents(data, path)
    elif lower.endswith(".txt"):
        docs = split_documents(_decode(data, path))
    else:
        docs = _json_lines_documents(_decode(data, path), path)
    return [d for d in docs if d]


def _parse_files_batch(batch: pa.Table) -> pa.Table:
    """Ray ``map_batches`` UDF: rows of (path, file bytes) → rows of documents, in file order."""
    docs: list[str] = []
    for path, data in zip(batch.column("path").to_pylist(), batch.column("bytes").to_pylist(), strict=True):
        docs += _file_documents(data, path)
    return pa.table({TEXT_COLUMN: pa.array(docs, type=pa.large_string())})


# --------------------------------------------------------------------------------------------------
# Reading with Ray Data
# --------------------------------------------------------------------------------------------------


def _validate_json_lines(path: str) -> None:
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    _json_line_text(line, path, lineno)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc})") from exc


def _validate_parquet(path: str) -> None:
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: could not read as parquet ({exc})") from exc
    _check_parquet_schema(schema, path)


def _validate_local(path: str) -> None:
    """Catch missing files and malformed records on the driver, before Ray schedules anything."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    lower = path.lower()
    if lower.endswith((".jsonl", ".json")):
        _validate_json_lines(path)
    elif lower.endswith(".parquet"):
        _validate_parquet(path)
    elif not lower.endswith(".txt"):
        raise DataError(f"{path}: unsupported file type; expected one of {', '.join(SUPPORTED_SUFFIXES)}")


def _expand_uri(uri: str) -> list[str]:
    """A URI naming a file is kept; a directory URI is listed through pyarrow.fs like a local directory."""
    if _has_supported_suffix(uri):
        return [uri]
    scheme = uri.split("://", 1)[0]
    try:
        fs, root = pafs.FileSystem.from_uri(uri)
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{uri}: could not list ({exc})") from exc
    files = sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.File
        and _has_supported_suffix(i.path)
        and not any(part.startswith(".") for part in i.path[len(root) :].split("/"))
    )
    if not files:
        raise DataError(f"{uri}: no {'/'.join(SUPPORTED_SUFFIXES)} files under this URI")
    return [f"{scheme}://{f}" for f in files]


def _ordered(ds: ray.data.Dataset) -> ray.data.Dataset:
    """Make this dataset (and those derived from it) keep row order; its context is a private copy."""
    ds.context.execution_options.preserve_order = True
    return ds


def read_documents(paths: Sequence[str], *, validate: bool = True) -> ray.data.Dataset:
    """A Ray dataset with one ``text`` column, one row per document, in the order of ``paths``.

    ``.txt``: documents separated by blank lines; ``.jsonl`` / ``.json``: JSON lines, the ``text`` field of every
    record; ``.parquet``: the ``text`` column. Empty documents are dropped. Local files are validated on the driver
    (``validate``); problems in remote files surface as ``DataError`` when ``build_blocks`` executes the dataset.
    """
    if not paths:
        raise DataError("no input files to read")
    files: list[str] = []
    for path in paths:
        files += _expand_uri(path) if _is_uri(path) else [path]
    if validate:
        for path in files:
            if not _is_uri(path):
                _validate_local(path)
    # One reader for every format: Ray's union interleaves its inputs' blocks, so mixing readers loses the order.
    ds = _ordered(ray.data.read_binary_files(files, include_paths=True))
    return _ordered(ds.map_batches(_parse_files_batch, batch_format="pyarrow", batch_size=None))


# --------------------------------------------------------------------------------------------------
# Tokenising with Ray Data
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _load_tokenizer(model_dir: str) -> Tokenizer:
    """Parse ``tokenizer.json`` once per process (each Ray worker keeps its own copy across batches)."""
    return Tokenizer.from_dir(model_dir)


def _tokenize_batch(batch: pa.Table, model_dir: str) -> pa.Table:
    """Ray ``map_batches`` UDF: ``text`` → ``ids`` (no special tokens; EOS is added when packing)."""
    ids = _load_tokenizer(model_dir).encode_batch(batch.column(TEXT_COLUMN).to_pylist())
    return pa.table({IDS_COLUMN: pa.array(ids, type=pa.list_(pa.int32()))})


def tokenize(docs: ray.data.Dataset, model_dir: str | Path) -> ray.data.Dataset:
    """Encode each document with the model directory's tokenizer in parallel; one ``ids`` row per document."""
    model_dir = str(Path(model_dir).expanduser().resolve())
    out = docs.map_batches(
        _tokenize_batch, fn_kwargs={"model_dir": model_dir}, batch_format="pyarrow", batch_size=_TOKENIZE_BATCH
    )
    return _ordered(out)


@contextmanager
def _ray_data_errors() -> Iterator[None]:
    """Turn a ``DataError`` raised inside a Ray task back into a plain ``DataError`` with its own message."""
    try:
        yield
    except DataError:
        raise
    except Exception as exc:
        match = _REMOTE_DATA_ERROR.search(str(exc))
        if match is None:
            raise
        raise DataError(match.group(1)) from exc


def _stream_chunks(ids: pa.ChunkedArray, eos_id: int) -> Iterator[np.ndarray]:
    """Each document's ids followed by EOS, vectorised per arrow chunk (no Python loop over tokens)."""
    for chunk in ids.chunks:
        offsets = chunk.offsets.to_numpy()
        values = chunk.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        yield np.insert(values, offsets[1:] - offsets[0], eos_id)


def _collect_stream(ids_ds: ray.data.Dataset, eos_id: int) -> tuple[np.ndarray, int]:
    """Execute the pipeline and bring the token stream (EOS after every document) to the driver, in order."""
    parts: list[np.ndarray] = []
    documents = 0
    with _ray_data_errors():
        for batch in ids_ds.iter_batches(batch_format="pyarrow", batch_size=None):
            column = batch.column(IDS_COLUMN)
            documents += len(column)
            parts += list(_stream_chunks(column, eos_id))
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return stream, documents


# --------------------------------------------------------------------------------------------------
# Packing (pure)
# --------------------------------------------------------------------------------------------------


def token_stream(token_lists: Iterable[Sequence[int]], eos_id: int) -> np.ndarray:
    """Concatenate documents' token ids, each followed by ``eos_id`` (so the model learns where documents end)."""
    parts = [np.append(np.asarray(ids, dtype=np.int64), np.int64(eos_id)) for ids in token_lists]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def blocks_from_stream(stream: np.ndarray | Sequence[int], seq_len: int) -> torch.Tensor:
    """Cut a token stream into consecutive ``[N, seq_len]`` blocks, dropping the incomplete remainder."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a block predicts tokens 2..seq_len), got {seq_len}")
    flat = torch.as_tensor(np.asarray(stream, dtype=np.int64))
    n = flat.numel() // seq_len
    return flat[: n * seq_len].reshape(n, seq_len).clone()


def pack_stream(token_lists: Iterable[Sequence[int]], seq_len: int, eos_id: int) -> torch.Tensor:
    """Documents → LongTensor ``[N, seq_len]``: EOS after each document, concatenated, remainder dropped.

    Blocks are trained on with next-token targets inside the block (``next_token_loss``), so no ``seq_len + 1``
    overlap is kept: the first token of every block is context only, never a target. ``N`` may be 0.
    """
    return blocks_from_stream(token_stream(token_lists, eos_id), seq_len)


# --------------------------------------------------------------------------------------------------
# build_blocks
# --------------------------------------------------------------------------------------------------


@dataclass
class TokenBlocks:
    """Packed training (and optional evaluation) blocks, plus counts for logging.

    ``tokens``/``documents`` describe the training spec's token stream (EOS included), before the remainder is
    dropped and before any held-out tail is split off.
    """

    train: torch.Tensor
    eval: torch.Tensor | None
    tokens: int
    documents: int = 0

    @property
    def seq_len(self) -> int:
        return int(self.train.shape[1])


def _eos_id(model_dir: str | Path) -> int:
    eos = _load_tokenizer(str(Path(model_dir).expanduser().resolve())).eos_token_id
    if eos is None:
        raise DataError(f"{model_dir}: the tokenizer has no EOS token; packing needs one to separate documents")
    return eos


def _spec_blocks(
    spec: str, model_dir: str | Path, seq_len: int, eos_id: int, what: str
) -> tuple[torch.Tensor, int, int]:
    """Read, tokenise and pack one ``--data`` spec; fail when it cannot fill a single block."""
    docs = read_documents(resolve_inputs(spec))
    stream, documents = _collect_stream(tokenize(docs, model_dir), eos_id)
    blocks = blocks_from_stream(stream, seq_len)
    if len(blocks) == 0:
        raise DataError(
            f"{what} {spec!r}: {stream.size} tokens in {documents} documents (EOS included), fewer than one block "
            f"of seq_len={seq_len}; add data or lower seq_len"
        )
    return blocks, int(stream.size), documents


def _held_out_count(num_blocks: int, eval_fraction: float, spec: str) -> int:
    """At least one eval block when a fraction is asked for, and at least one training block left."""
    n_eval = max(1, int(num_blocks * eval_fraction))
    if n_eval >= num_blocks:
        raise DataError(
            f"--data {spec!r}: {num_blocks} blocks are too few to hold out eval_fraction={eval_fraction} "
            "and still train; add data, lower seq_len or eval_fraction"
        )
    return n_eval


def build_blocks(
    data_spec: str,
    model_dir: str | Path,
    seq_len: int,
    *,
    eval_spec: str | None = None,
    eval_fraction: float = 0.0,
) -> TokenBlocks:
    """Read + tokenise + pack the training data (and eval data) into blocks on the driver.

    Eval blocks come from ``eval_spec`` when given (``eval_fraction`` is then ignored), else from a held-out tail
    of ``eval_fraction`` of the blocks: a contiguous tail, so at most one document straddles train and eval.
    Packing and the split are fixed (no seed): shuffling happens per epoch in ``rank_batches``. Identical inputs
    always give identical tensors.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    eos = _eos_id(model_dir)
    train, tokens, documents = _spec_blocks(data_spec, model_dir, seq_len, eos, "--data")
    if eval_spec is not None:
        eval_blocks, _, _ = _spec_blocks(eval_spec, model_dir, seq_len, eos, "--eval-data")
        return TokenBlocks(train=train, eval=eval_blocks, tokens=tokens, documents=documents)
    if eval_fraction > 0.0:
        n_eval = _held_out_count(len(train), eval_fraction, data_spec)
        return TokenBlocks(
            train=train[:-n_eval].clone(), eval=train[-n_eval:].clone(), tokens=tokens, documents=documents
        )
    return TokenBlocks(train=train, eval=None, tokens=tokens, documents=documents)


# --------------------------------------------------------------------------------------------------
# Deterministic batches per data-parallel rank
# --------------------------------------------------------------------------------------------------


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def steps_per_epoch(num_blocks: int, global_batch: int) -> int:
    """Optimizer steps per pass over the blocks; the last ``num_blocks % global_batch`` of each permutation wait."""
    _check_positive(global_batch=global_batch)
    steps = num_blocks // global_batch
    if steps == 0:
        raise DataError(
            f"{num_blocks} blocks are fewer than one global batch of {global_batch} "
            "(dp_size × grad_accum × micro_batch); add data or reduce the batch"
        )
    return steps


def _permutation(num_blocks: int, seed: int, epoch: int) -> np.ndarray:
    """The same permutation on every rank and every restart: seeded by (seed, epoch) only."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    return np.random.default_rng([seed, epoch]).permutation(num_blocks)


def _step_indices(num_blocks: int, step: int, global_batch: int, seed: int, epoch: int) -> np.ndarray:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    per_epoch = steps_per_epoch(num_blocks, global_batch)
    perm = _permutation(num_blocks, seed, epoch + step // per_epoch)
    start = (step % per_epoch) * global_batch
    return perm[start : start + global_batch]


def global_step_batch(blocks: torch.Tensor, step: int, *, global_batch: int, seed: int, epoch: int = 0) -> torch.Tensor:
    """All rows of optimizer step ``step`` ``[global_batch, seq_len]``, in rank order; a pure function of its args.

    Step ``s`` uses epoch ``epoch + s // steps_per_epoch`` and, within that epoch's permutation, the
    ``s % steps_per_epoch``-th run of ``global_batch`` consecutive indices.
    """
    index = torch.from_numpy(_step_indices(len(blocks), step, global_batch, seed, epoch))
    return blocks[index]


def rank_batches(
    blocks: torch.Tensor,
    *,
    dp_rank: int,
    dp_size: int,
    micro_batch: int,
    grad_accum: int,
    seed: int,
    epoch: int = 0,
    start_step: int = 0,
) -> Iterator[list[torch.Tensor]]:
    """Endless per-step lists of ``grad_accum`` micro-batches ``[micro_batch, seq_len]`` for this rank.

    The step's global batch (``dp_size × grad_accum × micro_batch`` rows, ``global_step_batch``) is split into
    contiguous shares, rank ``r`` taking rows ``[r·A·M, (r+1)·A·M)`` cut into its ``A`` micro-batches. So the rows
    of a step only depend on the global batch size, not on the layout, and resuming at ``start_step`` yields
    exactly what iterating from 0 would have yielded from that step on.
    """
    _check_positive(dp_size=dp_size, micro_batch=micro_batch, grad_accum=grad_accum)
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
    share = grad_accum * micro_batch
    global_batch = dp_size * share
    steps_per_epoch(len(blocks), global_batch)  # fail now, not at the first next()
    return _rank_batch_iter(blocks, dp_rank, share, micro_batch, global_batch, seed, epoch, start_step)


def _rank_batch_iter(
    blocks: torch.Tensor,
    dp_rank: int,
    share: int,
    micro_batch: int,
    global_batch: int,
    seed: int,
    epoch: int,
    start_step: int,
) -> Iterator[list[torch.Tensor]]:
    step = start_step
    while True:
        indices = _step_indices(len(blocks), step, global_batch, seed, epoch)[dp_rank * share : (dp_rank + 1) * share]
        rows = blocks[torch.from_numpy(indices)]
        yield list(rows.split(micro_batch))
        step += 1
