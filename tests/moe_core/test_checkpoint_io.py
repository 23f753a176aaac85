"""Tests for moe_core.checkpoint_io: the model-agnostic safetensors / HF-directory file layer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file

from moe_core import checkpoint_io
from moe_core.checkpoint_io import (
    INDEX_FILE,
    CheckpointError,
    TensorReader,
    TensorSpec,
    atomic_output_dir,
    dir_nbytes,
    read_json,
    save_hf_dir,
    write_safetensors_shards,
)


def _sample_tensors() -> dict[str, torch.Tensor]:
    """Mixed dtypes, including values that would not survive a lossy conversion."""
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=g),
        "model.layers.0.mlp.gate_proj.weight": torch.randn(12, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(12, 8, generator=g).to(torch.float16),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(8, generator=g),
        "model.layers.1.mlp.gate_proj.weight": torch.randn(12, 8, generator=g).to(torch.bfloat16),
        "position_ids": torch.arange(-5, 27, dtype=torch.int64) * (2**40),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }


def _write(tmp_path: Path, name: str = "ckpt", max_shard_bytes: int = 256, **kw) -> tuple[Path, dict]:
    out = tmp_path / name
    index = write_safetensors_shards(_sample_tensors().items(), out, max_shard_bytes=max_shard_bytes, **kw)
    return out, index


def _shards(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("model-*-of-*.safetensors"))


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Compare raw bytes, so -0.0 vs 0.0 or NaN payloads count as differences."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bytes(a.reshape(-1).view(torch.uint8).tolist()) == bytes(b.reshape(-1).view(torch.uint8).tolist())


# ----------------------------------------------------------------------------------------------
# Writing + reading
# ----------------------------------------------------------------------------------------------


def test_round_trip_bit_exact_across_shards(tmp_path: Path) -> None:
    out, index = _write(tmp_path)
    expected = _sample_tensors()
    shards = _shards(out)
    assert len(shards) >= 3
    n = len(shards)
    assert [p.name for p in shards] == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temp files left behind"

    on_disk = json.loads((out / INDEX_FILE).read_text())
    assert on_disk == index
    assert list(index["weight_map"]) == sorted(expected)
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())

    with TensorReader(out) as reader:
        assert reader.keys() == sorted(expected)
        for key, tensor in expected.items():
            got = reader.get(key)
            assert _bits_equal(got, tensor), key
            assert reader.file_of(key).name == index["weight_map"][key]
            assert reader.nbytes(key) == tensor.numel() * tensor.element_size()


def test_shard_size_limit_and_oversized_tensor(tmp_path: Path) -> None:
    tensors = [
        ("a", torch.zeros(10)),
        ("b", torch.zeros(10)),
        ("big", torch.zeros(100)),
        ("c", torch.zeros(10)),
    ]
    index = write_safetensors_shards(tensors, tmp_path / "o", max_shard_bytes=80)
    wm = index["weight_map"]
    assert wm["a"] == wm["b"] != wm["big"]
    assert wm["c"] not in (wm["b"], wm["big"])
    assert len(set(wm.values())) == 3
    for shard in _shards(tmp_path / "o"):
        data = load_file(shard)
        assert sum(t.numel() * 4 for t in data.values()) <= 80 or list(data) == ["big"]


def test_single_shard_still_writes_index(tmp_path: Path) -> None:
    index = write_safetensors_shards([("w", torch.ones(2, 2))], tmp_path / "o")
    assert index["weight_map"] == {"w": "model-00001-of-00001.safetensors"}
    assert (tmp_path / "o" / INDEX_FILE).is_file()


def test_deterministic_bytes(tmp_path: Path) -> None:
    meta = {"b": "2", "a": "1", "z": "26", "source": "test"}
    out1, _ = _write(tmp_path, "one", metadata=meta)
    out2, _ = _write(tmp_path, "two", metadata=dict(reversed(meta.items())))
    names1 = sorted(p.name for p in out1.iterdir())
    assert names1 == sorted(p.name for p in out2.iterdir())
    for name in names1:
        assert (out1 / name).read_bytes() == (out2 / name).read_bytes(), name


def test_safetensors_library_reads_our_shards(tmp_path: Path) -> None:
    """What transformers does: load_file / safe_open on each shard, metadata format == 'pt'."""
    out, index = _write(tmp_path, metadata={"origin": "upmoe"})
    expected = _sample_tensors()
    seen: dict[str, torch.Tensor] = {}
    for shard in _shards(out):
        seen.update(load_file(shard))
        with safetensors.safe_open(str(shard), framework="pt") as f:
            assert f.metadata() == {"format": "pt", "origin": "upmoe"}
    assert set(seen) == set(expected)
    for key, tensor in expected.items():
        assert _bits_equal(seen[key], tensor), key


def test_tensor_data_is_aligned(tmp_path: Path) -> None:
    """Odd-sized 1-byte/2-byte tensors must not push wider tensors off their natural alignment."""
    tensors = [("a_u8", torch.ones(3, dtype=torch.uint8)), ("b_bf16", torch.ones(5, dtype=torch.bfloat16))]
    tensors += [("c_f32", torch.ones(3)), ("d_i64", torch.ones(1, dtype=torch.int64))]
    write_safetensors_shards(tensors, tmp_path / "o")
    (shard,) = _shards(tmp_path / "o")
    raw = shard.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert int.from_bytes(raw[:8], "little") % 8 == 0
    sizes = {"U8": 1, "BF16": 2, "F32": 4, "I64": 8}
    for key, info in header.items():
        if key != "__metadata__":
            assert info["data_offsets"][0] % sizes[info["dtype"]] == 0, key
    assert load_file(shard)["b_bf16"].tolist() == [1.0] * 5


def test_non_contiguous_and_grad_tensors(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    param = torch.nn.Parameter(torch.ones(3))
    write_safetensors_shards([("t", base.t()), ("p", param)], tmp_path / "o")
    with TensorReader(tmp_path / "o") as reader:
        assert torch.equal(reader.get("t"), base.t().contiguous())
        assert torch.equal(reader.get("p"), torch.ones(3))


def test_duplicate_key_rejected_and_cleaned_up(tmp_path: Path) -> None:
    tensors = [("a", torch.zeros(100)), ("b", torch.zeros(100)), ("a", torch.ones(1))]
    with pytest.raises(CheckpointError, match="duplicate tensor key 'a'"):
        write_safetensors_shards(tensors, tmp_path / "o", max_shard_bytes=400)
    assert list((tmp_path / "o").iterdir()) == []


def test_refuses_directory_with_existing_weights(tmp_path: Path) -> None:
    out, _ = _write(tmp_path)
    with pytest.raises(CheckpointError, match="already holds weights"):
        write_safetensors_shards([("x", torch.zeros(1))], out)


def test_get_with_dtype_conversion(tmp_path: Path) -> None:
    out, _ = _write(tmp_path)
    expected = _sample_tensors()
    with TensorReader(out) as reader:
        key = "model.layers.0.mlp.gate_proj.weight"
        got = reader.get(key, dtype=torch.float32)
        assert got.dtype == torch.float32
        assert torch.equal(got, expected[key].float())
        assert reader.get("position_ids", dtype=torch.int64).dtype == torch.int64


def test_get_slice_reads_rows(tmp_path: Path) -> None:
    out, _ = _write(tmp_path)
    expected = _sample_tensors()
    key = "model.embed_tokens.weight"
    with TensorReader(out) as reader:
        assert _bits_equal(reader.get_slice(key, 3, 7), expected[key][3:7])
        assert reader.get_slice(key, 5, 5).shape == (0, 8)
        bf = reader.get_slice("model.layers.0.mlp.gate_proj.weight", 0, 2, dtype=torch.float32)
        assert torch.equal(bf, expected["model.layers.0.mlp.gate_proj.weight"][0:2].float())
        with pytest.raises(CheckpointError, match="out of range"):
            reader.get_slice(key, 10, 17)
        with pytest.raises(CheckpointError, match="scalar"):
            reader.get_slice("scalar", 0, 1)


def test_shape_and_dtype_without_reading_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, _ = _write(tmp_path)

    def _no_open(*args: object, **kwargs: object) -> None:
        raise AssertionError("shape/dtype must not open tensor data")

    monkeypatch.setattr(checkpoint_io, "safe_open", _no_open)
    reader = TensorReader(out)
    assert reader.shape("model.embed_tokens.weight") == (16, 8)
    assert reader.shape("scalar") == ()
    assert reader.dtype("model.layers.0.mlp.up_proj.weight") == torch.float16
    assert reader.dtype("position_ids") == torch.int64
    assert reader.nbytes("model.layers.0.mlp.gate_proj.weight") == 12 * 8 * 2
    assert "scalar" in reader and "nope" not in reader
    reader.close()


def test_reader_lazy_opens_only_needed_shards(tmp_path: Path) -> None:
    out, index = _write(tmp_path)
    reader = TensorReader(out)
    reader.get("scalar")
    assert list(reader._handles) == [out / index["weight_map"]["scalar"]]
    reader.close()
    with pytest.raises(ValueError, match="closed"):
        reader.get("scalar")


def test_single_file_checkpoint(tmp_path: Path) -> None:
    d = tmp_path / "single"
    d.mkdir()
    save_file({"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}, d / "model.safetensors")
    with TensorReader(d) as reader:
        assert reader.keys() == ["b", "w"]
        assert reader.file_of("w") == d / "model.safetensors"
        assert torch.equal(reader.get_slice("w", 1, 2), torch.tensor([[3.0, 4.0, 5.0]]))
    assert dir_nbytes(d) == (d / "model.safetensors").stat().st_size


def test_dir_nbytes_sums_shards(tmp_path: Path) -> None:
    out, _ = _write(tmp_path)
    assert dir_nbytes(out) == sum(p.stat().st_size for p in _shards(out))


# ----------------------------------------------------------------------------------------------
# Corruption and inconsistency
# ----------------------------------------------------------------------------------------------


def test_truncated_shard(tmp_path: Path) -> None:
    out, index = _write(tmp_path)
    victim = out / index["weight_map"]["model.embed_tokens.weight"]
    size = victim.stat().st_size
    os.truncate(victim, size - 13)
    reader = TensorReader(out)  # discovery only stats files; the header check happens on first use
    with pytest.raises(CheckpointError, match="truncated") as err:
        reader.get("model.embed_tokens.weight")
    assert victim.name in str(err.value)
    assert "header declares" in str(err.value)
    with pytest.raises(CheckpointError, match="truncated"):
        reader.validate()


def test_trailing_garbage(tmp_path: Path) -> None:
    out, index = _write(tmp_path)
    victim = out / index["weight_map"]["scalar"]
    with victim.open("ab") as f:
        f.write(b"\0" * 5)
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        TensorReader(out).shape("scalar")
    assert victim.name in str(err.value)


def test_garbage_header(tmp_path: Path) -> None:
    out, index = _write(tmp_path)
    victim = out / index["weight_map"]["scalar"]
    raw = bytearray(victim.read_bytes())
    raw[8:12] = b"\xff\xfe!!"  # header length intact, JSON destroyed
    victim.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="not valid JSON") as err:
        TensorReader(out).get("scalar")
    assert victim.name in str(err.value)

    victim.write_bytes(b"\xff" * 64)  # absurd header length
    with pytest.raises(CheckpointError, match="truncated or corrupt: header length"):
        TensorReader(out).get("scalar")

    victim.write_bytes(b"abc")  # shorter than the length field itself
    with pytest.raises(CheckpointError, match="at least 8 bytes"):
        TensorReader(out).get("scalar")


def test_missing_shard_listed_in_index(tmp_path: Path) -> None:
    out, index = _write(tmp_path)
    gone = index["weight_map"]["scalar"]
    (out / gone).unlink()
    with pytest.raises(CheckpointError, match="missing shard") as err:
        TensorReader(out)
    assert gone in str(err.value)
    with pytest.raises(CheckpointError, match=gone):
        dir_nbytes(out)


def test_missing_key_suggests_close_matches(tmp_path: Path) -> None:
    out, _ = _write(tmp_path)
    with TensorReader(out) as reader:
        with pytest.raises(CheckpointError) as err:
            reader.get("model.layers.0.mlp.gate_proj.weights")
    msg = str(err.value)
    assert "'model.layers.0.mlp.gate_proj.weights'" in msg
    assert str(out) in msg
    assert "close matches: model.layers.0.mlp.gate_proj.weight" in msg


def test_index_key_not_in_shard_header(tmp_path: Path) -> None:
    out, index = _write(tmp_path)
    shard = index["weight_map"]["scalar"]
    index["weight_map"]["model.ghost.weight"] = shard
    (out / INDEX_FILE).write_text(json.dumps(index))
    reader = TensorReader(out)
    assert "model.ghost.weight" in reader
    with pytest.raises(CheckpointError) as err:
        reader.get("scalar")
    msg = str(err.value)
    assert "'model.ghost.weight'" in msg and shard in msg


def test_no_weights_and_bad_index(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no weights in .*: expected model.safetensors or"):
        TensorReader(tmp_path)
    (tmp_path / INDEX_FILE).write_text('{"weight_map": {"a": "../evil.safetensors"}}')
    with pytest.raises(CheckpointError, match="invalid shard name"):
        TensorReader(tmp_path)
    (tmp_path / INDEX_FILE).write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="weight_map"):
        TensorReader(tmp_path)


def test_read_json_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="missing model config: .*config.json"):
        read_json(tmp_path / "config.json", "model config")
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "a": 1,\n  "b": \n}\n')
    with pytest.raises(CheckpointError, match=r"bad\.json is not valid JSON: .* line 4 column 1"):
        read_json(bad, "config")
    bad.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a JSON object, found list"):
        read_json(bad, "config")
    good = tmp_path / "good.json"
    good.write_text('{"x": [1]}')
    assert read_json(good, "config") == {"x": [1]}


# ----------------------------------------------------------------------------------------------
# Atomic directories and full HF directories
# ----------------------------------------------------------------------------------------------


def test_atomic_output_dir_cleans_up_on_error(tmp_path: Path) -> None:
    out = tmp_path / "model"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(out) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".model.partial-")
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_dir_refuses_existing_and_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "model"
    with atomic_output_dir(out) as tmp:
        (tmp / "old.txt").write_text("old")
    assert (out / "old.txt").read_text() == "old"

    with pytest.raises(CheckpointError, match="exists; pass overwrite=True"):
        with atomic_output_dir(out):
            pass

    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("fail before publishing")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"], "failed overwrite must keep the old dir"

    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"], "no .partial/.old siblings left"


def test_save_hf_dir(tmp_path: Path) -> None:
    tok = tmp_path / "tokenizer.json"
    tok.write_text('{"model": {"type": "BPE"}}')
    config = {"model_type": "qwen2_moe", "num_experts": 8, "architectures": ["Qwen2MoeForCausalLM"]}
    out = save_hf_dir(
        tmp_path / "hf",
        _sample_tensors().items(),
        config,
        max_shard_bytes=512,
        copy_files=[tok],
        extra_json={"generation_config.json": {"eos_token_id": 2}},
    )
    assert out == (tmp_path / "hf").absolute()
    text = (out / "config.json").read_text()
    assert text == json.dumps(config, indent=2, sort_keys=True) + "\n"
    assert (out / "tokenizer.json").read_bytes() == tok.read_bytes()
    assert read_json(out / "generation_config.json", "generation config") == {"eos_token_id": 2}
    with TensorReader(out) as reader:
        assert reader.keys() == sorted(_sample_tensors())

    with pytest.raises(CheckpointError, match="exists; pass overwrite=True"):
        save_hf_dir(out, [("w", torch.zeros(1))], {})
    save_hf_dir(out, [("w", torch.zeros(1))], {"v": 2}, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", INDEX_FILE, "model-00001-of-00001.safetensors"]
    )


def test_save_hf_dir_fails_fast_without_leaving_output(tmp_path: Path) -> None:
    def _never_consumed():
        raise AssertionError("tensors must not be consumed when a copy file is missing")
        yield  # pragma: no cover

    with pytest.raises(CheckpointError, match="missing: .*tokenizer.json"):
        save_hf_dir(tmp_path / "hf", _never_consumed(), {}, copy_files=[tmp_path / "tokenizer.json"])

    def _crashing():
        yield "a", torch.zeros(4)
        raise RuntimeError("conversion crashed")

    with pytest.raises(RuntimeError, match="conversion crashed"):
        save_hf_dir(tmp_path / "hf", _crashing(), {})
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(CheckpointError, match="config.json"):
        save_hf_dir(tmp_path / "hf", [], {}, extra_json={"config.json": {}})


# ----------------------------------------------------------------------------------------------
# Planned writing: every tensor written where it belongs as it arrives, nothing held
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_shard_bytes", [64, 256, 10**6])
def test_planned_writing_gives_the_same_bytes_as_holding_each_shard(tmp_path: Path, max_shard_bytes: int) -> None:
    held, held_index = _write(tmp_path, "held", max_shard_bytes=max_shard_bytes)
    tensors = _sample_tensors()
    plan = [TensorSpec.of(k, t) for k, t in tensors.items()]
    out = tmp_path / "planned"
    index = write_safetensors_shards(tensors.items(), out, max_shard_bytes=max_shard_bytes, plan=plan)
    assert index == held_index
    assert [p.name for p in _shards(out)] == [p.name for p in _shards(held)]
    for a, b in zip(_shards(out), _shards(held), strict=True):
        assert a.read_bytes() == b.read_bytes()


def test_planned_writing_refuses_a_stream_that_differs_from_the_plan(tmp_path: Path) -> None:
    tensors = _sample_tensors()
    plan = [TensorSpec.of(k, t) for k, t in tensors.items()]
    wrong = dict(tensors, scalar=torch.tensor(3.5, dtype=torch.float64))
    with pytest.raises(CheckpointError, match="not the planned"):
        write_safetensors_shards(wrong.items(), tmp_path / "a", max_shard_bytes=256, plan=plan)
    short = list(tensors.items())[:-1]
    with pytest.raises(CheckpointError, match="ended before the planned tensor 'empty'"):
        write_safetensors_shards(short, tmp_path / "b", max_shard_bytes=256, plan=plan)
    for d in (tmp_path / "a", tmp_path / "b"):  # nothing half-written left behind
        assert not [p for p in d.iterdir() if "safetensors" in p.name]
