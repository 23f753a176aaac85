"""Incremental detokenisation with stop strings, and per-request seeded sampling."""

from __future__ import annotations

import pytest
import torch

from moe_core.tokenizer import Tokenizer
from serve.sampling import (
    SamplingParams,
    logits_to_probs,
    make_generator,
    penalised,
    prompt_logprobs,
    sample,
    top_logprobs,
)
from serve.text import TextOffsets, TextStream, TokenTexts


@pytest.fixture(scope="module")
def tokenizer(moe_dir) -> Tokenizer:
    return Tokenizer.from_dir(moe_dir)


def _stream_all(tokenizer: Tokenizer, ids: list[int], stop: list[str]) -> tuple[list[str], bool]:
    stream = TextStream(tokenizer, stop)
    deltas, stopped = [], False
    for token in ids:
        delta, stopped = stream.push(token)
        deltas.append(delta)
        if stopped:
            break
    if not stopped:
        deltas.append(stream.flush())
    return deltas, stopped


def test_deltas_concatenate_to_the_decoded_text(tokenizer):
    ids = tokenizer.encode("Once upon a time, the quick brown fox jumped over 12 lazy dogs.")
    deltas, stopped = _stream_all(tokenizer, ids, [])
    assert not stopped
    assert "".join(deltas) == tokenizer.decode(ids)


def test_stop_string_cuts_the_text_and_never_leaks(tokenizer):
    text = "Once upon a time, the quick brown fox jumped over the lazy dog."
    ids = tokenizer.encode(text)
    deltas, stopped = _stream_all(tokenizer, ids, ["brown fox", "never there"])
    assert stopped
    assert "".join(deltas) == text[: text.index("brown fox")]
    assert all("brown" not in d for d in deltas)


def test_text_that_could_start_a_stop_string_is_held_then_released(tokenizer):
    text = "alpha beta gamma"
    ids = tokenizer.encode(text)
    stream = TextStream(tokenizer, ["gamma ray"])
    released = "".join(stream.push(t)[0] for t in ids)
    assert not released.endswith("gamma")  # might still become "gamma ray": held back
    assert released + stream.flush() == text


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs = logits_to_probs(logits, 1.0, 0.7)
    assert torch.allclose(probs, torch.tensor([0.5, 0.3, 0.0, 0.0]) / 0.8)
    assert logits_to_probs(logits, 1.0, 0.01)[0] == 1.0  # the most likely token always survives
    # even when top_p is below float32's smallest number (found by the endpoint fuzzer: it killed the engine)
    tiny = SamplingParams(temperature=1.0, top_p=5e-324, seed=1)
    assert sample(logits, tiny, make_generator(tiny)) == 0


def test_seeded_sampling_repeats_and_greedy_is_argmax():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=42)
    first = [sample(logits, params, g) for g in [make_generator(params)] for _ in range(20)]
    second = [sample(logits, params, g) for g in [make_generator(params)] for _ in range(20)]
    assert first == second and len(set(first)) > 1
    assert sample(logits, SamplingParams(temperature=0.0), make_generator(params)) == int(logits.argmax())


def test_penalties_subtract_presence_and_frequency_of_generated_tokens():
    logits = torch.zeros(6)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=-1.0)
    expected = torch.tensor([0.0, 0.5, 1.5, 0.0, 0.0, 0.0])  # token 1 seen once, token 2 twice
    assert torch.equal(penalised(logits, [2, 1, 2], params), expected)
    assert penalised(logits, [2, 1, 2], SamplingParams()) is logits  # no penalties: untouched


def test_top_logprobs_are_the_raw_log_softmax_and_the_first_prompt_token_has_none():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 1.0]])
    expected = torch.log_softmax(logits, dim=-1)
    first, second = top_logprobs(logits, [0, 2], 2)
    assert first.token == 0 and first.logprob == pytest.approx(expected[0, 0].item())
    assert [t for t, _ in first.top] == [1, 2] and first.top[0][1] == pytest.approx(expected[0, 1].item())
    assert second.top[0][0] == 2 and top_logprobs(logits, [0, 2], 0)[0].top == ()
    entries = prompt_logprobs(torch.cat([logits, logits]), [7, 0, 2, 1], 1)
    assert entries[0] is None and [e.token for e in entries[1:]] == [0, 2, 1]
    assert prompt_logprobs(logits[:1], [7], 3) == (None,)  # a one-token prompt: nothing is predicted


def test_token_bytes_rebuild_split_characters_and_offsets_count_characters(tokenizer):
    text = "naïve 🙂 café"
    ids = tokenizer.encode(text)
    names = TokenTexts(tokenizer)
    assert b"".join(names.bytes(t) for t in ids) == text.encode()
    assert any(names.text(t) == "\ufffd" for t in ids), "the test needs a token holding part of a character"
    offsets = TextOffsets(names)
    starts = [offsets.push(t) for t in ids]
    # where the token's first byte lands: in the character that the text before it leaves unfinished, if any
    assert starts == [len(tokenizer.decode(ids[:i]).rstrip("\ufffd")) for i in range(len(ids))]
    end = tokenizer.token_to_id("<|im_end|>")
    assert names.special(end) and names.text(end) == "<|im_end|>" and names.bytes(end) == b"<|im_end|>"
    assert offsets.push(end, shown=False) == offsets.push(end) == len(text)
