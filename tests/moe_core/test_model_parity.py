"""Parity with transformers (the oracle) in both directions: HF-written checkpoints loaded by us, and our
checkpoints loaded by transformers, for dense / MoE, tied / untied, plain RoPE / YaRN, v4 / v5 config files.

Weights are drawn with std 0.1 (not the 0.02 of a fresh init), and biases and norm weights are random too, so
attention is far from uniform and every tensor of the key map matters at the 1e-4 tolerance.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moe_core.config import ModelConfig, save_config
from moe_core.loading import load_model, save_model
from moe_core.losses import load_balancing_loss
from moe_core.model import CausalLM, next_token_loss
from moe_core.registry import get_preset

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TOL = 1e-4
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}
STD = 0.1


def _case(name: str, **overrides) -> ModelConfig:
    return get_preset(name, initializer_range=STD, **overrides)


CASES = {
    "dense": _case("debug"),
    "dense-tied": _case("debug", tie_word_embeddings=True),
    "dense-yarn": _case("debug", rope_scaling=YARN),
    "dense-tied-yarn": _case("debug", tie_word_embeddings=True, rope_scaling=YARN),
    "dense-v5": _case("debug", rope_format="v5"),
    "dense-v5-yarn": _case("debug", rope_format="v5", rope_scaling=YARN),
    "moe": _case("debug-moe"),
    "moe-tied": _case("debug-moe", tie_word_embeddings=True),
    "moe-yarn": _case("debug-moe", rope_scaling=YARN),
    "moe-tied-yarn": _case("debug-moe", tie_word_embeddings=True, rope_scaling=YARN),
    "moe-v5-yarn": _case("debug-moe", rope_format="v5", rope_scaling=YARN),
    "moe-mixed": _case("debug-moe", mlp_only_layers=[0]),
    "moe-norm-topk": _case("debug-moe", norm_topk_prob=True),
    "moe-no-qkv-bias": _case("debug-moe").replace(extra={"qkv_bias": False}),
    # An explicit head_dim other than hidden_size / num_attention_heads (64 vs 32): q is 128 wide, hidden 64.
    "dense-head-dim-64": _case("debug", head_dim=64),
    "moe-mixed-norm-topk-v5": _case(
        "debug-moe", num_hidden_layers=3, mlp_only_layers=[1], norm_topk_prob=True, rope_format="v5"
    ),
}


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int, std: float = STD, keep_matrices: bool = False) -> None:
    """Random values for every distinct parameter; norm weights around 1. ``keep_matrices``: only biases/norms."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
        if name.endswith("norm.weight"):
            p.copy_(1.0 + std * noise)
        elif name.endswith(".bias") or not keep_matrices:
            p.copy_(std * noise)


def _ids(cfg: ModelConfig, shape=(2, 40), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def _hf_checkpoint(cfg: ModelConfig, root: Path) -> tuple[Path, torch.nn.Module]:
    """Our config.json -> transformers builds a random model from it -> its save_pretrained directory."""
    src = root / "config"
    src.mkdir()
    save_config(cfg, src)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src)).eval()
    _randomize(hf, seed=0)
    out = root / "hf"
    hf.save_pretrained(out)
    return out, hf


