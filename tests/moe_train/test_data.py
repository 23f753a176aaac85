"""The training data pipeline: --data resolution, Ray Data reading, tokenising + packing, and per-rank batches.

Ray is started once for the module (2 CPUs, local); every pipeline run is small so the module stays fast.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch

from moe_core.corpus import embedded_corpus
from moe_core.tokenizer import Tokenizer
from moe_train.data import (
    DataError,
    blocks_from_stream,
    build_blocks,
    corpus_cache_dir,
    global_step_batch,
    pack_stream,
    rank_batches,
    read_documents,
    resolve_inputs,
    split_documents,
    steps_per_epoch,
    token_stream,
)
from upmoe.cli import main as upmoe_main

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    """One local Ray for the whole module; only shut down if this module started it."""
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "debug"
    assert upmoe_main(["init", str(path), "--preset", "debug"]) == 0
    return path


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("UPMOE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


TXT = "The first document.\nIt has two lines.\n\n\n   \nThe second document.\n"
TXT_DOCS = ["The first document.\nIt has two lines.", "The second document."]
JSONL_DOCS = ["A JSON document.", 'Another one, with a "quote".']
PARQUET_DOCS = ["Parquet row one.", "Parquet row two."]


def _write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def _write_inputs(root: Path) -> Path:
    """a.txt, b.jsonl (extra fields, a blank line, an empty text), c.parquet (an empty row), d.txt; plus noise."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_text(TXT, encoding="utf-8")
    records = [{"text": JSONL_DOCS[0], "id": 1, "meta": {"x": [1, 2]}}, {"text": ""}, {"text": JSONL_DOCS[1]}]
    _write_jsonl(root / "b.jsonl", records)
    with open(root / "b.jsonl", "a", encoding="utf-8") as f:
        f.write("\n")
    pq.write_table(pa.table({"text": [PARQUET_DOCS[0], "", PARQUET_DOCS[1]], "n": [1, 2, 3]}), root / "c.parquet")
    (root / "d.txt").write_text("Last doc.", encoding="utf-8")
    (root / "README.md").write_text("not data", encoding="utf-8")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.txt").write_text("hidden", encoding="utf-8")
    return root


ALL_DOCS = [*TXT_DOCS, *JSONL_DOCS, *PARQUET_DOCS, "Last doc."]


def _texts(ds: ray.data.Dataset) -> list[str]:
    return [row["text"] for row in ds.take_all()]


# ---------------------------------------------------------------------------------------------- resolve


def test_resolve_directory_sorted_absolute_and_filtered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _write_inputs(tmp_path / "data")
    (root / "sub").mkdir()
    (root / "sub" / "e.json").write_text('{"text": "nested"}\n', encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    expected = [str(root / n) for n in ("a.txt", "b.jsonl", "c.parquet", "d.txt", "sub/e.json")]
    assert resolve_inputs("data") == expected
    assert all(Path(p).is_absolute() for p in resolve_inputs("data"))


def test_resolve_keeps_item_order_globs_and_dedupes(tmp_path: Path) -> None:
    root = _write_inputs(tmp_path / "data")
    d, a = str(root / "d.txt"), str(root / "a.txt")
    assert resolve_inputs(f"{d},{a}") == [d, a]  # item order is the user's
    assert resolve_inputs(f"{root}/*.txt") == [a, d]
    assert resolve_inputs(f"{d}, {root}/*") == [d, a, str(root / "b.jsonl"), str(root / "c.parquet")]
    assert resolve_inputs(f"{tmp_path}/**/*.jsonl") == [str(root / "b.jsonl")]


def test_resolve_uris_pass_through(tmp_path: Path) -> None:
    a = _write_inputs(tmp_path / "data") / "a.txt"
    assert resolve_inputs(f"s3://bucket/shards/,{a},gs://b/x.parquet") == [
        "s3://bucket/shards/",
        str(a),
        "gs://b/x.parquet",
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("missing.txt", "missing.txt: no such file or directory"),
        ("nothing*.txt", "nothing*.txt: glob matched no"),
        ("empty_dir", "empty_dir: directory contains no"),
        ("notes.md", "notes.md: unsupported file type"),
        ("a.txt,,a.txt", "no empty items"),
        ("", "no empty items"),
        ("embedded:test", "unknown embedded split 'test'"),
    ],
)
def test_resolve_errors_name_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: str, message: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("x", encoding="utf-8")
    (tmp_path / "notes.md").write_text("x", encoding="utf-8")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "skip.csv").write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match=message.replace("*", r"\*")):
        resolve_inputs(spec)


def test_resolve_embedded_writes_cache_and_repairs_stale_files(cache: Path) -> None:
    train, eval_ = resolve_inputs("embedded"), resolve_inputs("embedded:eval")
    assert corpus_cache_dir() == cache / "corpus"
    assert train == [str((cache / "corpus" / "train.txt").resolve())]
    assert eval_ == [str((cache / "corpus" / "eval.txt").resolve())]
    assert resolve_inputs("embedded:train") == train
    # The tuning split of bench/upcycling_study.py, written alongside.
    assert resolve_inputs("embedded:valid") == [str((cache / "corpus" / "valid.txt").resolve())]
    Path(train[0]).write_text("stale", encoding="utf-8")
    resolve_inputs("embedded")
    assert Path(train[0]).read_text(encoding="utf-8") == embedded_corpus("train")


