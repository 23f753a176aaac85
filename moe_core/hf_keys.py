"""The one place that maps model parameters to Hugging Face checkpoint keys.

Every parameter's name already is its HF key, except the stacked routed experts:

    experts.gate_up_proj [E_l, 2F, D] <-> model.layers.{i}.mlp.experts.{e}.gate_proj.weight [F, D]
                                          model.layers.{i}.mlp.experts.{e}.up_proj.weight   [F, D]
    experts.down_proj    [E_l, D, F] <-> model.layers.{i}.mlp.experts.{e}.down_proj.weight [D, F]

with e running over the experts the module owns. A tied lm_head is not written (transformers re-ties it).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from moe_core.config import ModelConfig

_STACKED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
# Keys some old checkpoints carry that hold no weights.
IGNORED_KEY = re.compile(r"rotary_emb\.inv_freq$")


def expert_key(layer: int, expert: int, proj: str) -> str:
    """proj is 'gate_proj', 'up_proj' or 'down_proj'."""
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"


def stacked_param(name: str) -> tuple[int, str] | None:
    """(layer, 'gate_up_proj' | 'down_proj') if ``name`` is a stacked expert parameter."""
    m = _STACKED.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def hf_tensors(
    named_tensors: Iterator[tuple[str, torch.Tensor]], cfg: ModelConfig, first_expert: int = 0
) -> Iterator[tuple[str, torch.Tensor]]:
    """Translate (parameter name, tensor) pairs into (HF key, tensor) pairs, splitting stacked experts."""
    for name, tensor in named_tensors:
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        stacked = stacked_param(name)
        if stacked is None:
            yield name, tensor
            continue
        layer, kind = stacked
        for local, weights in enumerate(tensor):
            e = first_expert + local
            if kind == "gate_up_proj":
                gate, up = weights.chunk(2, dim=0)
                yield expert_key(layer, e, "gate_proj"), gate
                yield expert_key(layer, e, "up_proj"), up
            else:
                yield expert_key(layer, e, "down_proj"), weights


def expected_hf_keys(cfg: ModelConfig) -> set[str]:
    """Every key a complete HF checkpoint of this config holds."""
    keys = {"model.embed_tokens.weight", "model.norm.weight"}
    if not cfg.tie_word_embeddings:
        keys.add("lm_head.weight")
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        keys |= {f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"}
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            keys.add(f"{p}.self_attn.{proj}.weight")
            if cfg.qkv_bias and proj != "o_proj":
                keys.add(f"{p}.self_attn.{proj}.bias")
        if not cfg.is_moe_layer(i):
            keys |= {f"{p}.mlp.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")}
            continue
        keys.add(f"{p}.mlp.gate.weight")
        if cfg.shared_expert_intermediate_size:
            keys |= {f"{p}.mlp.shared_expert.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")}
            keys.add(f"{p}.mlp.shared_expert_gate.weight")
        for e in range(cfg.num_experts):
            keys |= {expert_key(i, e, proj) for proj in ("gate_proj", "up_proj", "down_proj")}
    return keys
