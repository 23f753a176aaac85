"""ModelConfig <-> HF config.json: exact round trips (v4 and v5 rope styles), YaRN parsing, errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config, Qwen2MoeConfig

from moe_core.config import ConfigError, ModelConfig, ModelType, load_config, save_config
from moe_core.params import count_parameters
from moe_core.registry import get_preset, preset_names
from moe_core.rope import rope_frequencies

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
TINY_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=32)
YARN_V4 = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}

# Qwen2-7B's public config.json (v4 era), written out by hand.
QWEN2_7B_CONFIG_JSON = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.37.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 152064,
}


def _v4_dense() -> dict:
    """A v4-style dict with every key our writer emits, plus keys we do not model ("foo")."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 256,
        "max_position_embeddings": 131072,
        "max_window_layers": 28,
        "model_type": "qwen2",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "pad_token_id": None,
        "rms_norm_eps": 1e-06,
        "rope_scaling": dict(YARN_V4),
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 1024,
        "foo": 1,
        "bar": {"nested": [1, 2, {"x": None}]},
    }


def _v4_moe() -> dict:
    d = _v4_dense()
    d.update(
        architectures=["Qwen2MoeForCausalLM"],
        model_type="qwen2_moe",
        num_experts=64,
        num_experts_per_tok=8,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=256,
        norm_topk_prob=False,
        router_aux_loss_coef=0.001,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        output_router_logits=False,
    )
    return d


