"""Continuous batching on one model replica: requests join and leave the running batch between decode steps.

The engine owns the replica's KV-cache slots. A request waits until a slot is free (admission control: a full
cache makes requests wait, it never fails the replica), is prefilled together with the other newcomers, then
decodes one token per step alongside every running request until it stops (a stop token unless the request
has ``ignore_eos``, a stop string, ``max_tokens``, the slot's end, or cancellation). The model behind it is a
``StepRunner``: one process (``LocalRunner``) or an expert-parallel gang (``serve.gang``).

A request with ``n`` choices runs them as n sequences (each its own slot and seeded generator); every event
says which choice it belongs to. With ``logprobs`` each generated token's logprob goes out with the text; with
``prompt_logprobs`` the prompt's own logprobs go out once, before any text, from the prefill's logits.

The loop runs on its own thread so the replica's event loop stays free to accept requests and answer health
checks; results go back through each request's ``sink`` callback.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from moe_core.tokenizer import Tokenizer
from serve.sampling import (
    SamplingParams,
    TokenLogprob,
    make_generator,
    penalised,
    prompt_logprobs,
    sample,
    top_logprobs,
)
from serve.text import TextStream


@dataclass(frozen=True)
class StepOutput:
    logits_BV: torch.Tensor  # next-token logits of each row
    expert_counts_LE: torch.Tensor | None  # tokens routed to each expert per MoE layer (real tokens only)
    # prefill only: the logits at every prompt position [T_b, V] of the rows that asked for them, else None
    prompt_logits: tuple[torch.Tensor | None, ...] = ()


class StepRunner(Protocol):
    """Runs the model over cache slots; every call is one forward pass."""

    num_slots: int
    max_seq_len: int

    def prefill(self, prompts: list[list[int]], slots: list[int], all_logits: list[bool] | None = None) -> StepOutput:
        """``all_logits[b]``: also return row b's logits at every prompt position (``prompt_logits``)."""

    def decode(self, tokens: list[int], slots: list[int]) -> StepOutput: ...


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    # vLLM's ignore_eos: the tokenizer's stop tokens (EOS, generation_config's EOS ids, ChatML's end of turn) do
    # not end the request; it ends at max_tokens, a stop string, the slot's end or cancellation.
    ignore_eos: bool = False
    n: int = 1  # choices for the one prompt; every event carries its choice index
    logprobs: int | None = None  # k: each generated token's logprob and its k most likely alternatives
    prompt_logprobs: int | None = None  # k: the same for every prompt token (sent once, as PromptLogprobs)


@dataclass(frozen=True)
class TextDelta:
    text: str
    index: int = 0  # which of the request's n choices
    # The tokens generated since this choice's previous delta, with logprobs asked for: text may be held back
    # for a stop string, so a delta may have empty text and still carry tokens.
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class PromptLogprobs:
    """Sent once, before any TextDelta, when the request has prompt_logprobs: one entry per prompt token."""

    entries: tuple[TokenLogprob | None, ...]  # entries[0] is None: nothing predicts the first token


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" or "length" (OpenAI's finish_reason), or "cancelled"
    prompt_tokens: int
    completion_tokens: int  # every generated token, a stop token included
    index: int = 0  # one Finished per choice: the request is over when all n have finished


@dataclass(frozen=True)
class Failed:
    message: str


Event = TextDelta | PromptLogprobs | Finished | Failed


class EngineFailedError(RuntimeError):
    """The model runner broke (for example a rank of the gang died); the replica must be replaced."""


@dataclass
class _Sequence:
    request: GenerationRequest
    sink: Callable[[Event], None]
    text: TextStream
    generator: torch.Generator
    arrived: float
    index: int = 0
    slot: int = -1
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    first_token_at: float | None = None


