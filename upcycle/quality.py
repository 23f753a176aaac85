"""Step-0 quality of an upcycled model: held-out loss next to the dense source's, and the router's balance.

At step 0 a healthy upcycle has a loss near the dense model's (exactly equal for ``preserve``), an aux
loss near top_k (the Switch loss's value at perfect balance) and a router entropy near ln E.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moe_core.evaluate import evaluate_blocks, token_blocks
from moe_core.loading import load_model
from moe_core.losses import load_balancing_loss, load_stats
from moe_core.permute import expert_counts
from moe_core.tokenizer import Tokenizer


@torch.no_grad()
def step0_quality(
    source_dir: Path, out_dir: Path, text: str, *, seq_len: int = 256, max_tokens: int = 16384
) -> dict[str, Any]:
    tokenizer = Tokenizer.from_dir(out_dir)
    blocks = token_blocks(tokenizer.encode(text), seq_len, max_tokens)
    dense = load_model(source_dir)
    dense_loss = evaluate_blocks(dense, blocks)
    del dense
    moe = load_model(out_dir).eval()
    moe_loss = evaluate_blocks(moe, blocks)
    routings = moe(blocks[: min(8, len(blocks))]).routings
    cfg = moe.config
    per_layer = [load_stats(expert_counts(r.experts_TK, cfg.num_experts), r.probs_TE) for r in routings]
    return {
        "eval_tokens": blocks.numel(),
        "seq_len": seq_len,
        "dense_loss": dense_loss,
        "moe_loss": moe_loss,
        "aux_loss": float(load_balancing_loss(routings)),
        "aux_loss_at_balance": cfg.num_experts_per_tok,
        "router_entropy": sum(s["router_entropy"] for s in per_layer) / len(per_layer),
        "router_entropy_max": per_layer[0]["router_entropy_max"],
        "expert_load_cv": sum(s["cv"] for s in per_layer) / len(per_layer),
    }
