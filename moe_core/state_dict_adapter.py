"""The one contract between the model's parameters and everything outside it: what each Hugging Face key is
called, how stacked experts split into per-expert keys and back, and which experts a rank owns.

Every parameter's name already is its HF key, except the stacked routed experts:

    experts.gate_up_proj [E_l, 2F, D] <-> model.layers.{i}.mlp.experts.{e}.gate_proj.weight [F, D]  (rows :F)
                                          model.layers.{i}.mlp.experts.{e}.up_proj.weight   [F, D]  (rows F:)
    experts.down_proj    [E_l, D, F] <-> model.layers.{i}.mlp.experts.{e}.down_proj.weight [D, F]

with e running over the experts the module owns. A tied lm_head is not written (transformers re-ties it).

Placement: with expert parallelism of size EP, the rank at position r of its EP group owns the r-th contiguous
block of E / EP experts, [r·E/EP, (r+1)·E/EP). Training, serving, export and the sharded checkpoints' global
expert tensors (split over EP first, ``Shard(0)``) all rely on this one rule.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from moe_core.config import ModelConfig

_STACKED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
# Keys some old checkpoints carry that hold no weights.
IGNORED_KEY = re.compile(r"rotary_emb\.inv_freq$")
# Stacked parameter kind -> the per-expert HF projections it holds, in row order.
STACKED_PROJECTIONS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


class ExpertSplitError(ValueError):
    """An expert-parallel size that does not split the routed experts evenly."""


def is_expert_param(name: str) -> bool:
    """A routed expert's parameter (stacked or per-expert spelling); the shared expert is not one."""
    return ".mlp.experts." in name


def expert_key(layer: int, expert: int, proj: str) -> str:
    """proj is 'gate_proj', 'up_proj' or 'down_proj'."""
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"


def stacked_param(name: str) -> tuple[int, str] | None:
    """(layer, 'gate_up_proj' | 'down_proj') if ``name`` is a stacked expert parameter."""
    m = _STACKED.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def check_expert_split(num_experts: int, ep_size: int) -> None:
    if ep_size < 1 or num_experts % ep_size:
        raise ExpertSplitError(f"EP size {ep_size} must divide the routed expert count {num_experts}")


def expert_block(num_experts: int, ep_size: int, ep_rank: int) -> tuple[int, int]:
    """(first expert, expert count) owned by position ``ep_rank`` of an EP group of ``ep_size``."""
    check_expert_split(num_experts, ep_size)
    if not 0 <= ep_rank < ep_size:
        raise ExpertSplitError(f"EP rank {ep_rank} is outside an EP group of {ep_size}")
    count = num_experts // ep_size
    return ep_rank * count, count


def expert_rows(kind: str, layer: int, expert: int, rows: int) -> Iterator[tuple[str, slice]]:
    """(HF key, rows of one expert's slice of the stacked parameter) for each projection it holds; ``rows`` is
    the slice's first dimension."""
    projections = STACKED_PROJECTIONS[kind]
    per = rows // len(projections)
    for i, proj in enumerate(projections):
        yield expert_key(layer, expert, proj), slice(i * per, (i + 1) * per)


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
        yield from expert_tensors(*stacked, tensor, first_expert)


def expert_tensors(
    layer: int, kind: str, stacked: torch.Tensor, first_expert: int = 0
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF key, tensor) of every expert in a stacked ``kind`` parameter [E_l, ...] of ``layer``."""
    for local, weights in enumerate(stacked):
        for key, rows in expert_rows(kind, layer, first_expert + local, weights.shape[0]):
            yield key, weights[rows]


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
            keys |= {expert_key(i, e, proj) for kind in STACKED_PROJECTIONS.values() for proj in kind}
    return keys
