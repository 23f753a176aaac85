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
from serve.engine import Engine, EngineFailedError, Failed, Finished, GenerationRequest, PromptLogprobs, TextDelta
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
    queues = [_submit(engine, [5, 6, 7], 10) for _ in range(3)]  # all queued before the first step fails
    engine.start()
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


def _events(q: queue.Queue, choices: int = 1) -> list[Any]:
    """Every event of a request until each of its choices has finished."""
    events: list[Any] = []
    while sum(isinstance(e, Finished) for e in events) < choices:
        events.append(q.get(timeout=60))
    return events


def _reference_logprobs_TV(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_logprobs_of_prompt_and_generated_tokens_match_a_plain_forward(moe_dir):
    tok = Tokenizer.from_dir(moe_dir)
    prompt = tok.encode("Once upon a time there was")
    engine = _engine(moe_dir, slots=2).start()
    try:
        events = _events(_submit(engine, prompt, 10, logprobs=3, prompt_logprobs=2, ignore_eos=True))
    finally:
        engine.stop()
    assert isinstance(events[0], PromptLogprobs) and isinstance(events[-1], Finished)
    generated = [e for d in events if isinstance(d, TextDelta) for e in d.logprobs]
    assert len(generated) == events[-1].completion_tokens == 10
    ids = prompt + [e.token for e in generated]
    ref_TV = _reference_logprobs_TV(load_model(moe_dir).eval(), ids)
    entries = events[0].entries
    assert len(entries) == len(prompt) and entries[0] is None
    for pos, entry in enumerate([*entries[1:], *generated], start=1):
        k = 2 if pos < len(prompt) else 3
        assert entry.token == ids[pos]
        assert abs(entry.logprob - ref_TV[pos - 1, ids[pos]].item()) < 1e-4
        values, top_ids = ref_TV[pos - 1].topk(k)
        assert [t for t, _ in entry.top] == top_ids.tolist()
        assert max(abs(lp - v) for (_, lp), v in zip(entry.top, values.tolist(), strict=True)) < 1e-4
    assert all(e.top[0][0] == e.token for e in generated)  # greedy: the chosen token is the most likely


def test_n_choices_are_indexed_and_seeded_per_choice(moe_dir):
    prompt = [5, 6, 7, 8]
    seeded = SamplingParams(temperature=1.0, seed=11)
    engine = _engine(moe_dir, slots=2).start()  # fewer slots than choices: they wait their turn
    try:
        three = _events(_submit(engine, prompt, 12, sampling=seeded, n=3, ignore_eos=True), choices=3)
        one = _events(_submit(engine, prompt, 12, sampling=seeded, ignore_eos=True))
    finally:
        engine.stop()
    texts = ["".join(e.text for e in three if isinstance(e, TextDelta) and e.index == j) for j in range(3)]
    finished = sorted((e.index, e.completion_tokens) for e in three if isinstance(e, Finished))
    assert finished == [(0, 12), (1, 12), (2, 12)]
    assert texts[0] == "".join(e.text for e in one if isinstance(e, TextDelta))  # choice 0 is the n = 1 answer
    assert len(set(texts)) == 3


def test_presence_and_frequency_penalties_follow_openai_over_generated_tokens(moe_dir):
    from serve.sampling import penalised

    prompt = [5, 6, 7, 8]
    params = SamplingParams(temperature=0.0, presence_penalty=0.7, frequency_penalty=1.5)
    model = load_model(moe_dir).eval()
    ids, expected = list(prompt), []
    for _ in range(16):  # the reference: penalise the last position's logits by the counts so far, argmax
        with torch.inference_mode():
            logits_V = model(torch.tensor([ids])).logits[0, -1].float()
        counts = torch.bincount(torch.tensor(expected, dtype=torch.long), minlength=logits_V.shape[0]).float()
        token = int(torch.argmax(logits_V - 0.7 * (counts > 0) - 1.5 * counts))
        assert token == int(torch.argmax(penalised(logits_V, expected, params)))
        expected.append(token)
        ids.append(token)
    engine = _engine(moe_dir, slots=2).start()
    try:
        penalised_run = _events(_submit(engine, prompt, 16, sampling=params, ignore_eos=True, logprobs=0))
        plain_run = _events(_submit(engine, prompt, 16, ignore_eos=True, logprobs=0))
    finally:
        engine.stop()
    tokens = [e.token for d in penalised_run if isinstance(d, TextDelta) for e in d.logprobs]
    plain = [e.token for d in plain_run if isinstance(d, TextDelta) for e in d.logprobs]
    assert tokens == expected and tokens != plain
    assert len(set(tokens)) > len(set(plain))  # the penalties made it repeat itself less
