"""Named model shapes mirroring the public config.json files, plus tiny debug shapes for tests and the demo.

The public numbers are facts from the Qwen2 report and the released configs. ``debug-moe`` is the upcycling
target of ``debug`` at the Qwen2-57B-A14B recipe's expert counts (64 routed + 8 shared, top-8) at tiny width.
"""

from __future__ import annotations

from typing import Any

from moe_core.config import ConfigError, ModelConfig, ModelType

_QWEN_TOKENS = {"bos_token_id": 151643, "eos_token_id": 151643}

_QWEN2_7B: dict[str, Any] = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=131072,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    sliding_window=131072,
    max_window_layers=28,
    **_QWEN_TOKENS,
)

_PRESETS: dict[str, dict[str, Any]] = {
    "qwen2-0.5b": dict(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=131072,
        rope_theta=1e6,
        tie_word_embeddings=True,
        sliding_window=131072,
        max_window_layers=24,
        **_QWEN_TOKENS,
    ),
    "qwen2-1.5b": dict(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=131072,
        rope_theta=1e6,
        tie_word_embeddings=True,
        sliding_window=131072,
        max_window_layers=28,
        **_QWEN_TOKENS,
    ),
    "qwen2-7b": _QWEN2_7B,
    "qwen2-72b": dict(
        vocab_size=152064,
        hidden_size=8192,
        intermediate_size=29568,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_theta=1e6,
        tie_word_embeddings=False,
        sliding_window=131072,
        max_window_layers=80,
        **_QWEN_TOKENS,
    ),
    "qwen2-57b-a14b": dict(
        _QWEN2_7B,
        model_type=ModelType.MOE,
        vocab_size=151936,
        num_experts=64,
        num_experts_per_tok=8,
        moe_intermediate_size=2560,
        shared_expert_intermediate_size=20480,
        norm_topk_prob=False,
        router_aux_loss_coef=0.001,
        decoder_sparse_step=1,
        max_window_layers=28,
    ),
    "qwen1.5-moe-a2.7b": dict(
        model_type=ModelType.MOE,
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=8192,
        rope_theta=1e6,
        tie_word_embeddings=False,
        num_experts=60,
        num_experts_per_tok=4,
        moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632,
        norm_topk_prob=False,
        router_aux_loss_coef=0.001,
        sliding_window=32768,
        max_window_layers=21,
        **_QWEN_TOKENS,
    ),
    # Tiny shapes: every test and the demo use these. Token ids match the tokenizer `upmoe init` trains
    # (<|endoftext|> is id 0 there). Attention is 2 query heads of 32 sharing 1 KV head (GQA): vLLM's CPU
    # attention refuses head_dim < 32, and head_dim = hidden_size / num_attention_heads (no explicit head_dim).
    "debug": dict(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        rope_theta=1e6,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    ),
}
_PRESETS["debug-moe"] = dict(
    _PRESETS["debug"],
    model_type=ModelType.MOE,
    num_experts=64,
    num_experts_per_tok=8,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=8 * 32,
    norm_topk_prob=False,
    router_aux_loss_coef=0.001,
    decoder_sparse_step=1,
)


def preset_names() -> list[str]:
    return list(_PRESETS)


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """A fresh config for a named shape; ``overrides`` replace fields (validated)."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(_PRESETS)}")
    return ModelConfig(**{**_PRESETS[name], **overrides})
