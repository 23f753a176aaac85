"""``moe_train.export.export_run`` on a run directory laid out here, without Ray: the tokenizer it copies.

The Ray Train runs in test_train_job.py export too (slow); this checks, in seconds, that an exported
directory carries the starting model's tokenizer files unchanged and that transformers tokenizes it as
upmoe does (transformers loads qwen2 and qwen2_moe directories with its own Qwen2Tokenizer pipeline).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_core.checkpoint_io import TensorReader
from moe_core.loading import TOKENIZER_FILES, load_model, save_model
from moe_train.config import TrainConfig
from moe_train.export import export_run
from moe_train.loop import META_FILE, RANK_FILE
from moe_train.trainer import RUN_NAME
from tests.testlib import run_cli
from tests.tokenizer_parity import assert_transformers_tokenizes_like_upmoe


def _run_dir(model_dir: Path, run: Path, step: int) -> Path:
    """What `upmoe train --workers 1 --checkpoint-every N` leaves: train_config.json and one rank-0 checkpoint."""
    cfg = TrainConfig(model=str(model_dir), data="embedded", out=str(run))
    run.mkdir()
    (run / "train_config.json").write_text(json.dumps(cfg.as_dict(), indent=2) + "\n")
    checkpoint = run / "ray" / RUN_NAME / f"checkpoint_{step:06d}"
    checkpoint.mkdir(parents=True)
    torch.save({"model": load_model(model_dir).state_dict(), "step": step}, checkpoint / RANK_FILE.format(rank=0))
    (checkpoint / META_FILE).write_text(json.dumps({"step": step}))
    return run


@pytest.mark.parametrize("preset", ["debug", "debug-moe"])
def test_export_copies_the_tokenizer_and_transformers_tokenizes_like_upmoe(tmp_path: Path, preset: str) -> None:
    model_dir = tmp_path / "init"
    result = run_cli("init", model_dir, "--preset", preset, "--seed", "2")
    assert result.rc == 0, result.err
    exported = export_run(_run_dir(model_dir, tmp_path / "run", step=3), tmp_path / "exported")

    with TensorReader(model_dir) as a, TensorReader(exported) as b:  # the run's weights, exported whole
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get(k), b.get(k)) for k in a.keys())
    copied = [name for name in TOKENIZER_FILES if (model_dir / name).exists()]
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(copied)
    for name in copied:
        assert (exported / name).read_bytes() == (model_dir / name).read_bytes(), name
    assert_transformers_tokenizes_like_upmoe(exported)


def _ep_run_dir(model_dir: Path, run: Path, step: int, ep: int, **train) -> Path:
    """Rank files of an EP run: every rank holds the non-expert weights and its block of experts."""
    cfg = TrainConfig(model=str(model_dir), data="embedded", out=str(run), workers=ep, ep=ep, **train)
    run.mkdir()
    (run / "train_config.json").write_text(json.dumps(cfg.as_dict(), indent=2) + "\n")
    checkpoint = run / "ray" / RUN_NAME / f"checkpoint_{step:06d}"
    checkpoint.mkdir(parents=True)
    experts = load_model(model_dir).config.num_experts // ep
    for rank in range(ep):
        shard = load_model(model_dir, first_expert=rank * experts, num_local_experts=experts)
        torch.save({"model": shard.state_dict(), "step": step}, checkpoint / RANK_FILE.format(rank=rank))
    (checkpoint / META_FILE).write_text(json.dumps({"step": step}))
    return run


@pytest.mark.parametrize(
    ("flag", "dtype"), [(None, torch.float32), ("bf16", torch.bfloat16), ("source", torch.float32)]
)
def test_export_of_ep_rank_files_is_save_model_byte_for_byte(tmp_path: Path, flag: str | None, dtype) -> None:
    model_dir = tmp_path / "init"
    assert run_cli("init", model_dir, "--preset", "debug-moe", "--seed", "2").rc == 0
    run = _ep_run_dir(model_dir, tmp_path / "run", step=3, ep=2)
    args = ["export", run, tmp_path / "exported"] + (["--dtype", flag] if flag else [])
    result = run_cli(*args)
    assert result.rc == 0, result.err
    expected = save_model(load_model(model_dir), tmp_path / "expected", dtype=dtype, tokenizer_dir=model_dir)
    names = sorted(p.name for p in expected.iterdir())
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == names
    for name in names:
        assert (tmp_path / "exported" / name).read_bytes() == (expected / name).read_bytes(), name


def test_export_of_a_gpu_run_defaults_to_bf16(tmp_path: Path) -> None:
    model_dir = tmp_path / "init"
    assert run_cli("init", model_dir, "--preset", "debug-moe", "--seed", "2").rc == 0
    run = _ep_run_dir(model_dir, tmp_path / "run", step=3, ep=2, gpus_per_worker=1)
    exported = export_run(run, tmp_path / "exported")
    with TensorReader(exported) as reader:
        assert {reader.dtype(k) for k in reader.keys()} == {torch.bfloat16}
    assert json.loads((exported / "config.json").read_text())["torch_dtype"] == "bfloat16"
