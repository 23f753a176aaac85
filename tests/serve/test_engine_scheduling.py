"""The engine's scheduler over the paged KV cache: chunked prefill within a token budget, preemption when blocks
run out, n choices sharing one prefill, logprobs of generated and prompt tokens, and OpenAI's penalties. Each is
checked against the model's plain full forward."""

from __future__ import annotations

import queue
from typing import Any

import pytest
import torch

from moe_core.kv_cache import StepRow
from moe_core.loading import load_model
from moe_core.model import CausalLM
from moe_core.tokenizer import Tokenizer
from serve.engine import Engine, Finished, GenerationRequest, PromptLogprobs, StepOutput, TextDelta
from serve.runner import LocalRunner, ShardSpec
from serve.sampling import SamplingParams, penalised

pytestmark = pytest.mark.usefixtures("torch_single_thread")
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def model(moe_dir) -> CausalLM:
    return load_model(moe_dir).eval()


class RecordingRunner(LocalRunner):
    """Remembers every step's rows."""

    def __init__(self, spec: ShardSpec) -> None:
        super().__init__(spec)
        self.steps: list[list[StepRow]] = []

    def step(self, rows: list[StepRow]) -> StepOutput:
        self.steps.append(rows)
        return super().step(rows)


def _engine(moe_dir, *, blocks: int, max_seq_len: int = 64, seqs: int = 8, budget: int = 2048) -> Engine:
    runner = RecordingRunner(ShardSpec(str(moe_dir), blocks, max_seq_len, torch.float32, "cpu"))
    tok = Tokenizer.from_dir(moe_dir)
    engine = Engine(runner, tok, max_num_seqs=seqs, max_batched_tokens=budget)
    engine.stop_ids = frozenset()  # every request runs to max_tokens: lengths are known
    return engine


def _run(engine: Engine, requests: list[GenerationRequest]) -> list[list[Any]]:
    """Submit everything, step until every choice finished; the events each request received."""
    queues = []
    for r in requests:
        q: queue.Queue = queue.Queue()
        engine.submit(r, q.put)
        queues.append(q)
    for _ in range(10_000):
        engine.step()
        if not any(engine.load):
            break
    assert engine.load == (0, 0) and engine.pool.used == 0, "finished sequences must return every block"
    return [list(q.queue) for q in queues]


def _tokens(events: list[Any], index: int = 0) -> list[int]:
    return [lp.token for e in events if isinstance(e, TextDelta) and e.index == index for lp in e.logprobs]


@torch.no_grad()
def _greedy(model: CausalLM, prompt: list[int], n: int, params: SamplingParams = GREEDY) -> list[int]:
    """Reference: full forwards, no cache, penalties applied as the engine applies them."""
    seq = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([seq])).logits[0, -1]
        seq.append(int(penalised(logits, seq[len(prompt) :], params).argmax()))
    return seq[len(prompt) :]


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 200, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_long_prompts_prefill_in_chunks_while_running_streams_keep_decoding(moe_dir, model) -> None:
    engine = _engine(moe_dir, blocks=40, max_seq_len=96, budget=12)
    streaming = GenerationRequest(_prompt(5, 1), 30, GREEDY, logprobs=0)
    engine.submit(streaming, lambda e: None)
    engine.step()  # the stream is decoding before the burst arrives
    burst = [GenerationRequest(_prompt(40 + i, 10 + i), 6, GREEDY, logprobs=0) for i in range(3)]
    events = _run(engine, burst)
    steps = engine.runner.steps
    assert max(sum(len(r.tokens) for r in rows) for rows in steps) <= 12  # the token budget holds
    # Every step until the stream finished carried its decode token: the burst's 126 prompt tokens never stalled it.
    stream_steps = [rows for rows in steps[1:] if any(len(r.tokens) == 1 and r.start >= 5 for r in rows)]
    assert len(stream_steps) >= 29 and any(len(r.tokens) > 1 for rows in stream_steps for r in rows)
    for request, got in zip(burst, events, strict=True):
        assert _tokens(got) == _greedy(model, request.prompt_ids, 6)


