"""Incremental detokenisation with stop strings, and per-request seeded sampling."""

from __future__ import annotations

import pytest
import torch

from moe_core.tokenizer import Tokenizer
from serve.sampling import SamplingParams, logits_to_probs, make_generator, sample
from serve.text import TextStream


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
