"""Continuous batching with chunked prefill on one model replica, over a paged KV cache.

Each step runs one forward over at most ``max_batched_tokens`` tokens: first one token for every decoding
sequence (running streams never stall), then the next prefill chunks of sequences still reading their prompt,
then newcomers while there is budget and room. So a burst of long prompts is read a chunk at a time, between
decode tokens, and no step's activations exceed what the budget allows.

KV memory is a pool of fixed-size blocks (``BlockPool``); a sequence takes blocks as it grows and returns them
when it ends. A newcomer is admitted only when its first chunk's blocks are free. When a running sequence needs
a block and none is free, the most recently admitted sequence is preempted: its blocks are freed and it goes
back to the front of the queue, to be recomputed from its prompt and the tokens it had generated (which its
client already has; nothing is sent twice). So a full cache makes requests wait; it never fails one.

A sequence is its tokens (prompt, then generated) and how many of them are cached; a step feeds it
``tokens[cached:]`` (or a chunk of them), and when that reaches the end a new token is sampled. ``n`` choices
of one request share the prompt's prefill: after it, each choice keeps the prompt's full blocks (shared, never
written again) and recomputes only the partial last block's few tokens into a block of its own.

The model behind the engine is a ``StepRunner``: one process (``LocalRunner``) or an expert-parallel gang
(``serve.gang``). The loop runs on its own thread so the replica's event loop stays free to accept requests and
answer health checks; results go back through each request's ``sink`` callback.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from moe_core.kv_cache import StepRow, blocks_for
from moe_core.tokenizer import Tokenizer
from serve.sampling import SamplingParams, TokenLogprob, make_generator, penalised, sample, top_logprobs
from serve.text import TextStream

DEFAULT_MAX_BATCHED_TOKENS = 2048


@dataclass(frozen=True)
class StepOutput:
    logits_RV: torch.Tensor  # logits at each row's requested positions, in row order (fp32)
    expert_counts_LE: torch.Tensor | None  # tokens routed to each expert per MoE layer


class StepRunner(Protocol):
    """Runs the model over the paged KV cache; every call is one forward pass."""

    num_blocks: int
    block_size: int
    max_seq_len: int

    def step(self, rows: list[StepRow]) -> StepOutput: ...


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    # vLLM's ignore_eos: the tokenizer's stop tokens (EOS, generation_config's EOS ids, ChatML's end of turn) do
    # not end the request; it ends at max_tokens, a stop string or cancellation.
    ignore_eos: bool = False
    n: int = 1  # choices sharing one prefill of the prompt; every event names its choice (``index``)
    logprobs: int | None = None  # k: each generated token's logprob and its k most likely alternatives
    prompt_logprobs: int | None = None  # k: the same for every prompt token after the first


@dataclass(frozen=True)
class TextDelta:
    text: str
    index: int = 0  # which of the request's n choices
    # The tokens generated since this choice's previous delta, when the request asked for logprobs. Text may be
    # held back for a stop string, so a delta can carry tokens and no text.
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class PromptLogprobs:
    """Sent once, before any text, when the request asked for prompt logprobs."""

    entries: tuple[TokenLogprob | None, ...]  # one per prompt token; the first has no prefix to be scored on


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" or "length" (OpenAI's finish_reason), or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    index: int = 0  # one per choice: the request is over when all n have finished


@dataclass(frozen=True)
class Failed:
    message: str


Event = TextDelta | PromptLogprobs | Finished | Failed


class EngineFailedError(RuntimeError):
    """The model runner broke (for example a rank of the gang died); the replica must be replaced."""


class BlockPool:
    """The KV cache's blocks: free ones, and how many sequences hold each taken one (forked choices share)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = deque(range(num_blocks))
        self._holders = [0] * num_blocks

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.num_blocks - len(self._free)

    def take(self, count: int) -> list[int]:
        if count > len(self._free):
            raise RuntimeError(f"{count} blocks asked, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(count)]
        for b in blocks:
            self._holders[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> list[int]:
        for b in blocks:
            self._holders[b] += 1
        return list(blocks)

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            self._holders[b] -= 1
            if self._holders[b] == 0:
                self._free.append(b)


class RequestHandle:
    """What ``submit`` returns: cancelling it ends every choice of the request."""

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self.cancelled = False


@dataclass
class _Sequence:
    """One choice of a request: its tokens, how many are in the KV cache, and the blocks holding them."""

    handle: RequestHandle
    sink: Callable[[Event], None]
    text: TextStream
    generator: torch.Generator
    arrived: float
    tokens: list[int]
    index: int = 0
    cached: int = 0
    blocks: list[int] = field(default_factory=list)
    prompt_entries: list[TokenLogprob | None] | None = None  # filled while the prompt is read, if asked for
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_scored: bool = False
    first_token_at: float | None = None
    forked: bool = False

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - len(self.request.prompt_ids)

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.request.prompt_ids) :]