def _hf_saved(tmp_path: Path, config) -> dict:
    """config.json as transformers v5 writes it when saving a model (so with architectures and dtype)."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


# ---------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: Qwen2Config(**TINY), id="qwen2"),
        pytest.param(lambda: Qwen2Config(**TINY, tie_word_embeddings=True), id="qwen2-tied"),
        pytest.param(
            lambda: Qwen2Config(
                **TINY,
                max_position_embeddings=2048,
                rope_parameters={
                    "rope_type": "yarn",
                    "factor": 4.0,
                    "original_max_position_embeddings": 512,
                    "rope_theta": 1e6,
                },
            ),
            id="qwen2-yarn",
        ),
        pytest.param(lambda: Qwen2MoeConfig(**TINY, **TINY_MOE), id="qwen2_moe"),
        pytest.param(
            lambda: Qwen2MoeConfig(**TINY, **TINY_MOE, mlp_only_layers=[0], norm_topk_prob=True),
            id="qwen2_moe-mixed",
        ),
    ],
)
def test_round_trip_transformers_v5_files(tmp_path: Path, make) -> None:
    raw = _hf_saved(tmp_path, make())
    assert "rope_parameters" in raw and "architectures" in raw
    cfg = ModelConfig.from_hf_dict(raw)
    assert cfg.rope_format == "v5"
    assert cfg.to_hf_dict() == raw
    # And through the files: load_config + save_config.
    out = tmp_path / "again"
    out.mkdir()
    save_config(load_config(tmp_path), out)
    assert json.loads((out / "config.json").read_text()) == raw


def test_round_trip_v5_config_saved_without_model(tmp_path: Path) -> None:
    """Qwen2MoeConfig.save_pretrained alone writes no "architectures"; ours adds the one model_type implies."""
    Qwen2MoeConfig(**TINY, **TINY_MOE).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert "architectures" not in raw
    assert ModelConfig.from_hf_dict(raw).to_hf_dict() == {**raw, "architectures": ["Qwen2MoeForCausalLM"]}


@pytest.mark.parametrize("make", [_v4_dense, _v4_moe], ids=["qwen2", "qwen2_moe"])
def test_round_trip_v4_dicts_keep_unknown_keys(make) -> None:
    raw = make()
    before = copy.deepcopy(raw)
    cfg = ModelConfig.from_hf_dict(raw)
    assert raw == before, "from_hf_dict must not mutate its input"
    assert cfg.rope_format == "v4"
    assert cfg.extra["foo"] == 1 and cfg.extra["bar"] == {"nested": [1, 2, {"x": None}]}
    assert cfg.extra["torch_dtype"] == "bfloat16" and cfg.extra["transformers_version"] == "4.41.2"
    out = cfg.to_hf_dict()
    assert out == raw
    assert out["rope_scaling"] == YARN_V4  # written back verbatim, with "type" and no "rope_type"
    assert json.loads(cfg.to_json()) == raw


def test_v4_and_v5_yarn_parse_the_same() -> None:
    v4 = _v4_dense()
    v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
    }
    v5["layer_types"] = ["full_attention"] * 2
    a, b = ModelConfig.from_hf_dict(v4), ModelConfig.from_hf_dict(v5)
    assert a.rope_theta == b.rope_theta == 1e6
    expected = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert a.rope_scaling == b.rope_scaling == expected
    (fa, sa), (fb, sb) = rope_frequencies(a), rope_frequencies(b)
    assert torch.equal(fa, fb) and sa == sb
    assert sa == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1.0)
    assert b.to_hf_dict() == v5
    # Switching the style rewrites the rope keys only and keeps the meaning.
    as_v5 = a.replace(rope_format="v5").to_hf_dict()
    assert "rope_scaling" not in as_v5 and as_v5["rope_parameters"] == v5["rope_parameters"]
    again = ModelConfig.from_hf_dict(as_v5)
    assert (again.rope_theta, again.rope_scaling) == (a.rope_theta, a.rope_scaling)


def test_v4_rope_scaling_spellings() -> None:
    """ "type" (transformers < 4.45), "rope_type", or both: the same normalised scaling."""
    base = _v4_dense()
    variants = [
        {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
        {"type": "yarn", "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    ]
    parsed = [ModelConfig.from_hf_dict({**base, "rope_scaling": v}) for v in variants]
    assert all(p.rope_scaling == parsed[0].rope_scaling for p in parsed)
    assert all(p.to_hf_dict()["rope_scaling"] == v for p, v in zip(parsed, variants, strict=True))
    # "default" scaling is plain RoPE.
    assert ModelConfig.from_hf_dict({**base, "rope_scaling": {"type": "default"}}).rope_scaling is None
    # A changed scaling is written with both spellings so old and new transformers read it.
    changed = parsed[0].replace(rope_scaling={"rope_type": "linear", "factor": 2.0}).to_hf_dict()["rope_scaling"]
    assert changed == {"type": "linear", "rope_type": "linear", "factor": 2.0}


def test_transformers_reads_our_v4_yarn_file(tmp_path: Path) -> None:
    cfg = get_preset(
        "debug", rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}
    )
    save_config(cfg, tmp_path)
    hf = AutoConfig.from_pretrained(tmp_path)
    assert hf.rope_parameters["rope_type"] == "yarn"
    assert hf.rope_parameters["factor"] == 4.0
    assert hf.rope_parameters["original_max_position_embeddings"] == 512
    assert hf.rope_parameters["rope_theta"] == 1e6
    assert type(hf).__name__ == "Qwen2Config"


# ---------------------------------------------------------------------------------------------- public shapes


def test_qwen2_7b_public_config_matches_preset(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(QWEN2_7B_CONFIG_JSON, indent=2))
    cfg = load_config(tmp_path)
    preset = get_preset("qwen2-7b")
    assert cfg.model_type is ModelType.DENSE
    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "attn_head_dim",
        "max_position_embeddings",
        "rope_theta",
        "rope_scaling",
        "rms_norm_eps",
        "tie_word_embeddings",
        "sliding_window",
        "max_window_layers",
        "bos_token_id",
        "eos_token_id",
        "qkv_bias",
    ):
        assert getattr(cfg, name) == getattr(preset, name), name
    assert cfg.attn_head_dim == 128
    # The public file round-trips exactly: no key added (not even nulls for keys it leaves out), none changed.
    assert cfg.to_hf_dict() == QWEN2_7B_CONFIG_JSON


# Tiny presets: the shapes the tests and the demo use (every public preset has >= 0.5B parameters).
TINY_PRESETS = [n for n in preset_names() if count_parameters(get_preset(n)).total < 10**8]


def test_tiny_presets_are_found() -> None:
    assert {"debug", "debug-moe"} <= set(TINY_PRESETS)


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_tiny_presets_fit_vllm_cpu_attention(name: str, tmp_path: Path) -> None:
    """vLLM's CPU attention refuses head_dim < 32 ("Unsupported CPU attention configuration: head_dim=16"), so
    a tiny checkpoint must have heads of >= 32 to be served by vLLM; it keeps GQA (more query than KV heads)
    so the grouped KV path stays covered."""
    cfg = get_preset(name)
    assert cfg.attn_head_dim >= 32
    assert cfg.num_attention_heads > cfg.num_key_value_heads
    # transformers (and vLLM, with the same rule) derive the same head_dim from the config.json we write.
    save_config(cfg, tmp_path)
    hf = AutoConfig.from_pretrained(tmp_path)
    assert (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads) == cfg.attn_head_dim
    assert (hf.num_attention_heads, hf.num_key_value_heads) == (cfg.num_attention_heads, cfg.num_key_value_heads)


def test_preset_written_by_us_is_read_by_transformers(tmp_path: Path) -> None:
    cfg = get_preset("qwen2-57b-a14b")
    save_config(cfg, tmp_path)
    hf = AutoConfig.from_pretrained(tmp_path)
    assert type(hf).__name__ == "Qwen2MoeConfig"
    assert (hf.num_experts, hf.num_experts_per_tok, hf.moe_intermediate_size) == (64, 8, 2560)
    assert hf.shared_expert_intermediate_size == 20480 and hf.norm_topk_prob is False
    back = load_config(tmp_path)
    assert back.extra == {"architectures": ["Qwen2MoeForCausalLM"]}
    assert back.to_hf_dict() == cfg.to_hf_dict()


# ---------------------------------------------------------------------------------------------- errors


def test_unsupported_model_type_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**QWEN2_7B_CONFIG_JSON, "model_type": "llama"}))
    with pytest.raises(ConfigError, match="unsupported model_type 'llama'") as e:
        load_config(tmp_path)
    assert str(path) in str(e.value)
    with pytest.raises(ConfigError, match="my-source.json"):
        ModelConfig.from_hf_dict({**QWEN2_7B_CONFIG_JSON, "model_type": "gpt2"}, source="my-source.json")
    with pytest.raises(ConfigError, match="model_type"):
        ModelConfig.from_hf_dict({k: v for k, v in QWEN2_7B_CONFIG_JSON.items() if k != "model_type"})


def test_missing_config_json(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing config.json") as e:
        load_config(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)
    with pytest.raises(ConfigError, match="missing config.json"):
        load_config(tmp_path / "nowhere" / "config.json")


def test_invalid_json_reports_line(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{\n  "model_type": "qwen2",\n  "hidden_size": 64\n  "vocab_size": 10\n}\n')
    with pytest.raises(ConfigError, match=r"invalid JSON at line 4") as e:
        load_config(path)
    assert str(path) in str(e.value)
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        load_config(path)


def test_top_k_larger_than_num_experts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        get_preset("debug-moe", num_experts_per_tok=65)
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        get_preset("debug-moe", num_experts_per_tok=0)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**_v4_moe(), "num_experts_per_tok": 65}))
    with pytest.raises(ConfigError, match="num_experts_per_tok") as e:
        load_config(tmp_path)
    assert str(path) in str(e.value)
    assert get_preset("debug-moe", num_experts_per_tok=64).num_experts_per_tok == 64


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_key_value_heads": 3}, "multiple of"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"use_sliding_window": True}, "sliding_window"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "dynamic"),
        ({"rope_scaling": [1, 2]}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "default"}}, "rope_theta"),
        ({"hidden_size": None}, "cfg.json"),  # a TypeError, still reported as ConfigError
    ],
)
def test_invalid_values_raise_config_error(change: dict, message: str) -> None:
    raw = {**_v4_dense(), **change}
    with pytest.raises(ConfigError, match=message) as e:
        ModelConfig.from_hf_dict(raw, source="cfg.json")
    assert "cfg.json" in str(e.value)


def test_missing_required_key_is_named() -> None:
    raw = {k: v for k, v in _v4_dense().items() if k != "intermediate_size"}
    with pytest.raises(ConfigError, match="intermediate_size"):
        ModelConfig.from_hf_dict(raw)


def test_moe_layer_rule_matches_transformers() -> None:
    cfg = get_preset("debug-moe", num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3])
    hf = Qwen2MoeConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k not in ("model_type", "architectures")})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf)
    hf_moe = [type(layer.mlp).__name__ == "Qwen2MoeSparseMoeBlock" for layer in model.model.layers]
    assert [cfg.is_moe_layer(i) for i in range(6)] == hf_moe == [False, True, False, False, False, True]


def test_v5_rope_parameters_with_legacy_type_key(tmp_path: Path) -> None:
    raw = {k: v for k, v in _v4_dense().items() if k not in ("rope_theta", "rope_scaling")}
    raw["rope_parameters"] = {
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
    }
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert AutoConfig.from_pretrained(tmp_path).rope_parameters["rope_type"] == "yarn"  # the oracle
    cfg = ModelConfig.from_hf_dict(raw)
    assert cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == "yarn"
