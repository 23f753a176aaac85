"""A paged KV cache, and the description of one forward step over it (which tokens, which blocks, what to read).

Shape legend: L layers, P cache rows (blocks × block size), H_kv kv heads, d head dim, N tokens in the step,
B sequences, S visible key positions. The cache is a pool of fixed-size blocks. A sequence owns a list of
blocks, its block table: its token at position p lives in row ``table[p // block_size] * block_size +
p % block_size``. Which sequence owns which blocks is the scheduler's business (``serve.engine``): memory
grows with the tokens sequences actually hold, not with the context each might reach.

A step packs the new tokens of every sequence into one row of N tokens (``PagedStep``): the projections, the
MLPs and the MoE layers run over all of them at once, whatever mix of prefill chunks and decode tokens it is.
Only attention is per sequence: each reads its own blocks (``paged_attention``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from moe_core.config import ModelConfig

DEFAULT_BLOCK_SIZE = 16
# On a GPU, attention must not fall back to the math kernel, which materialises [heads, queries, keys] scores
# in fp32 (56 GiB for a burst of 16 × 4k prompts on Qwen2-57B-A14B). The fused kernels take a boolean mask
# once the query heads of a KV group are folded into the query axis (``_fold_groups``), so no GQA support is
# needed either; if none can run, SDPA raises instead of silently using math.
FUSED_ATTENTION = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Keys and values of one block for every layer."""
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.attn_head_dim
    return per_token * block_size * dtype.itemsize


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class PagedKVCache:
    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV cache needs a block of a token at least, got {num_blocks}×{block_size}")
        shape = (cfg.num_hidden_layers, num_blocks * block_size, cfg.num_key_value_heads, cfg.attn_head_dim)
        # Zeros, not empty: a batch reads whole blocks, and rows past a sequence's end are masked out of the
        # softmax but still multiplied by zero weights, which must not meet NaN garbage.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def write(self, layer: int, rows_N: torch.Tensor, k_NHd: torch.Tensor, v_NHd: torch.Tensor) -> None:
        self.k[layer].index_copy_(0, rows_N, k_NHd.to(self.k.dtype))
        self.v[layer].index_copy_(0, rows_N, v_NHd.to(self.v.dtype))

    def read(self, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at ``rows`` (any shape R): each [*R, H_kv, d]."""
        flat = rows.reshape(-1)
        shape = (*rows.shape, *self.k.shape[2:])
        return self.k[layer].index_select(0, flat).view(shape), self.v[layer].index_select(0, flat).view(shape)


@dataclass(frozen=True)
class StepRow:
    """One sequence's part of a step: its next tokens, where they start, and the blocks holding it."""

    tokens: list[int]
    start: int  # tokens of this sequence already cached (the position of tokens[0])
    blocks: list[int]  # block table covering at least start + len(tokens) positions
    logits: str = "last"  # "last": logits at the last new token; "all": at every new token; "none"

    def __post_init__(self) -> None:
        if not self.tokens:
            raise ValueError("a step row needs at least one token")
        if self.logits not in ("last", "all", "none"):
            raise ValueError(f"logits must be 'last', 'all' or 'none', got {self.logits!r}")


@dataclass
class _Group:
    """Sequences attended together: either one sequence with several new tokens, or many with one each."""

    tokens_N: torch.Tensor  # which of the step's tokens are this group's queries, in order
    key_rows_BS: torch.Tensor  # cache rows of the visible keys of each sequence (padded by repeating row 0)
    mask_BTS: torch.Tensor  # [B, T, S]: query t of sequence b may see key s
    num_queries: int  # T: new tokens per sequence in the group


@dataclass
class PagedStep:
    """A step's device-side description, built once and shared by every layer."""

    positions_N: torch.Tensor
    write_rows_N: torch.Tensor  # the cache row of each new token's key and value
    groups: list[_Group]
    logit_rows: torch.Tensor  # which of the N tokens return logits, in row order
    cache: PagedKVCache

    @classmethod
    def build(cls, rows: Sequence[StepRow], cache: PagedKVCache, device: torch.device) -> PagedStep:
        b = cache.block_size
        positions: list[int] = []
        write_rows: list[int] = []
        logit_rows: list[int] = []
        singles: list[int] = []  # indices of rows with one new token: attended in one batched call
        groups: list[_Group] = []
        for i, row in enumerate(rows):
            end = row.start + len(row.tokens)
            if blocks_for(end, b) > len(row.blocks):
                need = blocks_for(end, b)
                raise ValueError(f"step row {i}: {end} positions need {need} blocks, got {len(row.blocks)}")
            first = len(positions)
            positions.extend(range(row.start, end))
            write_rows.extend(row.blocks[p // b] * b + p % b for p in range(row.start, end))
            if row.logits == "all":
                logit_rows.extend(range(first, len(positions)))
            elif row.logits == "last":
                logit_rows.append(len(positions) - 1)
            if len(row.tokens) == 1:
                singles.append(i)
            else:
                groups.append(_group(cache, [row], [first], device))
        if singles:
            starts = _token_offsets(rows)
            groups.append(_group(cache, [rows[i] for i in singles], [starts[i] for i in singles], device))
        return cls(_long(positions, device), _long(write_rows, device), groups, _long(logit_rows, device), cache)


def _long(values: list, device: torch.device) -> torch.Tensor:
    """``torch.tensor(values).to(device)``, int64. Under FakeTensorMode a tensor of at most one element made
    from data is a real constant, and moving it to a fake CUDA device fails on a CPU build: those are spelled
    with ``full``, from the Python value."""
    host = torch.tensor(values, dtype=torch.long)
    if host.numel() > 1:
        return host.to(device)
    flat = values
    while isinstance(flat, list) and flat:
        flat = flat[0]
    return torch.full(host.shape, flat if isinstance(flat, int) else 0, dtype=torch.long, device=device)


def _token_offsets(rows: Sequence[StepRow]) -> list[int]:
    offsets, at = [], 0
    for row in rows:
        offsets.append(at)
        at += len(row.tokens)
    return offsets


def _group(cache: PagedKVCache, rows: list[StepRow], first_token: list[int], device: torch.device) -> _Group:
    b = cache.block_size
    num_queries = len(rows[0].tokens)
    visible = max(r.start + num_queries for r in rows)
    width = blocks_for(visible, b)
    # Each sequence's blocks for its visible positions, padded with block 0 (masked out).
    tables = [(r.blocks[: blocks_for(r.start + num_queries, b)] + [0] * width)[:width] for r in rows]
    tables_BK = _long(tables, device)
    starts_B = _long([r.start for r in rows], device)
    tokens = _long([f + t for f in first_token for t in range(num_queries)], device)
    key_pos = torch.arange(visible, device=device)
    key_rows = tables_BK[:, key_pos // b] * b + key_pos % b
    query_pos = starts_B[:, None] + torch.arange(num_queries, device=device)  # [B, T]
    mask = key_pos[None, None, :] <= query_pos[:, :, None]
    return _Group(tokens, key_rows, mask, num_queries)


@contextlib.contextmanager
def _fused_only(device: torch.device) -> Iterator[None]:
    if device.type == "cuda":
        with sdpa_kernel(FUSED_ATTENTION):
            yield
    else:  # the CPU build picks its flash kernel for masked attention by itself
        yield


def paged_attention(
    layer: int, q_NHd: torch.Tensor, k_NHd: torch.Tensor, v_NHd: torch.Tensor, step: PagedStep
) -> torch.Tensor:
    """Store the step's keys/values, then attend every new token to its own sequence's cached keys: [N, H, d]."""
    step.cache.write(layer, step.write_rows_N, k_NHd, v_NHd)
    out_NHd = torch.empty_like(q_NHd)
    with _fused_only(q_NHd.device):
        for group in step.groups:
            out_NHd.index_copy_(0, group.tokens_N, _attend_group(layer, q_NHd, group, step.cache))
    return out_NHd


def _attend_group(layer: int, q_NHd: torch.Tensor, group: _Group, cache: PagedKVCache) -> torch.Tensor:
    k_BSHd, v_BSHd = cache.read(layer, group.key_rows_BS)
    num_seqs, num_queries = group.key_rows_BS.shape[0], group.num_queries
    q_BTHd = q_NHd.index_select(0, group.tokens_N).view(num_seqs, num_queries, *q_NHd.shape[1:])
    q_folded, mask = _fold_groups(q_BTHd, group.mask_BTS, k_BSHd.shape[2])
    out = F.scaled_dot_product_attention(
        q_folded, k_BSHd.transpose(1, 2).to(q_NHd.dtype), v_BSHd.transpose(1, 2).to(q_NHd.dtype), attn_mask=mask
    )
    return _unfold_groups(out, num_queries).reshape(num_seqs * num_queries, *q_NHd.shape[1:])


def _fold_groups(q_BTHd: torch.Tensor, mask_BTS: torch.Tensor, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries [B, H_kv, G·T, d] (the G query heads sharing a KV head become more queries of that head) and the
    mask [B, 1, G·T, S] to match: grouped-query attention as plain attention, with no KV head copied."""
    b, t, h, d = q_BTHd.shape
    g = h // num_kv_heads
    q = q_BTHd.view(b, t, num_kv_heads, g, d).permute(0, 2, 3, 1, 4).reshape(b, num_kv_heads, g * t, d)
    return q, mask_BTS.repeat(1, g, 1).unsqueeze(1)


def _unfold_groups(out_BKQd: torch.Tensor, num_queries: int) -> torch.Tensor:
    """[B, H_kv, G·T, d] back to [B, T, H, d]."""
    b, kv, gt, d = out_BKQd.shape
    g = gt // num_queries
    return out_BKQd.view(b, kv, g, num_queries, d).permute(0, 3, 1, 2, 4).reshape(b, num_queries, kv * g, d)
