"""Exact parameter counts from a config, without building the model.

"Activated" counts what one token touches: embeddings, lm_head, attention, norms, router, shared expert and
its gate, and top-k routed experts per MoE layer (the convention of the Qwen2 report: 57B total, 14B active).
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_core.config import ModelConfig


@dataclass(frozen=True)
class ParamCount:
    total: int
    activated: int

    def as_dict(self) -> dict[str, int]:
        return {"total": self.total, "activated": self.activated}


def attention_params(cfg: ModelConfig) -> int:
    d, hd = cfg.hidden_size, cfg.attn_head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    bias = (q + 2 * kv) if cfg.qkv_bias else 0
    return d * q + 2 * d * kv + bias + q * d


def swiglu_params(hidden: int, intermediate: int) -> int:
    return 3 * hidden * intermediate


def moe_layer_params(cfg: ModelConfig) -> ParamCount:
    d = cfg.hidden_size
    router = cfg.num_experts * d
    expert = swiglu_params(d, cfg.moe_intermediate_size)
    shared = swiglu_params(d, cfg.shared_expert_intermediate_size)
    shared_gate = d if cfg.shared_expert_intermediate_size else 0
    always = router + shared + shared_gate
    return ParamCount(
        total=always + cfg.num_experts * expert,
        activated=always + cfg.num_experts_per_tok * expert,
    )


def count_parameters(cfg: ModelConfig) -> ParamCount:
    d = cfg.hidden_size
    embed = cfg.vocab_size * d
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * d
    total = activated = embed + head + d  # + final norm
    for layer in range(cfg.num_hidden_layers):
        common = attention_params(cfg) + 2 * d  # two RMSNorms
        if cfg.is_moe_layer(layer):
            mlp = moe_layer_params(cfg)
        else:
            dense = swiglu_params(d, cfg.intermediate_size)
            mlp = ParamCount(dense, dense)
        total += common + mlp.total
        activated += common + mlp.activated
    return ParamCount(total=total, activated=activated)
