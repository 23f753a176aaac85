"""Steps over the paged KV cache (packed prefill chunks and decode tokens, scattered blocks) equal full forwards."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import profile

from moe_core.generate import run_step
from moe_core.kv_cache import PagedKVCache, PagedStep, StepRow, bytes_per_block
from moe_core.model import CausalLM
from moe_core.registry import get_preset

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TOL = 1e-4
BLOCK = 4


@pytest.fixture(scope="module", params=["debug", "debug-moe"])
def model(request) -> CausalLM:
    cfg = get_preset(request.param)
    assert cfg.num_attention_heads > cfg.num_key_value_heads  # grouped-query attention is exercised
    model = CausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # std 0.1 everywhere (biases and norms too): attention far from uniform
        for name, p in model.named_parameters():
            noise = 0.1 * torch.randn(p.shape, generator=g)
            p.copy_(1.0 + noise if name.endswith("norm.weight") else noise)
    return model.eval()


def _tokens(cfg, n: int, seed: int) -> list[int]:
    return torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def _full(model: CausalLM, seq: list[int]) -> torch.Tensor:
    return model(torch.tensor([seq])).logits[0]


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    diff = (got - want).abs().max().item()
    assert diff <= TOL, f"max abs diff {diff}"


def test_ragged_prompts_in_one_step_then_decode(model: CausalLM) -> None:
    cfg = model.config
    seqs = [_tokens(cfg, n, seed=n) for n in (5, 9, 13)]
    cache = PagedKVCache(cfg, num_blocks=24, block_size=BLOCK)
    # Scattered, interleaved blocks: a sequence's keys need not be contiguous in the pool.
    tables = [[7, 2, 19, 11, 4], [0, 13, 8, 21, 16], [3, 22, 9, 15, 1, 18]]
    out = run_step(model, cache, [StepRow(s, 0, tables[i], logits="all") for i, s in enumerate(seqs)])
    at = 0
    for seq in seqs:
        _close(out.logits[at : at + len(seq)], _full(model, seq))
        at += len(seq)
    for _ in range(4):  # decode: each row one token, in a different order each step
        order = torch.randperm(3).tolist()
        rows = []
        for i in order:
            seqs[i].append(int(_full(model, seqs[i])[-1].argmax()))
            rows.append(StepRow([seqs[i][-1]], len(seqs[i]) - 1, tables[i]))
        logits = run_step(model, cache, rows).logits
        for row, i in enumerate(order):
            _close(logits[row], _full(model, seqs[i])[-1])


def test_prefill_in_chunks_mixed_with_decode_tokens(model: CausalLM) -> None:
    """Chunked prefill: a long prompt arrives over three steps, each also carrying another sequence's decode."""
    cfg = model.config
    long, short = _tokens(cfg, 14, seed=1), _tokens(cfg, 3, seed=2)
    cache = PagedKVCache(cfg, num_blocks=10, block_size=BLOCK)
    long_blocks, short_blocks = [5, 1, 8, 3], [9, 0, 6]
    run_step(model, cache, [StepRow(short, 0, short_blocks)])
    done = 0
    for chunk in (6, 5, 3):  # chunk boundaries inside blocks
        short.append(int(_full(model, short)[-1].argmax()))
        piece = long[done : done + chunk]
        rows = [StepRow([short[-1]], len(short) - 1, short_blocks), StepRow(piece, done, long_blocks, logits="all")]
        logits = run_step(model, cache, rows).logits
        done += chunk
        _close(logits[0], _full(model, short)[-1])
        _close(logits[1:], _full(model, long[:done])[done - chunk :])


def test_rows_without_logits_and_a_reused_block(model: CausalLM) -> None:
    """A finished sequence's blocks are reused as they are (stale keys beyond the new length are never read);
    a non-final prefill chunk returns no logits."""
    cfg = model.config
    cache = PagedKVCache(cfg, num_blocks=3, block_size=BLOCK)
    run_step(model, cache, [StepRow(_tokens(cfg, 12, seed=3), 0, [0, 1, 2])])
    seq = _tokens(cfg, 6, seed=4)
    out = run_step(model, cache, [StepRow(seq[:5], 0, [2, 0], logits="none")])
    assert out.logits.shape == (0, cfg.vocab_size)
    _close(run_step(model, cache, [StepRow(seq[5:], 5, [2, 0])]).logits[0], _full(model, seq)[-1])


def test_too_few_blocks_for_a_row_is_refused() -> None:
    cfg = get_preset("debug")
    cache = PagedKVCache(cfg, num_blocks=4, block_size=BLOCK)
    with pytest.raises(ValueError, match="9 positions need 3 blocks, got 2"):
        PagedStep.build([StepRow([1, 2], 7, [0, 1])], cache, torch.device("cpu"))


def test_attention_uses_a_fused_kernel_not_the_math_fallback(model: CausalLM) -> None:
    """On CPU, SDPA's flash kernel takes masked attention over the folded KV groups (on CUDA, the fused backends
    are the only ones allowed: ``FUSED_ATTENTION``). The math fallback would materialise fp32 scores."""
    cfg = model.config
    cache = PagedKVCache(cfg, num_blocks=8, block_size=BLOCK)
    with profile() as prof:
        run_step(model, cache, [StepRow(_tokens(cfg, 9, seed=6), 0, [0, 1, 2]), StepRow([3], 4, [3, 4])])
    names = {e.name for e in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names
    assert not any("math" in n for n in names)


def test_block_bytes() -> None:
    cfg = get_preset("debug")
    cache = PagedKVCache(cfg, num_blocks=3, block_size=16, dtype=torch.bfloat16)
    assert cache.k.shape == (cfg.num_hidden_layers, 3 * 16, cfg.num_key_value_heads, cfg.attn_head_dim)
    assert cache.nbytes() == 3 * bytes_per_block(cfg, 16, torch.bfloat16)
    assert bytes_per_block(get_preset("qwen2-57b-a14b"), 16, torch.bfloat16) == 2 * 28 * 4 * 128 * 16 * 2
