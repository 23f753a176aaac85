"""Held-out loss with a convention that compares across tools.

Tokenise the whole text with the model's tokenizer (no BOS/EOS added), cut the stream into consecutive
non-overlapping blocks of N tokens (drop the remainder), and average the cross-entropy of predicting tokens
2..N of each block from its prefix. Every block has N-1 predictions, so the mean over predictions is the mean
over blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from moe_core.model import CausalLM, next_token_loss
from moe_core.tokenizer import Tokenizer


@dataclass
class EvalResult:
    loss: float
    tokens: int  # tokens in the evaluated blocks (blocks × seq_len)
    blocks: int
    seq_len: int

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    def as_dict(self) -> dict:
        return {"loss": self.loss, "tokens": self.tokens, "blocks": self.blocks, "seq_len": self.seq_len}


def token_blocks(ids: list[int], seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """[num_blocks, seq_len] consecutive blocks of the token stream (the remainder dropped)."""
    if max_tokens is not None:
        ids = ids[:max_tokens]
    num_blocks = len(ids) // seq_len
    if num_blocks == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one block of --seq-len {seq_len}")
    return torch.tensor(ids[: num_blocks * seq_len], dtype=torch.long).view(num_blocks, seq_len)


@torch.no_grad()
def evaluate_blocks(model: CausalLM, blocks: torch.Tensor, batch_size: int = 8, progress: bool = False) -> float:
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    batches = torch.split(blocks, batch_size)
    for batch in tqdm(batches, desc="eval", unit="batch", disable=not progress, leave=False):
        batch = batch.to(device)
        loss = next_token_loss(model(batch).logits, batch)
        total += float(loss) * batch.shape[0]
        count += batch.shape[0]
    return total / count


def evaluate_text(
    model: CausalLM,
    tokenizer: Tokenizer,
    text: str,
    *,
    seq_len: int,
    max_tokens: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> EvalResult:
    if seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2, got {seq_len}")
    if seq_len > model.config.max_position_embeddings:
        raise ValueError(
            f"--seq-len {seq_len} exceeds the model's max_position_embeddings ({model.config.max_position_embeddings})"
        )
    blocks = token_blocks(tokenizer.encode(text), seq_len, max_tokens)
    loss = evaluate_blocks(model, blocks, batch_size, progress)
    return EvalResult(loss=loss, tokens=blocks.numel(), blocks=blocks.shape[0], seq_len=seq_len)


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--data {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
