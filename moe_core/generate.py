"""Batched greedy decoding over the paged KV cache, as small functions (run_step, greedy_generate).

This is the single-process reference the serving engine is tested against: every prompt is prefilled in one
packed step, then each sequence decodes one token per step. Each sequence gets its blocks up front.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moe_core.kv_cache import DEFAULT_BLOCK_SIZE, PagedKVCache, PagedStep, StepRow, blocks_for
from moe_core.model import CausalLM, CausalLMOutput


@torch.no_grad()
def run_step(model: CausalLM, cache: PagedKVCache, rows: Sequence[StepRow]) -> CausalLMOutput:
    """One forward over the rows' new tokens, packed; logits at the rows' requested positions."""
    device = cache.k.device
    ids_1N = torch.tensor([[t for row in rows for t in row.tokens]], dtype=torch.long, device=device)
    return model(ids_1N, step=PagedStep.build(rows, cache, device))


@torch.no_grad()
def greedy_generate(
    model: CausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    stop_ids: set[int] | frozenset[int] = frozenset(),
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> list[list[int]]:
    """New tokens for each prompt (stopping after a stop id, which is kept), greedy."""
    model.eval()
    param = next(model.parameters())
    need = [blocks_for(len(p) + max_new_tokens, block_size) for p in prompts]
    cache = PagedKVCache(model.config, sum(need), block_size, dtype=param.dtype, device=param.device)
    first = [sum(need[:i]) for i in range(len(prompts))]
    tables = [list(range(f, f + n)) for f, n in zip(first, need, strict=True)]
    logits = run_step(model, cache, [StepRow(p, 0, tables[i]) for i, p in enumerate(prompts)]).logits
    outputs: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    for _ in range(max_new_tokens):
        still = []
        for row, token in zip(active, logits.argmax(dim=-1).tolist(), strict=True):
            outputs[row].append(token)
            if token not in stop_ids:
                still.append(row)
        active = still
        if not active or len(outputs[active[0]]) == max_new_tokens:
            break
        rows = [StepRow([outputs[r][-1]], len(prompts[r]) + len(outputs[r]) - 1, tables[r]) for r in active]
        logits = run_step(model, cache, rows).logits
    return outputs