def _our_checkpoint(cfg: ModelConfig, root: Path) -> tuple[Path, CausalLM]:
    model = CausalLM(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    _randomize(model, seed=1, keep_matrices=True)  # init_weights zeroes biases and sets norms to 1
    model.eval()
    out = root / "ours"
    save_model(model, out)
    return out, model


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def _expected_class(cfg: ModelConfig) -> str:
    return "Qwen2MoeForCausalLM" if cfg.is_moe else "Qwen2ForCausalLM"


@pytest.mark.parametrize("name", list(CASES))
def test_transformers_checkpoint_loads_into_ours(name: str, tmp_path: Path) -> None:
    cfg = CASES[name]
    path, hf = _hf_checkpoint(cfg, tmp_path)
    assert type(hf).__name__ == _expected_class(cfg)
    ours = load_model(path).eval()
    # transformers re-saves our v4 {"type", "rope_type"} scaling inside rope_parameters, "type" included.
    read_scaling = {k: v for k, v in (ours.config.rope_scaling or {}).items() if k != "type"} or None
    assert read_scaling == cfg.rope_scaling and ours.config.rope_theta == cfg.rope_theta
    ids = _ids(cfg)
    with torch.no_grad():
        want = hf(ids, output_router_logits=cfg.is_moe)
        got = ours(ids)
    assert got.logits.abs().max() > 1.0  # the comparison is not between near-zero tensors
    assert _max_diff(got.logits, want.logits) <= TOL
    if cfg.is_moe:
        num_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
        assert len(got.router_logits) == len(want.router_logits) == num_moe
        for mine, theirs in zip(got.router_logits, want.router_logits, strict=True):
            assert _max_diff(mine, theirs.reshape(mine.shape)) <= TOL


@pytest.mark.parametrize("name", list(CASES))
def test_our_checkpoint_loads_into_transformers(name: str, tmp_path: Path) -> None:
    cfg = CASES[name]
    path, ours = _our_checkpoint(cfg, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(hf).__name__ == _expected_class(cfg)
    assert hf.config.tie_word_embeddings == cfg.tie_word_embeddings
    ids = _ids(cfg, seed=2)
    with torch.no_grad():
        want = hf(ids, labels=ids, output_router_logits=cfg.is_moe)
        got = ours(ids)
    assert _max_diff(got.logits, want.logits) <= TOL
    if cfg.is_moe:
        for mine, theirs in zip(got.router_logits, want.router_logits, strict=True):
            assert _max_diff(mine, theirs.reshape(mine.shape)) <= TOL
        # transformers adds coef * aux to the loss; its aux_loss is the Switch loss over all MoE layers.
        aux = load_balancing_loss(got.routings)
        assert abs(aux.item() - want.aux_loss.item()) <= TOL
        ce = want.loss - cfg.router_aux_loss_coef * want.aux_loss
        assert abs(next_token_loss(got.logits, ids).item() - ce.item()) <= TOL
    else:
        assert abs(next_token_loss(got.logits, ids).item() - want.loss.item()) <= TOL


@pytest.mark.parametrize("name", ["dense", "dense-tied", "moe"])
def test_next_token_loss_equals_transformers(name: str, tmp_path: Path) -> None:
    cfg = CASES[name]
    path, hf = _hf_checkpoint(cfg, tmp_path)
    ours = load_model(path).eval()
    ids = _ids(cfg, shape=(3, 17), seed=5)
    with torch.no_grad():
        want = hf(ids, labels=ids).loss
        got = next_token_loss(ours(ids).logits, ids)
    assert got.dtype == torch.float32
    assert abs(got.item() - want.item()) <= TOL


def test_parity_tests_are_sensitive_to_rope_scaling(tmp_path: Path) -> None:
    """Guard for the tolerance above: YaRN vs plain RoPE on the same weights differ by far more than 1e-4."""
    plain = CausalLM(CASES["dense"])
    plain.init_weights(torch.Generator().manual_seed(0))
    yarn = CausalLM(CASES["dense-yarn"])
    yarn.load_state_dict(plain.state_dict())
    ids = _ids(CASES["dense"])
    with torch.no_grad():
        assert _max_diff(plain(ids).logits, yarn(ids).logits) > 1e-2


def test_written_checkpoint_uses_hf_layout(tmp_path: Path) -> None:
    import json

    cfg = CASES["moe-mixed"]
    path, _ = _our_checkpoint(cfg, tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    keys = set(index["weight_map"])
    assert "model.layers.1.mlp.experts.63.gate_proj.weight" in keys
    assert "model.layers.1.mlp.experts.0.down_proj.weight" in keys
    assert "model.layers.1.mlp.shared_expert_gate.weight" in keys
    assert "model.layers.0.mlp.gate_proj.weight" in keys  # the dense layer of the mix
    assert not any("gate_up_proj" in k for k in keys)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"] and config["model_type"] == "qwen2_moe"
    assert config["torch_dtype"] == "float32"
