"""Batched, ragged incremental decoding with the KV cache equals full no-cache forwards."""

from __future__ import annotations

import pytest
import torch

from moe_core.kv_cache import CacheFullError, KVCache
from moe_core.model import CausalLM
from moe_core.registry import get_preset

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TOL = 1e-4
PROMPT_LENGTHS = (5, 9, 13)
DECODE_STEPS = 6


@pytest.fixture(scope="module", params=["debug", "debug-moe"])
def model(request) -> CausalLM:
    cfg = get_preset(request.param)
    model = CausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # std 0.1 everywhere (biases and norms too): attention far from uniform
        for name, p in model.named_parameters():
            noise = 0.1 * torch.randn(p.shape, generator=g)
            p.copy_(1.0 + noise if name.endswith("norm.weight") else noise)
    return model.eval()


def _prompts(cfg, lengths=PROMPT_LENGTHS, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]


def _right_padded(seqs: list[list[int]], pad: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return ids, torch.tensor([len(s) for s in seqs])


@torch.no_grad()
def _reference_last(model: CausalLM, seq: list[int]) -> torch.Tensor:
    return model(torch.tensor([seq])).logits[0, -1]


def _assert_rows_match(model: CausalLM, logits_BV: torch.Tensor, seqs: list[list[int]]) -> None:
    assert logits_BV.shape == (len(seqs), model.config.vocab_size)
    for row, seq in enumerate(seqs):
        diff = (logits_BV[row] - _reference_last(model, seq)).abs().max().item()
        assert diff <= TOL, f"row {row} (length {len(seq)}): max abs diff {diff}"


@torch.no_grad()
def _decode(model, cache, seqs, slots_B, steps=DECODE_STEPS, logits=None):
    """Greedy decode ``steps`` tokens per row, checking every step against the no-cache forward."""
    for _ in range(steps):
        next_B = logits.argmax(-1)
        for row, token in enumerate(next_B.tolist()):
            seqs[row].append(token)
        logits = model(next_B[:, None], cache=cache, slots_B=slots_B, last_only=True).logits
        _assert_rows_match(model, logits, seqs)
    return logits


@torch.no_grad()
def test_ragged_batch_prefill_then_decode(model: CausalLM) -> None:
    cfg = model.config
    seqs = _prompts(cfg)
    ids, lengths = _right_padded(seqs)
    cache = KVCache(cfg, num_slots=3, max_tokens=32)
    out = model(ids, cache=cache, input_lengths_B=lengths, last_only=True)
    assert cache.lengths.tolist() == list(PROMPT_LENGTHS)
    _assert_rows_match(model, out.logits, seqs)
    _decode(model, cache, seqs, torch.arange(3), logits=out.logits)
    assert cache.lengths.tolist() == [n + DECODE_STEPS for n in PROMPT_LENGTHS]


@torch.no_grad()
def test_prefill_all_positions_match(model: CausalLM) -> None:
    """Without last_only the prefill returns [B, T, V]; each row's real positions match its own forward."""
    cfg = model.config
    seqs = _prompts(cfg, seed=3)
    ids, lengths = _right_padded(seqs)
    cache = KVCache(cfg, num_slots=3, max_tokens=16)
    logits = model(ids, cache=cache, input_lengths_B=lengths).logits
    assert logits.shape == (3, 13, cfg.vocab_size)
    for row, seq in enumerate(seqs):
        want = model(torch.tensor([seq])).logits[0]
        assert (logits[row, : len(seq)] - want).abs().max().item() <= TOL


@torch.no_grad()
def test_rows_prefilled_one_at_a_time_into_noncontiguous_slots(model: CausalLM) -> None:
    cfg = model.config
    seqs = _prompts(cfg, seed=4)
    cache = KVCache(cfg, num_slots=3, max_tokens=32)
    slot_of_row = [2, 0, 1]
    last = []
    for row, slot in enumerate(slot_of_row):
        out = model(torch.tensor([seqs[row]]), cache=cache, slots_B=torch.tensor([slot]), last_only=True)
        last.append(out.logits[0])
    assert cache.lengths.tolist() == [PROMPT_LENGTHS[1], PROMPT_LENGTHS[2], PROMPT_LENGTHS[0]]
    logits = torch.stack(last)
    _assert_rows_match(model, logits, seqs)
    _decode(model, cache, seqs, torch.tensor(slot_of_row), logits=logits)


@torch.no_grad()
def test_decode_rows_in_any_order_and_subsets(model: CausalLM) -> None:
    """A decode batch may hold any subset of the slots, in any order; the others are untouched."""
    cfg = model.config
    seqs = _prompts(cfg, seed=5)
    ids, lengths = _right_padded(seqs)
    cache = KVCache(cfg, num_slots=4, max_tokens=32)
    logits = model(ids, cache=cache, slots_B=torch.tensor([0, 1, 2]), input_lengths_B=lengths, last_only=True).logits
    # Only slots 2 and 0, in that order.
    sub = [seqs[2], seqs[0]]
    sub_logits = _decode(model, cache, sub, torch.tensor([2, 0]), steps=2, logits=logits[[2, 0]])
    assert cache.lengths.tolist() == [PROMPT_LENGTHS[0] + 2, PROMPT_LENGTHS[1], PROMPT_LENGTHS[2] + 2, 0]
    # Then all three together again.
    seqs = [sub[1], seqs[1], sub[0]]
    logits = torch.stack([sub_logits[1], logits[1], sub_logits[0]])
    _decode(model, cache, seqs, torch.tensor([0, 1, 2]), steps=2, logits=logits)


@torch.no_grad()
def test_prefill_chunk_and_decode_in_one_batch(model: CausalLM) -> None:
    """Continuous batching: one row decodes a token while another prefills its prompt in the same forward."""
    cfg = model.config
    seqs = _prompts(cfg, seed=6)
    cache = KVCache(cfg, num_slots=2, max_tokens=40)
    first = model(torch.tensor([seqs[0]]), cache=cache, slots_B=torch.tensor([0]), last_only=True).logits
    token = int(first[0].argmax())
    seqs[0].append(token)
    ids, lengths = _right_padded([[token], seqs[2]])
    logits = model(ids, cache=cache, slots_B=torch.tensor([0, 1]), input_lengths_B=lengths, last_only=True).logits
    assert cache.lengths.tolist() == [len(seqs[0]), len(seqs[2])]
    both = [seqs[0], seqs[2]]
    _assert_rows_match(model, logits, both)
    _decode(model, cache, both, torch.tensor([0, 1]), steps=3, logits=logits)


@torch.no_grad()
def test_cache_overflow_raises(model: CausalLM) -> None:
    cfg = model.config
    seqs = _prompts(cfg, seed=7)
    ids, lengths = _right_padded(seqs)
    cache = KVCache(cfg, num_slots=3, max_tokens=15)
    logits = model(ids, cache=cache, input_lengths_B=lengths, last_only=True).logits
    logits = _decode(model, cache, seqs, torch.arange(3), steps=2, logits=logits)  # the longest is full: 15
    assert cache.lengths.tolist() == [7, 11, 15]
    with pytest.raises(CacheFullError, match="15"):
        model(logits.argmax(-1)[:, None], cache=cache, last_only=True)
    assert cache.lengths.tolist() == [7, 11, 15], "a refused write must not advance the cache"
    # The rows that still have room can go on without the full one.
    _decode(model, cache, seqs[:2], torch.tensor([0, 1]), steps=1, logits=logits[:2])
    # A prompt longer than a slot is refused up front.
    with pytest.raises(CacheFullError):
        model(torch.zeros(1, 16, dtype=torch.long), cache=KVCache(cfg, num_slots=1, max_tokens=15))


@torch.no_grad()
def test_reset_slot_reuses_it_for_a_new_sequence(model: CausalLM) -> None:
    cfg = model.config
    seqs = _prompts(cfg, seed=8)
    ids, lengths = _right_padded(seqs)
    cache = KVCache(cfg, num_slots=3, max_tokens=40)
    logits = model(ids, cache=cache, input_lengths_B=lengths, last_only=True).logits
    logits = _decode(model, cache, seqs, torch.arange(3), steps=3, logits=logits)
    # Sequence 1 finishes; a shorter new one takes its slot (its stale keys lie beyond the new length).
    cache.reset([1])
    assert cache.lengths.tolist() == [8, 0, 16]
    new = _prompts(cfg, lengths=(4,), seed=9)[0]
    fresh = model(torch.tensor([new]), cache=cache, slots_B=torch.tensor([1]), last_only=True).logits
    seqs[1] = new
    logits = torch.stack([logits[0], fresh[0], logits[2]])
    _assert_rows_match(model, logits, seqs)
    _decode(model, cache, seqs, torch.arange(3), steps=3, logits=logits)
    cache.reset()
    assert cache.lengths.tolist() == [0, 0, 0]


def test_cache_shapes_and_size() -> None:
    cfg = get_preset("debug")
    cache = KVCache(cfg, num_slots=3, max_tokens=10, dtype=torch.bfloat16)
    assert cache.num_slots == 3
    # One scratch column past max_tokens takes the writes of right-padding tokens.
    assert cache.k.shape == (cfg.num_hidden_layers, 3, cfg.num_key_value_heads, 11, cfg.attn_head_dim)
    assert cache.k.shape == (2, 3, 1, 11, 32)  # layers, slots, kv heads, max_tokens + 1, head_dim
    assert cache.nbytes() == 2 * 2 * 3 * 1 * 11 * 32 * 2  # k and v, bf16
    assert cache.positions(torch.tensor([0, 2]), 3, torch.tensor([3, 2])).tolist() == [[0, 1, 2], [0, 1, 10]]


@torch.no_grad()
def test_last_only_without_cache_uses_input_lengths(model: CausalLM) -> None:
    """Right padding never leaks into a causal forward; last_only picks each row's last real token."""
    seqs = _prompts(model.config, seed=10)
    ids, lengths = _right_padded(seqs)
    logits = model(ids, input_lengths_B=lengths, last_only=True).logits
    _assert_rows_match(model, logits, seqs)