# ---------------------------------------------------------------------------------------------- read


def test_split_documents_on_blank_lines() -> None:
    assert split_documents(TXT) == TXT_DOCS
    assert split_documents("\n\n  one \n\t\ntwo\r\nlines\n\n\n") == ["  one ", "two\nlines"]
    assert split_documents("") == [] and split_documents("\n \n") == []


def test_read_documents_all_formats_in_path_order(tmp_path: Path) -> None:
    root = _write_inputs(tmp_path / "data")
    ds = read_documents(resolve_inputs(str(root)))
    assert ds.columns() == ["text"]
    assert _texts(ds) == ALL_DOCS
    reordered = read_documents(resolve_inputs(f"{root}/d.txt,{root}/c.parquet,{root}/a.txt"))
    assert _texts(reordered) == ["Last doc.", *PARQUET_DOCS, *TXT_DOCS]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"text": "ok"}', '{"content": "no text"}'], r"bad\.jsonl:2: record has no 'text' field"),
        (['{"text": "ok"}', "", '{"text": 3}'], r"bad\.jsonl:3: record has 'text' of type int"),
        (['["not", "an", "object"]'], r"bad\.jsonl:1: expected a JSON object"),
        (["{broken"], r"bad\.jsonl:1: not valid JSON"),
    ],
)
def test_jsonl_record_errors_name_file_and_line(tmp_path: Path, lines: list[str], message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_documents(resolve_inputs(str(path)))


def test_parquet_without_text_column_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "no_text.parquet"
    pq.write_table(pa.table({"content": ["x"]}), path)
    with pytest.raises(DataError, match=r"no_text\.parquet: parquet file has no 'text' column \(columns: content\)"):
        read_documents([str(path)])
    pq.write_table(pa.table({"text": [1, 2]}), path)
    with pytest.raises(DataError, match=r"no_text\.parquet: parquet column 'text' has type int64"):
        read_documents([str(path)])


def test_uri_directories_are_listed_and_remote_errors_become_data_errors(tmp_path: Path, model_dir: Path) -> None:
    """``file://`` goes down the remote path: listed via pyarrow.fs, validated only inside the Ray tasks."""
    root = _write_inputs(tmp_path / "data")
    assert _texts(read_documents(resolve_inputs(f"file://{root}"))) == ALL_DOCS
    _write_jsonl(root / "e.jsonl", [{"text": "fine"}, {"body": "no text"}])
    with pytest.raises(DataError, match=r"e\.jsonl:2: record has no 'text' field"):
        build_blocks(f"file://{root}", model_dir, 4)


# ---------------------------------------------------------------------------------------------- pack


def test_pack_stream_eos_between_documents_and_remainder_dropped() -> None:
    blocks = pack_stream([[1, 2, 3], [4], [], [5, 6]], seq_len=3, eos_id=0)
    # stream: 1 2 3 0 4 0 0 5 6 0  -> three blocks, the trailing EOS dropped
    assert blocks.dtype == torch.long
    assert blocks.tolist() == [[1, 2, 3], [0, 4, 0], [0, 5, 6]]
    assert pack_stream([[1, 2]], seq_len=4, eos_id=9).shape == (0, 4)
    assert pack_stream([], seq_len=4, eos_id=9).shape == (0, 4)
    assert token_stream([np.array([7, 8]), (9,)], eos_id=1).tolist() == [7, 8, 1, 9, 1]
    assert blocks_from_stream(list(range(7)), 2).tolist() == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="seq_len must be >= 2"):
        blocks_from_stream([1, 2], 1)


def test_build_blocks_equals_tokenising_documents_by_hand(
    tmp_path: Path, model_dir: Path, tokenizer: Tokenizer
) -> None:
    root = _write_inputs(tmp_path / "data")
    eos = tokenizer.eos_token_id
    expected = [t for doc in ALL_DOCS for t in [*tokenizer.encode(doc), eos]]
    seq_len = 7
    result = build_blocks(str(root), model_dir, seq_len)
    n = len(expected) // seq_len
    assert result.tokens == len(expected) and result.documents == len(ALL_DOCS)
    assert result.train.shape == (n, seq_len) and result.eval is None and result.seq_len == seq_len
    assert result.train.flatten().tolist() == expected[: n * seq_len]
    assert torch.equal(result.train, pack_stream([tokenizer.encode(d) for d in ALL_DOCS], seq_len, eos))