class EngineStats:
    """Where the engine reports what it does: nowhere by default; Ray metrics in a replica (``serve.metrics``)."""

    def on_step(self, batch_size: int, blocks_used: int, blocks_total: int) -> None: ...
    def on_tokens(self, count: int) -> None: ...
    def on_first_token(self, seconds: float) -> None: ...
    def on_finish(self, seq_seconds_per_token: float | None) -> None: ...
    def on_expert_counts(self, counts_LE: torch.Tensor) -> None: ...
    def on_preempt(self) -> None: ...


class Engine:
    def __init__(
        self,
        runner: StepRunner,
        tokenizer: Tokenizer,
        *,
        stats: EngineStats | None = None,
        max_num_seqs: int = 16,
        max_batched_tokens: int = DEFAULT_MAX_BATCHED_TOKENS,
    ) -> None:
        if blocks_for(runner.max_seq_len, runner.block_size) > runner.num_blocks:
            raise ValueError(
                f"the KV cache ({runner.num_blocks} blocks of {runner.block_size} tokens) cannot hold one sequence "
                f"of the serving context ({runner.max_seq_len} tokens): give it more memory or a shorter context"
            )
        if max_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_batched_tokens and max_num_seqs must be at least 1")
        self.runner = runner
        self.tokenizer = tokenizer
        self.stop_ids = tokenizer.stop_token_ids
        self.stats = stats or EngineStats()
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.pool = BlockPool(runner.num_blocks)
        self.failure: str | None = None
        self.preemptions = 0
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="upmoe-engine", daemon=True)

    # ---- the caller's side ----------------------------------------------------------------------------

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def submit(self, request: GenerationRequest, sink: Callable[[Event], None]) -> RequestHandle:
        """Queue a request; its events arrive through ``sink`` (called on the engine thread)."""
        self._check_fits(request)
        handle = RequestHandle(request)
        seq = self._new_sequence(handle, sink, index=0)
        if request.prompt_logprobs is not None:
            seq.prompt_entries = [None]
        with self._wake:
            if self.failure is not None:
                raise EngineFailedError(self.failure)
            self._waiting.append(seq)
            self._wake.notify()
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        """Stop generating for a request whose client went away (takes effect at the next step)."""
        handle.cancelled = True

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) sequence counts."""
        return len(self._running), len(self._waiting)

    def _check_fits(self, request: GenerationRequest) -> None:
        if not request.prompt_ids:
            raise ValueError("the prompt is empty")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {request.max_tokens}")
        if request.n < 1:
            raise ValueError(f"n must be at least 1, got {request.n}")
        total = len(request.prompt_ids) + request.max_tokens
        if total > self.runner.max_seq_len:
            raise ValueError(
                f"prompt ({len(request.prompt_ids)} tokens) + max_tokens ({request.max_tokens}) exceeds the "
                f"serving context of {self.runner.max_seq_len} tokens"
            )

    def _new_sequence(self, handle: RequestHandle, sink: Callable[[Event], None], index: int) -> _Sequence:
        return _Sequence(
            handle,
            sink,
            TextStream(self.tokenizer, handle.request.stop),
            make_generator(handle.request.sampling, index),  # choice j draws from seed + j
            time.monotonic(),
            list(handle.request.prompt_ids),
            index=index,
        )

    # ---- the engine thread --------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._stopping and not self._waiting and not self._running:
                        self._wake.wait()
                    if self._stopping:
                        break
                self.step()
        except Exception as exc:  # the runner broke: fail every request and refuse new ones
            self._fail_all(f"model replica failed: {type(exc).__name__}: {exc}")
        self._fail_all("the model replica is shutting down")

    def step(self) -> None:
        """One scheduling iteration: drop cancelled requests, schedule a token budget, run it, sample."""
        self._drop_cancelled()
        scheduled = self._schedule()
        if scheduled:
            rows = [self._row(seq, take) for seq, take in scheduled]
            out = self.runner.step(rows)
            if out.expert_counts_LE is not None:
                self.stats.on_expert_counts(out.expert_counts_LE)
            self._consume(scheduled, rows, out.logits_RV)
        self.stats.on_step(len(self._running), self.pool.used, self.pool.num_blocks)

    # ---- scheduling ----

    def _schedule(self) -> list[tuple[_Sequence, int]]:
        """(sequence, tokens to feed) for this step: running sequences oldest first, decoders before prefills,
        then newcomers, within the token budget."""
        budget = self.max_batched_tokens
        scheduled: list[tuple[_Sequence, int]] = []
        running = sorted(self._running, key=lambda s: len(s.tokens) - s.cached > 1)  # stable: decoders first
        for seq in running:
            if budget == 0:
                break
            if seq not in self._running:  # preempted to make room for an older one
                continue
            take = min(len(seq.tokens) - seq.cached, budget)
            preempted = self.preemptions
            fits = self._grow(seq, seq.cached + take)
            if self.preemptions != preempted:  # a victim may have been scheduled already: give its tokens back
                scheduled = [(s, t) for s, t in scheduled if s in self._running]
                budget = self.max_batched_tokens - sum(t for _, t in scheduled)
            if fits:
                scheduled.append((seq, take))
                budget -= take
        while budget and self._waiting and len(self._running) < self.max_num_seqs:
            seq = self._waiting[0]
            take = min(len(seq.tokens) - seq.cached, budget)
            need = blocks_for(seq.cached + take, self.runner.block_size) - len(seq.blocks)
            if need > self.pool.free:
                break  # admission waits for free blocks (preempting to admit would only thrash)
            with self._wake:
                self._waiting.popleft()
            seq.blocks += self.pool.take(need)
            self._running.append(seq)
            scheduled.append((seq, take))
            budget -= take
        return scheduled

    def _grow(self, seq: _Sequence, num_tokens: int) -> bool:
        """Give ``seq`` blocks for ``num_tokens``, preempting the newest other sequences if need be; False if
        ``seq`` itself had to be preempted."""
        need = blocks_for(num_tokens, self.runner.block_size) - len(seq.blocks)
        while need > self.pool.free:
            victim = self._running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        seq.blocks += self.pool.take(max(0, need))
        return True

    def _preempt(self, seq: _Sequence) -> None:
        self._running.remove(seq)
        self.pool.release(seq.blocks)
        seq.blocks, seq.cached = [], 0
        self.preemptions += 1
        self.stats.on_preempt()
        with self._wake:
            self._waiting.appendleft(seq)

    def _row(self, seq: _Sequence, take: int) -> StepRow:
        end = seq.cached + take
        scoring_prompt = seq.prompt_entries is not None and not seq.prompt_scored
        logits = "all" if scoring_prompt else ("last" if end == len(seq.tokens) else "none")
        return StepRow(seq.tokens[seq.cached : end], seq.cached, seq.blocks, logits)

    # ---- after the forward ----

    def _consume(self, scheduled: list[tuple[_Sequence, int]], rows: list[StepRow], logits_RV: torch.Tensor) -> None:
        at = 0
        sampled: list[tuple[_Sequence, torch.Tensor]] = []
        for (seq, take), row in zip(scheduled, rows, strict=True):
            width = take if row.logits == "all" else (1 if row.logits == "last" else 0)
            seq_logits = logits_RV[at : at + width]
            at += width
            if row.logits == "all":
                self._score_prompt(seq, row, seq_logits)
            seq.cached += take
            if seq.cached == len(seq.tokens):
                sampled.append((seq, seq_logits[-1]))
        self._sample(sampled)

    def _score_prompt(self, seq: _Sequence, row: StepRow, logits_TV: torch.Tensor) -> None:
        """Prompt logprobs: the logits at position p score prompt token p + 1."""
        assert seq.prompt_entries is not None
        prompt = seq.request.prompt_ids
        targets = [p + 1 for p in range(row.start, row.start + len(row.tokens)) if p + 1 < len(prompt)]
        targets = [t for t in targets if t >= len(seq.prompt_entries)]
        if targets:
            first = targets[0] - 1 - row.start
            chosen = [prompt[t] for t in targets]
            k = seq.request.prompt_logprobs or 0
            seq.prompt_entries += top_logprobs(logits_TV[first : first + len(targets)], chosen, k)
        if len(seq.prompt_entries) == len(prompt):
            seq.prompt_scored = True
            seq.sink(PromptLogprobs(tuple(seq.prompt_entries)))

    def _sample(self, sampled: list[tuple[_Sequence, torch.Tensor]]) -> None:
        now = time.monotonic()
        expanded: list[tuple[_Sequence, torch.Tensor]] = []
        for seq, logits_V in sampled:
            expanded.append((seq, logits_V))
            if seq.request.n > 1 and not seq.forked:
                expanded += [(child, logits_V) for child in self._fork(seq)]
        if not expanded:
            return
        greedy = torch.stack([lv for _, lv in expanded]).argmax(dim=-1).tolist()  # one op for the batch
        for (seq, logits_V), best in zip(expanded, greedy, strict=True):
            token = self._choose(seq, logits_V, best)
            if seq.request.logprobs is not None:
                seq.pending_logprobs += top_logprobs(logits_V[None], [token], seq.request.logprobs)
            seq.tokens.append(token)
            if seq.first_token_at is None:
                seq.first_token_at = now
                self.stats.on_first_token(now - seq.arrived)
            reason = self._emit(seq, token)
            if reason is not None:
                self._finish(seq, reason)
        self.stats.on_tokens(len(expanded))

    def _choose(self, seq: _Sequence, logits_V: torch.Tensor, best: int) -> int:
        params = seq.request.sampling
        if params.greedy and not params.penalises:
            return best
        return sample(penalised(logits_V, seq.generated, params), params, seq.generator)

    def _fork(self, parent: _Sequence) -> list[_Sequence]:
        """The other n - 1 choices, once the prompt is read: they share its full blocks; the partial last one's
        tokens are recomputed into a block of each child's own at its next step."""
        parent.forked = True
        size = self.runner.block_size
        full = parent.cached // size
        children = []
        for index in range(1, parent.request.n):
            child = self._new_sequence(parent.handle, parent.sink, index)
            child.forked, child.arrived = True, parent.arrived
            child.blocks = self.pool.share(parent.blocks[:full])
            child.cached = full * size
            children.append(child)
        self._running += children
        return children

    def _emit(self, seq: _Sequence, token: int) -> str | None:
        """Send the token's text (and logprobs); the finish reason if the choice is now over."""
        if token in self.stop_ids and not seq.request.ignore_eos:
            self._send_text(seq, "")
            return "stop"
        delta, hit_stop = seq.text.push(token)
        self._send_text(seq, delta)
        if hit_stop:
            return "stop"
        if seq.num_generated >= seq.request.max_tokens:
            return "length"
        return None

    def _send_text(self, seq: _Sequence, text: str) -> None:
        if text or seq.pending_logprobs:
            seq.sink(TextDelta(text, seq.index, tuple(seq.pending_logprobs)))
            seq.pending_logprobs = []

    def _finish(self, seq: _Sequence, reason: str) -> None:
        self._send_text(seq, seq.text.flush())  # text held back for a stop string that can no longer complete
        seq.sink(Finished(reason, len(seq.request.prompt_ids), seq.num_generated, seq.index))
        tpot = None
        if seq.first_token_at is not None and seq.num_generated > 1:
            tpot = (time.monotonic() - seq.first_token_at) / (seq.num_generated - 1)
        self.stats.on_finish(tpot)
        self._release(seq)

    def _release(self, seq: _Sequence) -> None:
        if seq in self._running:
            self._running.remove(seq)
        self.pool.release(seq.blocks)
        seq.blocks = []

    def _drop_cancelled(self) -> None:
        with self._wake:
            dropped = [s for s in self._waiting if s.handle.cancelled]
            self._waiting = deque(s for s in self._waiting if not s.handle.cancelled)
        dropped += [s for s in self._running if s.handle.cancelled]
        for seq in dropped:
            # Before the fork the first choice stands for all of them.
            indices = [seq.index] if seq.forked else range(seq.request.n)
            for index in indices:
                seq.sink(Finished("cancelled", len(seq.request.prompt_ids), seq.num_generated, index))
            self._release(seq)

    def _fail_all(self, message: str) -> None:
        with self._wake:
            if self.failure is None:
                self.failure = message
            victims = self._running + list(self._waiting)
            self._running, self._waiting = [], deque()
        for seq in victims:
            seq.sink(Failed(message))
