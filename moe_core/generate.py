"""Batched greedy decoding with the KV cache, as a chain of small functions (prefill, decode_step).

This is the single-process reference the serving engine builds on: it prefills prompts of different lengths
in one right-padded batch, then decodes one token per sequence per step.
"""

from __future__ import annotations

import torch

from moe_core.kv_cache import KVCache
from moe_core.model import CausalLM


def pad_right(sequences: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, T_max], lengths [B]) for sequences of different lengths."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    ids = torch.full((len(sequences), max(map(len, sequences))), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return ids, lengths


@torch.no_grad()
def prefill(model: CausalLM, cache: KVCache, prompts: list[list[int]], slots: torch.Tensor) -> torch.Tensor:
    """Run the prompts into their cache slots; logits [B, V] of each prompt's last token."""
    device = cache.lengths.device
    ids, lengths = pad_right(prompts)
    return model(ids.to(device), cache=cache, slots_B=slots, input_lengths_B=lengths.to(device), last_only=True).logits


@torch.no_grad()
def decode_step(model: CausalLM, cache: KVCache, last_tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Feed one token per sequence; logits [B, V] for the next one."""
    return model(last_tokens[:, None], cache=cache, slots_B=slots, last_only=True).logits


@torch.no_grad()
def greedy_generate(
    model: CausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    stop_ids: set[int] | frozenset[int] = frozenset(),
) -> list[list[int]]:
    """New tokens for each prompt (stopping after a stop id, which is kept), greedy."""
    model.eval()
    param = next(model.parameters())
    longest = max(len(p) for p in prompts) + max_new_tokens
    cache = KVCache(model.config, len(prompts), longest, dtype=param.dtype, device=param.device)
    slots = torch.arange(len(prompts), device=param.device)
    logits = prefill(model, cache, prompts, slots)
    outputs: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    for _ in range(max_new_tokens):
        next_ids = logits.argmax(dim=-1)
        still = []
        for row, token in zip(active, next_ids.tolist(), strict=True):
            outputs[row].append(token)
            if token not in stop_ids:
                still.append(row)
        if not still:
            break
        keep = torch.tensor([active.index(r) for r in still], device=param.device)
        active = still
        logits = decode_step(model, cache, next_ids[keep], slots[active])
    return outputs