def test_empty_or_too_small_data_is_an_error(tmp_path: Path, model_dir: Path) -> None:
    (tmp_path / "blank.txt").write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"0 tokens in 0 documents .* seq_len=16"):
        build_blocks(str(tmp_path / "blank.txt"), model_dir, 16)
    (tmp_path / "tiny.txt").write_text("hi", encoding="utf-8")
    with pytest.raises(DataError, match=r"tiny\.txt'?: \d+ tokens in 1 documents .* seq_len=4096"):
        build_blocks(str(tmp_path / "tiny.txt"), model_dir, 4096)


def test_embedded_build_is_deterministic_with_eval_split(cache: Path, model_dir: Path) -> None:
    first = build_blocks("embedded:eval", model_dir, 128, eval_fraction=0.1)
    second = build_blocks("embedded:eval", model_dir, 128, eval_fraction=0.1)
    assert torch.equal(first.train, second.train) and torch.equal(first.eval, second.eval)
    total = first.tokens // 128
    assert first.eval.shape == (total // 10, 128) and first.train.shape == (total - total // 10, 128)
    whole = build_blocks("embedded:eval", model_dir, 128)
    assert torch.equal(torch.cat([first.train, first.eval]), whole.train)  # the eval split is the tail
    with_spec = build_blocks(str(cache / "corpus" / "eval.txt"), model_dir, 128, eval_spec="embedded:eval")
    assert torch.equal(with_spec.train, whole.train) and torch.equal(with_spec.eval, whole.train)


def test_eval_fraction_needs_a_training_block_left(tmp_path: Path, model_dir: Path) -> None:
    (tmp_path / "short.txt").write_text("one two three four five six", encoding="utf-8")
    with pytest.raises(DataError, match="too few to hold out"):
        build_blocks(str(tmp_path / "short.txt"), model_dir, 4, eval_fraction=0.99)
    with pytest.raises(ValueError, match="eval_fraction"):
        build_blocks(str(tmp_path / "short.txt"), model_dir, 4, eval_fraction=1.0)


# ---------------------------------------------------------------------------------------------- rank batches

BLOCKS = torch.arange(40 * 3).reshape(40, 3)  # every row distinct: rows identify blocks


def _rows(step_batches: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(step_batches)


def test_ranks_union_equals_single_rank_global_batch() -> None:
    dp, micro, accum, seed = 2, 2, 3, 11
    ranks = [
        rank_batches(BLOCKS, dp_rank=r, dp_size=dp, micro_batch=micro, grad_accum=accum, seed=seed) for r in range(dp)
    ]
    single = rank_batches(BLOCKS, dp_rank=0, dp_size=1, micro_batch=micro * dp, grad_accum=accum, seed=seed)
    for step in range(8):  # 3 steps per epoch: crosses two epoch boundaries
        per_rank = [next(it) for it in ranks]
        for batches in per_rank:
            assert len(batches) == accum and all(b.shape == (micro, 3) for b in batches)
        union = torch.cat([_rows(b) for b in per_rank])
        assert torch.equal(union, _rows(next(single)))
        assert torch.equal(union, global_step_batch(BLOCKS, step, global_batch=dp * micro * accum, seed=seed))


def test_epochs_visit_distinct_blocks_with_a_new_permutation_each() -> None:
    gb, seed = 12, 3
    assert steps_per_epoch(len(BLOCKS), gb) == 3
    epochs = [
        torch.cat([global_step_batch(BLOCKS, e * 3 + s, global_batch=gb, seed=seed) for s in range(3)])
        for e in range(3)
    ]
    for rows in epochs:
        assert len({tuple(r) for r in rows.tolist()}) == 36  # no block twice within an epoch
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    assert torch.equal(epochs[1][:gb], global_step_batch(BLOCKS, 0, global_batch=gb, seed=seed, epoch=1))
    assert not torch.equal(
        epochs[0], torch.cat([global_step_batch(BLOCKS, s, global_batch=gb, seed=4) for s in range(3)])
    )


def test_resume_at_start_step_matches_skipping() -> None:
    kwargs = {"dp_size": 2, "micro_batch": 1, "grad_accum": 2, "seed": 7, "epoch": 1}
    for rank in range(2):
        fresh = rank_batches(BLOCKS, dp_rank=rank, **kwargs)
        skipped = list(itertools.islice(fresh, 13, 25))
        resumed = list(itertools.islice(rank_batches(BLOCKS, dp_rank=rank, start_step=13, **kwargs), 12))
        assert len(skipped) == len(resumed) == 12
        for a, b in zip(skipped, resumed, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_rank_batches_validation() -> None:
    with pytest.raises(DataError, match="40 blocks are fewer than one global batch of 48"):
        rank_batches(BLOCKS, dp_rank=0, dp_size=4, micro_batch=4, grad_accum=3, seed=0)
    with pytest.raises(ValueError, match=r"dp_rank must be in \[0, 2\)"):
        rank_batches(BLOCKS, dp_rank=2, dp_size=2, micro_batch=1, grad_accum=1, seed=0)
    with pytest.raises(ValueError, match="micro_batch must be >= 1"):
        rank_batches(BLOCKS, dp_rank=0, dp_size=1, micro_batch=0, grad_accum=1, seed=0)
