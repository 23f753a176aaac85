"""Training options: relative paths are made absolute before any worker (whose working directory is Ray's) sees them."""

from __future__ import annotations

from pathlib import Path

from moe_train.config import load_train_config


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