class EngineStats:
    """Where the engine reports what it does: nowhere by default; Ray metrics in a replica (``serve.metrics``)."""

    def on_step(self, batch_size: int, cache_tokens: int, cache_capacity: int) -> None: ...
    def on_tokens(self, count: int) -> None: ...
    def on_first_token(self, seconds: float) -> None: ...
    def on_finish(self, seq_seconds_per_token: float | None) -> None: ...
    def on_expert_counts(self, counts_LE: torch.Tensor) -> None: ...


class Engine:
    def __init__(
        self, runner: StepRunner, tokenizer: Tokenizer, *, stats: EngineStats | None = None, max_prefill: int = 0
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.stop_ids = tokenizer.stop_token_ids
        self.stats = stats or EngineStats()
        self.max_prefill = max_prefill or runner.num_slots  # newcomers prefilled together in one step
        self.failure: str | None = None
        self._free_slots = deque(range(runner.num_slots))
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

    def submit(self, request: GenerationRequest, sink: Callable[[Event], None]) -> list[_Sequence]:
        """Queue a request (one sequence per choice); its events arrive through ``sink`` (on the engine thread)."""
        self._check_fits(request)
        now = time.monotonic()
        seqs = [
            _Sequence(
                request, sink, TextStream(self.tokenizer, request.stop), make_generator(request.sampling, j), now, j
            )
            for j in range(request.n)
        ]
        with self._wake:
            if self.failure is not None:
                raise EngineFailedError(self.failure)
            self._waiting.extend(seqs)
            self._wake.notify()
        return seqs

    def cancel(self, seqs: list[_Sequence]) -> None:
        """Stop generating for a request whose client went away (takes effect at the next step)."""
        for seq in seqs:
            seq.cancelled = True

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) request counts."""
        return len(self._running), len(self._waiting)

    def _check_fits(self, request: GenerationRequest) -> None:
        if not request.prompt_ids:
            raise ValueError("the prompt is empty")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {request.max_tokens}")
        total = len(request.prompt_ids) + request.max_tokens
        if total > self.runner.max_seq_len:
            raise ValueError(
                f"prompt ({len(request.prompt_ids)} tokens) + max_tokens ({request.max_tokens}) exceeds the "
                f"serving context of {self.runner.max_seq_len} tokens"
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
        """One scheduling iteration: drop cancelled requests, admit and prefill newcomers, decode the rest."""
        self._drop_cancelled()
        newcomers = self._admit()
        if newcomers:
            # A request's prompt logprobs come from its first choice's prefill (every choice has the same prompt).
            wants = [s.index == 0 and s.request.prompt_logprobs is not None for s in newcomers]
            out = self.runner.prefill([s.request.prompt_ids for s in newcomers], [s.slot for s in newcomers], wants)
            self._record(out)
            for seq, logits_TV in zip(newcomers, out.prompt_logits or [None] * len(newcomers), strict=True):
                if logits_TV is not None:
                    k = seq.request.prompt_logprobs
                    seq.sink(PromptLogprobs(prompt_logprobs(logits_TV, seq.request.prompt_ids, k)))
            self._advance(newcomers, out.logits_BV)
        decoding = [s for s in self._running if s not in newcomers]
        if decoding:
            out = self.runner.decode([s.generated[-1] for s in decoding], [s.slot for s in decoding])
            self._record(out)
            self._advance(decoding, out.logits_BV)
        cached = sum(len(s.request.prompt_ids) + len(s.generated) for s in self._running)
        self.stats.on_step(len(self._running), cached, self.runner.num_slots * self.runner.max_seq_len)

    def _admit(self) -> list[_Sequence]:
        admitted: list[_Sequence] = []
        with self._wake:
            while self._waiting and self._free_slots and len(admitted) < self.max_prefill:
                seq = self._waiting.popleft()
                seq.slot = self._free_slots.popleft()
                admitted.append(seq)
        self._running.extend(admitted)
        return admitted

    def _advance(self, seqs: list[_Sequence], logits_BV: torch.Tensor) -> None:
        now = time.monotonic()
        greedy = logits_BV.argmax(dim=-1).tolist()  # one op for the batch; the other rows are chosen one by one
        tokens = [
            self._choose(seq, logits_V, best) for seq, logits_V, best in zip(seqs, logits_BV, greedy, strict=True)
        ]
        logprobs = self._logprobs(seqs, logits_BV, tokens)
        for seq, token, logprob in zip(seqs, tokens, logprobs, strict=True):
            seq.generated.append(token)
            if seq.first_token_at is None:
                seq.first_token_at = now
                self.stats.on_first_token(now - seq.arrived)
            reason = self._emit(seq, token, logprob)
            if reason is not None:
                self._finish(seq, reason)
        self.stats.on_tokens(len(seqs))

    @staticmethod
    def _choose(seq: _Sequence, logits_V: torch.Tensor, best: int) -> int:
        params = seq.request.sampling
        if params.greedy and not params.penalises:
            return best
        return sample(penalised(logits_V, seq.generated, params), params, seq.generator)

    @staticmethod
    def _logprobs(seqs: list[_Sequence], logits_BV: torch.Tensor, tokens: list[int]) -> list[TokenLogprob | None]:
        """The chosen tokens' logprobs for the rows that asked, in one op (each row keeps its own k)."""
        rows = [i for i, seq in enumerate(seqs) if seq.request.logprobs is not None]
        out: list[TokenLogprob | None] = [None] * len(seqs)
        if rows:
            k = max(seqs[i].request.logprobs or 0 for i in rows)
            for i, entry in zip(rows, top_logprobs(logits_BV[rows], [tokens[i] for i in rows], k), strict=True):
                out[i] = TokenLogprob(entry.token, entry.logprob, entry.top[: seqs[i].request.logprobs])
        return out

    def _emit(self, seq: _Sequence, token: int, logprob: TokenLogprob | None) -> str | None:
        """Send the token's text (and logprob); the finish reason if the request is now over."""
        logprobs = () if logprob is None else (logprob,)
        if token in self.stop_ids and not seq.request.ignore_eos:
            if logprobs:  # the stop token is generated and counted, so it has a logprob (as in vLLM)
                seq.sink(TextDelta("", seq.index, logprobs))
            return "stop"
        delta, hit_stop = seq.text.push(token)
        if delta or logprobs:
            seq.sink(TextDelta(delta, seq.index, logprobs))
        if hit_stop:
            return "stop"
        if len(seq.generated) >= seq.request.max_tokens:
            return "length"
        return None

    def _finish(self, seq: _Sequence, reason: str) -> None:
        rest = seq.text.flush()  # text held back for a stop string that can no longer complete
        if rest:
            seq.sink(TextDelta(rest, seq.index))
        seq.sink(Finished(reason, len(seq.request.prompt_ids), len(seq.generated), seq.index))
        tpot = None
        if seq.first_token_at is not None and len(seq.generated) > 1:
            tpot = (time.monotonic() - seq.first_token_at) / (len(seq.generated) - 1)
        self.stats.on_finish(tpot)
        self._release(seq)

    def _release(self, seq: _Sequence) -> None:
        if seq in self._running:
            self._running.remove(seq)
        with self._wake:
            if seq.slot >= 0:
                self._free_slots.append(seq.slot)
                seq.slot = -1

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._running if s.cancelled]:
            seq.sink(Finished("cancelled", len(seq.request.prompt_ids), len(seq.generated), seq.index))
            self._release(seq)
        with self._wake:
            kept = [s for s in self._waiting if not s.cancelled]
            self._waiting = deque(kept)

    def _record(self, out: StepOutput) -> None:
        if out.expert_counts_LE is not None:
            self.stats.on_expert_counts(out.expert_counts_LE)

    def _fail_all(self, message: str) -> None:
        with self._wake:
            if self.failure is None:
                self.failure = message
            victims = self._running + list(self._waiting)
            self._running, self._waiting = [], deque()
        for seq in victims:
            seq.sink(Failed(message))