def test_blocks_running_out_preempts_and_recomputes_without_changing_outputs(moe_dir, model) -> None:
    # 6 blocks of 16 tokens; 4 sequences of 10 + 30 tokens need 3 blocks each at the end: 12 > 6.
    engine = _engine(moe_dir, blocks=6, max_seq_len=48, seqs=4)
    requests = [GenerationRequest(_prompt(10, 20 + i), 30, GREEDY, logprobs=0) for i in range(4)]
    events = _run(engine, requests)
    assert engine.preemptions > 0
    for request, got in zip(requests, events, strict=True):
        assert _tokens(got) == _greedy(model, request.prompt_ids, 30)
        assert [e for e in got if isinstance(e, Finished)] == [Finished("length", 10, 30)]


def test_n_choices_share_the_prompt_prefill(moe_dir, model) -> None:
    engine = _engine(moe_dir, blocks=16)
    prompt = _prompt(37, 3)  # two full blocks shared, 5 tokens recomputed per extra choice
    sampled = GenerationRequest(prompt, 8, SamplingParams(temperature=1.0, seed=5), n=3, logprobs=0)
    greedy = GenerationRequest(prompt, 8, GREEDY, n=2, logprobs=0)
    events = _run(engine, [sampled, greedy])
    fed = sum(len(r.tokens) for rows in engine.runner.steps for r in rows if len(r.tokens) > 1)
    assert fed == 2 * 37 + (2 + 1) * (5 + 1)  # each prompt read once; each extra choice: its tail and first token
    choices = [_tokens(events[0], i) for i in range(3)]
    assert len({tuple(c) for c in choices}) == 3  # own generators (seed, seed + 1, seed + 2)
    want = _greedy(model, prompt, 8)
    assert _tokens(events[1], 0) == want and _tokens(events[1], 1) == want
    assert sorted(e.index for e in events[0] if isinstance(e, Finished)) == [0, 1, 2]
    again = _run(_engine(moe_dir, blocks=16), [sampled])[0]  # the same seed gives the same choices
    assert [_tokens(again, i) for i in range(3)] == choices


@torch.no_grad()
def test_logprobs_of_generated_and_prompt_tokens_match_the_full_forward(moe_dir, model) -> None:
    engine = _engine(moe_dir, blocks=16, budget=7)  # the prompt arrives in chunks of 7
    prompt = _prompt(20, 4)
    request = GenerationRequest(prompt, 5, GREEDY, logprobs=3, prompt_logprobs=2)
    events = _run(engine, [request])[0]
    scored = [e for e in events if isinstance(e, PromptLogprobs)]
    assert len(scored) == 1 and events.index(scored[0]) == 0  # once, before any text
    entries = scored[0].entries
    generated = _tokens(events)
    logprobs = torch.log_softmax(model(torch.tensor([prompt + generated])).logits[0].float(), dim=-1)
    assert entries[0] is None and len(entries) == len(prompt)
    for p, entry in enumerate(entries[1:], start=1):
        assert entry.token == prompt[p] and abs(entry.logprob - logprobs[p - 1, prompt[p]].item()) < 1e-5
        assert [t for t, _ in entry.top] == logprobs[p - 1].topk(2).indices.tolist()
    tokens = [lp for e in events if isinstance(e, TextDelta) for lp in e.logprobs]
    for i, lp in enumerate(tokens):
        row = logprobs[len(prompt) - 1 + i]
        assert abs(lp.logprob - row[lp.token].item()) < 1e-5 and lp.token == int(row.argmax())
        assert len(lp.top) == 3 and lp.top[0][0] == lp.token


def test_presence_and_frequency_penalties_follow_openai(moe_dir, model) -> None:
    engine = _engine(moe_dir, blocks=16)
    prompt = _prompt(6, 5)
    plain = GenerationRequest(prompt, 20, GREEDY, logprobs=0)
    # This random model's logits are nearly flat, so its greedy text never repeats and positive penalties would
    # change nothing: a negative presence penalty makes it repeat, the frequency penalty then breaks the loops.
    params = SamplingParams(temperature=0.0, presence_penalty=-2.0, frequency_penalty=0.6)
    penalised_request = GenerationRequest(prompt, 20, params, logprobs=0)
    events = _run(engine, [plain, penalised_request])
    assert _tokens(events[0]) == _greedy(model, prompt, 20)
    want = _greedy(model, prompt, 20, params)
    assert _tokens(events[1]) == want and want != _tokens(events[0])


def test_a_cache_too_small_for_one_full_context_sequence_is_refused(moe_dir) -> None:
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        _engine(moe_dir, blocks=3, max_seq_len=64)
