"""save_model / load_model: exact round trips, sharding, expert slices, and errors that name what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_core.checkpoint_io import INDEX_FILE, CheckpointError
from moe_core.config import ModelConfig, read_model_config
from moe_core.loading import load_model, save_model
from moe_core.model import CausalLM
from moe_core.registry import get_preset
from moe_core.rope import rope_frequencies

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SMALL_SHARD = 256 * 1024  # debug-moe is ~4 MiB in fp32: many shards


def _model(cfg: ModelConfig, seed: int = 0) -> CausalLM:
    model = CausalLM(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # init_weights leaves biases at 0 and norms at 1; make every tensor distinct
        for name, p in model.named_parameters():
            if name.endswith(".bias") or name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def moe_model() -> CausalLM:
    return _model(get_preset("debug-moe"))


@pytest.fixture(scope="module")
def saved_moe(moe_model: CausalLM, tmp_path_factory) -> Path:
    return save_model(moe_model, tmp_path_factory.mktemp("ckpt") / "moe", max_shard_bytes=SMALL_SHARD)


def _assert_bit_equal(a: torch.nn.Module, b: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
    sa, sb = dict(a.named_parameters()), dict(b.named_parameters())
    assert sa.keys() == sb.keys()
    for name, pa in sa.items():
        want = pa.detach() if dtype is None else pa.detach().to(dtype)
        got = sb[name].detach()
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got.view(-1).view(torch.uint8), want.contiguous().view(-1).view(torch.uint8)), name


def _index(path: Path) -> dict:
    return json.loads((path / INDEX_FILE).read_text())


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _rewrite_shard(model_dir: Path, key: str, change) -> Path:
    """Apply ``change(tensors)`` to the shard holding ``key`` and rewrite the index to match."""
    index = _index(model_dir)
    shard = model_dir / index["weight_map"][key]
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name}
    index["weight_map"].update(dict.fromkeys(tensors, shard.name))
    (model_dir / INDEX_FILE).write_text(json.dumps(index))
    return shard


# ---------------------------------------------------------------------------------------------- round trips


def test_round_trip_fp32_sharded_bit_exact(moe_model: CausalLM, saved_moe: Path) -> None:
    shards = sorted(saved_moe.glob("model-*-of-*.safetensors"))
    assert len(shards) > 3
    assert set(_index(saved_moe)["weight_map"].values()) == {s.name for s in shards}
    config = json.loads((saved_moe / "config.json").read_text())
    assert config["torch_dtype"] == "float32"
    loaded = load_model(saved_moe)
    _assert_bit_equal(moe_model, loaded)
    assert loaded.config.to_hf_dict() == config
    ids = torch.randint(0, 1024, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(moe_model.eval()(ids).logits, loaded.eval()(ids).logits)


@pytest.mark.parametrize("name", ["debug", "debug-tied"])
def test_round_trip_dense(name: str, tmp_path: Path) -> None:
    cfg = get_preset("debug", tie_word_embeddings=name.endswith("tied"))
    model = _model(cfg, seed=3)
    out = save_model(model, tmp_path / "m", max_shard_bytes=SMALL_SHARD)
    keys = set(_index(out)["weight_map"])
    assert ("lm_head.weight" in keys) is not cfg.tie_word_embeddings
    loaded = load_model(out)
    _assert_bit_equal(model, loaded)
    if cfg.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_round_trip_bf16(moe_model: CausalLM, tmp_path: Path) -> None:
    # An fp32 model written as bf16 ...
    out = save_model(moe_model, tmp_path / "bf16", dtype="bf16", max_shard_bytes=SMALL_SHARD)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_model(out, dtype=torch.bfloat16)
    _assert_bit_equal(moe_model, loaded, dtype=torch.bfloat16)
    # ... and a bf16 model saved in its own dtype, read back as bf16 and as fp32.
    again = save_model(loaded, tmp_path / "bf16-again", max_shard_bytes=SMALL_SHARD)
    assert json.loads((again / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _assert_bit_equal(loaded, load_model(again, dtype="bf16"))
    _assert_bit_equal(loaded, load_model(again, dtype="fp32"), dtype=torch.float32)


def test_bf16_weights_keep_fp32_rotary_frequencies(saved_moe: Path) -> None:
    # bf16 frequencies put position 4095 of a 4k context up to radians off; loading or casting must not do that.
    want = rope_frequencies(read_model_config(saved_moe))[0]
    loaded = load_model(saved_moe, dtype="bf16")
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    for model in (loaded, load_model(saved_moe).to(torch.bfloat16), loaded.float().half()):
        assert model.rope_inv_freq.dtype == torch.float32 and torch.equal(model.rope_inv_freq, want)
        assert all(moe.gate.selection_bias.dtype == torch.float32 for moe in model.moe_layers())


def test_saving_keeps_v5_dtype_key(tmp_path: Path) -> None:
    cfg = get_preset("debug", rope_format="v5")
    cfg = cfg.replace(extra={"dtype": "bfloat16", "transformers_version": "5.0.0"})
    out = save_model(_model(cfg), tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32" and "torch_dtype" not in config
    assert "rope_parameters" in config


# ---------------------------------------------------------------------------------------------- expert slices


@pytest.mark.parametrize(("first", "count"), [(32, 32), (0, 16), (48, None)])
def test_load_expert_slice(moe_model: CausalLM, saved_moe: Path, first: int, count: int | None) -> None:
    part = load_model(saved_moe, first_expert=first, num_local_experts=count)
    n = 64 - first if count is None else count
    full_layers, part_layers = moe_model.moe_layers(), part.moe_layers()
    assert len(part_layers) == len(full_layers) == 2
    for full, mine in zip(full_layers, part_layers, strict=True):
        assert mine.experts.owned == range(first, first + n)
        assert mine.experts.gate_up_proj.shape[0] == n
        assert torch.equal(mine.experts.gate_up_proj, full.experts.gate_up_proj[first : first + n])
        assert torch.equal(mine.experts.down_proj, full.experts.down_proj[first : first + n])
        assert torch.equal(mine.gate.weight, full.gate.weight)
        assert torch.equal(mine.shared_expert.down_proj.weight, full.shared_expert.down_proj.weight)
    assert torch.equal(part.lm_head.weight, moe_model.lm_head.weight)


def test_save_refuses_a_partial_model(saved_moe: Path, tmp_path: Path) -> None:
    part = load_model(saved_moe, first_expert=32, num_local_experts=32)
    with pytest.raises(ValueError, match="every expert"):
        save_model(part, tmp_path / "part")
    assert not (tmp_path / "part").exists()


# ---------------------------------------------------------------------------------------------- errors


def test_missing_key_is_named(saved_moe: Path, tmp_path: Path) -> None:
    victim = "model.layers.1.mlp.experts.17.up_proj.weight"
    broken = _copy(saved_moe, tmp_path / "broken")
    _rewrite_shard(broken, victim, lambda t: t.pop(victim))
    assert victim not in _index(broken)["weight_map"]
    with pytest.raises(CheckpointError, match="missing") as e:
        load_model(broken)
    assert victim in str(e.value)


def test_missing_key_still_in_index(saved_moe: Path, tmp_path: Path) -> None:
    """The index names a tensor its shard does not hold: the error names the key and the shard."""
    victim = "model.layers.0.self_attn.k_proj.bias"
    broken = _copy(saved_moe, tmp_path / "broken")
    shard = broken / _index(broken)["weight_map"][victim]
    tensors = load_file(shard)
    del tensors[victim]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        load_model(broken)
    assert victim in str(e.value) and shard.name in str(e.value)


def test_truncated_shard_names_the_file(saved_moe: Path, tmp_path: Path) -> None:
    broken = _copy(saved_moe, tmp_path / "broken")
    shard = sorted(broken.glob("model-*-of-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_model(broken)
    assert str(shard) in str(e.value)


def test_missing_shard_names_the_file(saved_moe: Path, tmp_path: Path) -> None:
    broken = _copy(saved_moe, tmp_path / "broken")
    shard = sorted(broken.glob("model-*-of-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load_model(broken)


def test_shape_mismatch_names_key_and_shapes(tmp_path: Path) -> None:
    out = save_model(_model(get_preset("debug")), tmp_path / "dense")
    config = json.loads((out / "config.json").read_text())
    config["hidden_size"] = 128
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as e:
        load_model(out)
    message = str(e.value)
    assert "model.embed_tokens.weight" in message
    assert "[1024, 64]" in message and "[1024, 128]" in message
    assert ".safetensors" in message


def test_expert_shape_mismatch(saved_moe: Path, tmp_path: Path) -> None:
    broken = _copy(saved_moe, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    config["moe_intermediate_size"] = 16
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"mlp\.experts\.0\.(gate|down)_proj\.weight") as e:
        load_model(broken)
    assert "[32, 64]" in str(e.value) or "[64, 32]" in str(e.value)


def test_unexpected_key_is_an_error(saved_moe: Path, tmp_path: Path) -> None:
    extra = "model.layers.0.mlp.experts.64.up_proj.weight"  # one expert more than config.json says
    broken = _copy(saved_moe, tmp_path / "broken")
    anchor = "model.layers.0.mlp.experts.63.up_proj.weight"
    _rewrite_shard(broken, anchor, lambda t: t.__setitem__(extra, torch.zeros(32, 64)))
    with pytest.raises(CheckpointError, match="not part of") as e:
        load_model(broken)
    assert extra in str(e.value)


def test_ignored_and_tied_copies_are_accepted(tmp_path: Path) -> None:
    """Old checkpoints carry rotary inv_freq buffers, some writers store the tied lm_head: both load."""
    model = _model(get_preset("debug", tie_word_embeddings=True))
    out = save_model(model, tmp_path / "tied")

    def add(tensors: dict) -> None:
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        tensors["lm_head.weight"] = model.lm_head.weight.detach().clone()

    _rewrite_shard(out, "model.embed_tokens.weight", add)
    loaded = load_model(out)
    _assert_bit_equal(model, loaded)


# ---------------------------------------------------------------------------------------------- directory


def test_save_refuses_existing_dir(tmp_path: Path) -> None:
    model = _model(get_preset("debug"))
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="exists"):
        save_model(model, out)
    assert (out / "keep.txt").exists() and not (out / "config.json").exists()
    save_model(model, out, overwrite=True)
    assert (out / "config.json").exists() and not (out / "keep.txt").exists()
    _assert_bit_equal(model, load_model(out))


def test_tokenizer_files_are_copied(tmp_path: Path) -> None:
    tok = tmp_path / "tok"
    tok.mkdir()
    files = {
        "tokenizer.json": '{"version": "1.0", "model": {}}',
        "tokenizer_config.json": '{"model_max_length": 2048}',
        "generation_config.json": '{"eos_token_id": 0}',
        "chat_template.jinja": "{{ messages }}",
    }
    for name, text in files.items():
        (tok / name).write_text(text)
    (tok / "notes.txt").write_text("not a tokenizer file")
    out = save_model(_model(get_preset("debug")), tmp_path / "m", tokenizer_dir=tok)
    for name, text in files.items():
        assert (out / name).read_text() == text
    assert not (out / "notes.txt").exists()
    assert load_model(out).config.vocab_size == 1024


def test_no_tokenizer_dir_copies_nothing(tmp_path: Path) -> None:
    out = save_model(_model(get_preset("debug")), tmp_path / "m")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("model")) == ["config.json"]
