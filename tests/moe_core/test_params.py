"""count_parameters against the published numbers, our built model, and transformers' model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moe_core.config import ModelConfig, save_config
from moe_core.model import CausalLM
from moe_core.params import count_parameters
from moe_core.registry import get_preset, preset_names

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _numel(model: torch.nn.Module) -> int:
    """Elements of the distinct parameters (a tied lm_head counts once)."""
    seen = {id(p): p.numel() for _, p in model.named_parameters(remove_duplicate=False)}
    return sum(seen.values())


def _hf_model(cfg: ModelConfig, tmp_path: Path, meta: bool = False) -> torch.nn.Module:
    save_config(cfg, tmp_path)
    hf_config = AutoConfig.from_pretrained(tmp_path)
    torch.manual_seed(0)
    if meta:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config)
    return AutoModelForCausalLM.from_config(hf_config)


def test_qwen2_57b_a14b_published_counts() -> None:
    count = count_parameters(get_preset("qwen2-57b-a14b"))
    assert count.total == 57_408_658_944
    assert count.activated == 14_249_270_784
    assert count.as_dict() == {"total": 57_408_658_944, "activated": 14_249_270_784}


def test_qwen2_7b_count() -> None:
    count = count_parameters(get_preset("qwen2-7b"))
    assert count.total == count.activated == 7_615_616_512


DEBUG_CASES = {
    "debug": get_preset("debug"),
    "debug-tied": get_preset("debug", tie_word_embeddings=True),
    "debug-moe": get_preset("debug-moe"),
    "debug-moe-tied": get_preset("debug-moe", tie_word_embeddings=True),
    "debug-moe-mixed": get_preset("debug-moe", num_hidden_layers=3, mlp_only_layers=[1]),
    "debug-moe-step2": get_preset("debug-moe", num_hidden_layers=4, decoder_sparse_step=2),
    "debug-moe-no-shared": get_preset("debug-moe", shared_expert_intermediate_size=0),
}


@pytest.mark.parametrize("name", list(DEBUG_CASES))
def test_total_equals_built_models(name: str, tmp_path: Path) -> None:
    cfg = DEBUG_CASES[name]
    total = count_parameters(cfg).total
    ours = CausalLM(cfg)
    assert _numel(ours) == total
    if cfg.tie_word_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    if cfg.shared_expert_intermediate_size or not cfg.is_moe:  # transformers always builds the shared expert
        hf = _hf_model(cfg, tmp_path)
        assert _numel(hf) == total
    if not cfg.is_moe:
        assert count_parameters(cfg).activated == total


@pytest.mark.parametrize("name", [n for n in preset_names() if not n.startswith("debug")])
def test_public_presets_equal_transformers_on_meta(name: str, tmp_path: Path) -> None:
    """The real shapes, built on the meta device (no memory): transformers' count is the oracle."""
    cfg = get_preset(name)
    assert _numel(_hf_model(cfg, tmp_path, meta=True)) == count_parameters(cfg).total
    with torch.device("meta"):
        assert _numel(CausalLM(cfg)) == count_parameters(cfg).total


def test_debug_moe_activated_by_hand() -> None:
    cfg = get_preset("debug-moe")
    d, v, f_expert, n_layers = 64, 1024, 32, 2
    q, kv = 2 * 32, 1 * 32  # 2 query heads, 1 kv head of 32
    attention = d * q + 2 * d * kv + (q + 2 * kv) + q * d  # q, k, v (with bias), o
    norms = 2 * d
    router = 64 * d
    shared = 3 * d * (8 * f_expert)
    shared_gate = d
    routed_active = 8 * 3 * d * f_expert
    routed_all = 64 * 3 * d * f_expert
    embeddings = v * d + v * d + d  # embed, lm_head, final norm
    activated = embeddings + n_layers * (attention + norms + router + shared + shared_gate + routed_active)
    total = embeddings + n_layers * (attention + norms + router + shared + shared_gate + routed_all)
    assert activated == 361_152
    assert count_parameters(cfg) == type(count_parameters(cfg))(total=total, activated=activated)
    # Tying removes the lm_head from both.
    tied = count_parameters(get_preset("debug-moe", tie_word_embeddings=True))
    assert (tied.total, tied.activated) == (total - v * d, activated - v * d)
    # A dense layer in the mix counts whole in both.
    mixed = count_parameters(get_preset("debug-moe", mlp_only_layers=[0]))
    dense_mlp = 3 * d * 256
    moe_total = router + shared + shared_gate + routed_all
    moe_active = router + shared + shared_gate + routed_active
    assert mixed.total == total - moe_total + dense_mlp
    assert mixed.activated == activated - moe_active + dense_mlp
