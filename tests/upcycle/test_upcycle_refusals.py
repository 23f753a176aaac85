"""``upmoe upcycle`` refusals that happen before any work: non-zero exit, a message on stderr that names the
problem, and nothing written. None of these may start Ray (checked after every test)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from upcycle_testlib import run_cli

from upcycle.job import partial_dir


@pytest.fixture(autouse=True)
def no_ray_started() -> Iterator[None]:
    import ray

    was = ray.is_initialized()
    yield
    if not was and ray.is_initialized():
        ray.shutdown()
        pytest.fail("a refused upcycle started Ray: the refusal came after the job had begun")


def _refused(source: Path, out: Path, *flags: str) -> str:
    result = run_cli("upcycle", source, out, "--no-progress", "--eval-tokens", "0", *flags)
    assert result.rc != 0, f"expected a refusal, got rc 0:\n{result.out}"
    assert not partial_dir(out).exists()
    return result.err


def test_existing_out_dir_is_refused_without_overwrite_or_resume(debug_dense: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = _refused(debug_dense, out)
    assert str(out) in err and "exists" in err and "--overwrite" in err and "--resume" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_resume_into_a_foreign_out_dir_is_refused(debug_dense: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = _refused(debug_dense, out, "--resume")
    assert str(out) in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_resume_and_overwrite_together_are_refused(debug_dense: Path, tmp_path: Path) -> None:
    err = _refused(debug_dense, tmp_path / "out", "--resume", "--overwrite")
    assert "--overwrite" in err and "--resume" in err and "not allowed" in err
    assert not (tmp_path / "out").exists()


def test_missing_source_dir(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    err = _refused(missing, tmp_path / "out")
    assert str(missing) in err and "not a directory" in err
    assert not (tmp_path / "out").exists()


def test_source_dir_without_config(tmp_path: Path) -> None:
    src = tmp_path / "empty"
    src.mkdir()
    err = _refused(src, tmp_path / "out")
    assert "config.json" in err
    assert not (tmp_path / "out").exists()


def test_unsupported_model_type_gpt2(tmp_path: Path) -> None:
    src = tmp_path / "gpt2"
    src.mkdir()
    gpt2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64, "n_layer": 2, "n_head": 4}
    (src / "config.json").write_text(json.dumps(gpt2))
    err = _refused(src, tmp_path / "out")
    assert "unsupported model_type 'gpt2'" in err and "qwen2" in err
    assert not (tmp_path / "out").exists()


def test_moe_source_is_refused(debug_dense: Path, tmp_path: Path) -> None:
    src = tmp_path / "already-moe"
    assert run_cli("init", src, "--preset", "debug-moe", "--tokenizer", debug_dense).rc == 0
    err = _refused(src, tmp_path / "out")
    assert "qwen2_moe" in err and "already a mixture of experts" in err
    assert not (tmp_path / "out").exists()


def test_missing_tensor_is_named(debug_dense: Path, tmp_path: Path) -> None:
    """A key the index lists but the weight file lacks (the file rewritten without it)."""
    src = tmp_path / "broken"
    shutil.copytree(debug_dense, src)
    (shard,) = src.glob("model-*.safetensors")
    tensors = load_file(shard)
    key = "model.layers.1.mlp.up_proj.weight"
    del tensors[key]
    save_file(tensors, shard, metadata={"format": "pt"})
    err = _refused(src, tmp_path / "out")
    assert key in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--expert-size", "512"], ["expert size 512", "larger than the dense FFN width 256"]),
        (["--num-experts", "4", "--top-k", "8"], ["8", "4", "num_experts"]),
        (["--top-k", "65"], ["65", "64"]),
        (["--top-k", "0"], ["0", "--top-k"]),
        (["--num-experts", "0"], ["--num-experts", "0"]),
        (["--num-experts", "-3"], ["--num-experts", "-3"]),
        (["--num-shared-experts", "-1"], ["-1"]),
        (["--reinit-ratio", "1.5"], ["reinit_ratio", "1.5"]),
        (["--router-std", "-0.1"], ["router_std", "-0.1"]),
        (
            ["--init", "virtual-group", "--expert-size", "48", "--top-k", "8"],
            ["virtual-group", "256", "48", "multiple"],
        ),
        (["--init", "virtual-group", "--expert-size", "32", "--top-k", "4"], ["virtual-group", "top_k", "4", "8"]),
        (
            ["--init", "preserve", "--num-shared-experts", "2", "--expert-size", "32"],
            ["preserve", "64", "256"],
        ),
        (["--init", "preserve", "--num-shared-experts", "0", "--expert-size", "32"], ["preserve", "256"]),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0].startswith("--") else None,
)
def test_invalid_shapes_are_refused(debug_dense: Path, tmp_path: Path, flags: list[str], needles: list[str]) -> None:
    out = tmp_path / "out"
    err = _refused(debug_dense, out, *flags)
    assert "error" in err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    assert not out.exists()


def test_preserve_refusal_names_both_widths(debug_dense: Path, tmp_path: Path) -> None:
    err = _refused(debug_dense, tmp_path / "out", "--init", "preserve", "--num-shared-experts", "2")
    # default expert size for FFN 256 is 256 // 8 = 32: shared width 2 x 32 = 64 < 256
    assert "64" in err and "256" in err


def test_expert_size_zero_is_refused(debug_dense: Path) -> None:
    result = run_cli("upcycle", "--plan", debug_dense, "--expert-size", "0", "--json")
    assert result.rc != 0 and "--expert-size" in result.err


def test_vocab_size_zero_is_refused(debug_dense: Path) -> None:
    result = run_cli("upcycle", "--plan", debug_dense, "--vocab-size", "0", "--json")
    assert result.rc != 0 and "vocab" in result.err


def test_layers_per_task_zero_is_refused_clearly(debug_dense: Path, tmp_path: Path) -> None:
    err = _refused(debug_dense, tmp_path / "out", "--layers-per-task", "0")
    assert "layers-per-task" in err or "layers_per_task" in err


def test_no_disk_space_is_refused_before_any_task(debug_dense: Path, tmp_path: Path, monkeypatch) -> None:
    import shutil
    from collections import namedtuple

    from upmoe.cli import main

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "out"
    assert main(["upcycle", str(debug_dense), str(out), "--no-progress", "--eval-tokens", "0"]) == 1
    assert not out.exists()
