"""``upmoe upcycle --plan``: the Qwen2-57B-A14B shape from a Qwen2-7B config.json, from a file or a directory,
and that planning writes nothing (no weights are needed, no Ray is started)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from upcycle_testlib import run_cli

# Public Qwen2-7B config.json values (docs/design.md §3).
QWEN2_7B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-06,
    "torch_dtype": "bfloat16",
}


@pytest.fixture
def qwen2_7b_dir(tmp_path: Path) -> Path:
    d = tmp_path / "qwen2-7b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(QWEN2_7B, indent=2))
    return d


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _check_57b(plan: dict) -> None:
    assert plan["params_total"] == 57_408_658_944
    assert plan["params_activated"] == 14_249_270_784
    assert plan["copies"] == 10
    assert plan["chunks"] == 72
    t = plan["target_config"]
    assert t["model_type"] == "qwen2_moe"
    assert t["vocab_size"] == 151936
    assert t["shared_expert_intermediate_size"] == 20480
    assert t["moe_intermediate_size"] == 2560
    assert (t["num_experts"], t["num_experts_per_tok"], t["norm_topk_prob"]) == (64, 8, False)
    assert t["router_aux_loss_coef"] == 0.001 and t["decoder_sparse_step"] == 1
    assert (t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"], t["num_key_value_heads"]) == (
        3584,
        28,
        28,
        4,
    )
    assert t["max_position_embeddings"] == 131072 and t["tie_word_embeddings"] is False


def test_plan_qwen2_57b_a14b_from_config_json(qwen2_7b_dir: Path) -> None:
    result = run_cli(
        "upcycle", "--plan", "--source-config", qwen2_7b_dir / "config.json", "--preset", "qwen2-57b-a14b", "--json"
    )
    assert result.rc == 0, result.err
    _check_57b(result.last_json())
    assert "57,408,658,944 total" in result.out and "14,249,270,784 activated" in result.out


def test_plan_from_source_dir_writes_nothing(qwen2_7b_dir: Path, tmp_path: Path) -> None:
    before = _tree(tmp_path)
    out = tmp_path / "out"
    result = run_cli("upcycle", "--plan", qwen2_7b_dir, out, "--preset", "qwen2-57b-a14b", "--json")
    assert result.rc == 0, result.err
    _check_57b(result.last_json())
    assert not out.exists()
    assert _tree(tmp_path) == before
    assert not list(tmp_path.glob(".*upcycle-partial*"))


def test_plan_flags_override_the_preset(qwen2_7b_dir: Path) -> None:
    result = run_cli(
        "upcycle", "--plan", qwen2_7b_dir, "--preset", "qwen2-57b-a14b", "--num-shared-experts", "4", "--json"
    )
    assert result.rc == 0, result.err
    plan = result.last_json()
    assert plan["target_config"]["shared_expert_intermediate_size"] == 4 * 2560
    assert plan["chunks"] == 68 and plan["copies"] == 10  # ceil(68 * 2560 / 18944) = 10


def test_plan_default_expert_size_is_an_eighth_rounded_to_64(qwen2_7b_dir: Path) -> None:
    result = run_cli("upcycle", "--plan", qwen2_7b_dir, "--json")
    assert result.rc == 0, result.err
    t = result.last_json()["target_config"]
    assert t["moe_intermediate_size"] == 2368 and t["vocab_size"] == 152064  # source vocabulary by default


def test_plan_needs_exactly_one_source(qwen2_7b_dir: Path) -> None:
    both = run_cli("upcycle", "--plan", qwen2_7b_dir, "--source-config", qwen2_7b_dir / "config.json")
    neither = run_cli("upcycle", "--plan")
    for result in (both, neither):
        assert result.rc != 0
        assert "--plan needs exactly one of SOURCE_DIR or --source-config" in result.err


def test_plan_refuses_a_moe_config(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({**QWEN2_7B, "model_type": "qwen2_moe"}))
    result = run_cli("upcycle", "--plan", "--source-config", cfg)
    assert result.rc != 0 and "qwen2_moe" in result.err
