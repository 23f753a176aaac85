"""The continuous-batching engine on one process: output equals batched greedy decoding, requests join and
leave between steps, a full cache makes requests wait, ignore_eos runs past the stop tokens, and a broken model
fails requests, not the caller. Chunked prefill, preemption, n choices, logprobs and penalties: see
test_engine_scheduling.py."""

from __future__ import annotations

import queue
from typing import Any

import pytest
import torch

from moe_core.generate import greedy_generate
from moe_core.loading import load_model
from moe_core.tokenizer import Tokenizer
from serve.engine import Engine, EngineFailedError, Failed, Finished, GenerationRequest, TextDelta
from serve.runner import LocalRunner, ShardSpec
from serve.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("torch_single_thread")
GREEDY = SamplingParams(temperature=0.0)


def _engine(moe_dir, slots: int = 3, max_seq_len: int = 128, **kw: Any) -> Engine:
    """An engine running at most ``slots`` sequences, with blocks for that many full-context ones."""
    blocks = kw.pop("blocks", slots * -(-max_seq_len // 16))
    runner = LocalRunner(ShardSpec(str(moe_dir), blocks, max_seq_len, torch.float32, "cpu"))
    return Engine(runner, Tokenizer.from_dir(moe_dir), max_num_seqs=slots, **kw)


def _collect(q: queue.Queue) -> tuple[str, Any]:
    text = ""
    while True:
        event = q.get(timeout=60)
        if isinstance(event, TextDelta):
            text += event.text
        else:
            return text, event


def _submit(engine: Engine, prompt: list[int], max_tokens: int, **kw: Any) -> queue.Queue:
    q: queue.Queue = queue.Queue()
    engine.submit(GenerationRequest(prompt, max_tokens, kw.pop("sampling", GREEDY), **kw), q.put)
    return q


def test_more_requests_than_slots_all_match_greedy_reference(moe_dir):
    tok = Tokenizer.from_dir(moe_dir)
    prompts = [tok.encode(p) for p in ["Once upon a time", "The cat sat", "a b c", "Hello", "x", "We went to"]]
    engine = _engine(moe_dir, slots=3).start()
    try:
        queues = [_submit(engine, p, 24 + 3 * i) for i, p in enumerate(prompts)]  # they finish at different steps
        results = [_collect(q) for q in queues]
    finally:
        engine.stop()
    model = load_model(moe_dir).eval()
    for i, (prompt, (text, done)) in enumerate(zip(prompts, results, strict=True)):
        ref = greedy_generate(model, [prompt], 24 + 3 * i, stop_ids=tok.stop_token_ids)[0]
        kept = [t for t in ref if t not in tok.stop_token_ids]
        assert text == tok.decode(kept)
        assert isinstance(done, Finished) and done.completion_tokens == len(ref)
        assert done.prompt_tokens == len(prompt)
        assert done.reason == ("stop" if ref[-1] in tok.stop_token_ids else "length")


def test_requests_wait_for_a_free_slot_and_slots_are_reused(moe_dir):
    engine = _engine(moe_dir, slots=1).start()
    try:
        queues = [_submit(engine, [5, 6, 7], 5) for _ in range(4)]
        results = [_collect(q) for q in queues]
    finally:
        engine.stop()
    assert len({text for text, _ in results}) == 1  # the reused slot forgot the previous sequence
    assert all(isinstance(done, Finished) for _, done in results)


def test_cancelled_request_frees_its_slot(moe_dir):
    engine = _engine(moe_dir, slots=1)
    q: queue.Queue = queue.Queue()
    seq = engine.submit(GenerationRequest([5, 6], 100, GREEDY), q.put)
    engine.step()
    engine.cancel(seq)
    waiting = _submit(engine, [5, 6], 3)
    for _ in range(5):
        engine.step()
    assert isinstance(_collect(q)[1], Finished) and _collect(waiting)[1].reason in ("length", "stop")


def test_request_that_cannot_fit_is_refused_up_front(moe_dir):
    engine = _engine(moe_dir, max_seq_len=16)
    with pytest.raises(ValueError, match="exceeds the serving context of 16"):
        engine.submit(GenerationRequest(list(range(10)), 7, GREEDY), lambda e: None)
    with pytest.raises(ValueError, match="max_tokens"):
        engine.submit(GenerationRequest([1], 0, GREEDY), lambda e: None)


def test_a_broken_model_fails_every_request_and_refuses_new_ones(moe_dir):
    engine = _engine(moe_dir, slots=2)

    def broken(*_: Any) -> Any:
        raise RuntimeError("rank 1 is gone")

    engine.runner.step = broken  # type: ignore[method-assign]
    engine.start()
    queues = [_submit(engine, [5, 6, 7], 10) for _ in range(3)]
    for q in queues:
        _, event = _collect(q)
        assert isinstance(event, Failed) and "rank 1 is gone" in event.message
    assert engine.failure is not None
    with pytest.raises(EngineFailedError):
        engine.submit(GenerationRequest([5], 3, GREEDY), lambda e: None)
    engine.stop()


def test_ignore_eos_runs_to_max_tokens_past_the_stop_token_but_not_past_a_stop_string(moe_dir):
    tok = Tokenizer.from_dir(moe_dir)
    prompt = tok.encode("Once upon a time")
    ref = greedy_generate(load_model(moe_dir).eval(), [prompt], 12)[0]  # greedy, no stop ids at all
    engine = _engine(moe_dir, slots=2)
    engine.stop_ids = frozenset({ref[0]})  # the greedy first token is now the EOS: a normal request stops at once
    engine.start()
    try:
        stopped = _collect(_submit(engine, prompt, 12))
        ignored = _collect(_submit(engine, prompt, 12, ignore_eos=True))
        stop = tok.decode(ref)[len(tok.decode(ref[:4])) :][:3]  # text of the 5th token on
        assert stop.strip()
        cut = _collect(_submit(engine, prompt, 12, ignore_eos=True, stop=(stop,)))
    finally:
        engine.stop()
    full = tok.decode(ref)
    assert stopped == ("", Finished("stop", len(prompt), 1))
    assert ignored == (full, Finished("length", len(prompt), 12))  # the "EOS" token and 11 more
    text, done = cut  # explicit stop strings still apply
    assert done.reason == "stop" and done.completion_tokens < 12 and text == full[: full.index(stop)]
