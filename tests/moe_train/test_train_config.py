"""Training options: relative paths made absolute before workers (in Ray's cwd) see them; option checks."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from moe_train.config import load_train_config
from moe_train.data import build_blocks


def test_relative_paths_become_absolute_and_uris_and_embedded_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_train_config(
        None,
        {
            "model": "models/dense",
            "data": "corpus/*.jsonl,s3://bucket/x.parquet,embedded,embedded:eval",
            "out": "runs/a",
            "eval_data": "held/out.txt",
        },
    )
    assert cfg.model == str(tmp_path / "models" / "dense")
    assert cfg.out == str(tmp_path / "runs" / "a")
    assert cfg.data.split(",") == [
        str(tmp_path / "corpus" / "*.jsonl"),
        "s3://bucket/x.parquet",
        "embedded",
        "embedded:eval",
    ]
    assert cfg.eval_data == str(Path(tmp_path) / "held" / "out.txt")


def test_eval_every_needs_eval_data_and_no_option_is_ignored():
    base = {"model": "m", "data": "embedded", "out": "o"}
    assert load_train_config(None, {**base, "eval_data": "embedded:eval", "eval_every": 5}).eval_every == 5
    with pytest.raises(ValueError, match="--eval-every needs --eval-data"):
        load_train_config(None, {**base, "eval_every": 5})
    with pytest.raises(ValueError, match="--eval-every must be >= 0"):
        load_train_config(None, {**base, "eval_data": "embedded:eval", "eval_every": -1})
    # Packing takes no seed (shuffling is per epoch, in rank_batches): no parameter that would be thrown away.
    assert "seed" not in inspect.signature(build_blocks).parameters
