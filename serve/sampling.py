"""Turning one row of logits into the next token: penalties, greedy, temperature, nucleus (top-p), seeded per
request; and the log-probabilities a request may ask to see.

Each choice owns a ``torch.Generator``: with a ``seed`` its samples depend only on its own logits, not on
which other requests share the batch, so the same request with the same seed gives the same text. Choice j of
a request with n choices draws from seed + j (as vLLM does), so choice 0 is what the same request with n = 1
gives.

Reported logprobs are the log-softmax of the raw model logits (in fp32), before penalties, temperature and
top-p: what the model thinks of a token, whatever the sampler then did (vLLM's default, ``raw_logprobs``).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-5  # temperatures under this are treated as 0 (argmax), as OpenAI-style servers do


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    # OpenAI's penalties over the tokens generated so far: logits[t] -= presence * (count[t] > 0) + frequency *
    # count[t] (the prompt does not count, as in OpenAI's and vLLM's definition)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalises(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass(frozen=True)
class TokenLogprob:
    """A token's logprob and the ``k`` most likely tokens at its position (token id, logprob), best first.

    Defined here, where logprobs are computed, and re-exported by ``serve.engine`` whose events carry it."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def make_generator(params: SamplingParams, choice: int = 0) -> torch.Generator:
    seed = params.seed + choice if params.seed is not None else secrets.randbits(63)
    return torch.Generator(device="cpu").manual_seed(seed % (1 << 63))


def penalised(logits_V: torch.Tensor, generated: Sequence[int], params: SamplingParams) -> torch.Tensor:
    """The logits with OpenAI's presence and frequency penalties for ``generated`` applied (fp32)."""
    if not params.penalises:
        return logits_V
    counts_V = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=logits_V.shape[-1])
    counts_V = counts_V.to(device=logits_V.device, dtype=torch.float32)
    return logits_V.float() - params.presence_penalty * (counts_V > 0) - params.frequency_penalty * counts_V


def logits_to_probs(logits_V: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Softmax(logits / T) in fp32, with the tail beyond cumulative probability top_p set to zero."""
    probs_V = torch.softmax(logits_V.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs_V
    sorted_probs, order = torch.sort(probs_V, descending=True)
    # Keep a token if the mass before it is still below top_p, and the most likely token always: a top_p
    # below float32's smallest number (5e-324 is valid JSON) would otherwise keep none, and sampling would fail.
    keep_sorted = sorted_probs.cumsum(-1) - sorted_probs < top_p
    keep_sorted[..., 0] = True
    kept = torch.zeros_like(probs_V).scatter(-1, order, sorted_probs * keep_sorted)
    return kept / kept.sum()


def sample(logits_V: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    if params.greedy:
        return int(torch.argmax(logits_V))
    probs_V = logits_to_probs(logits_V.cpu(), params.temperature, params.top_p)
    return int(torch.multinomial(probs_V, 1, generator=generator))


def top_logprobs(logits_BV: torch.Tensor, chosen_B: Sequence[int], k: int) -> list[TokenLogprob]:
    """Each row's chosen token with its logprob and the row's ``k`` most likely tokens (raw logits, fp32)."""
    logprobs_BV = torch.log_softmax(logits_BV.float(), dim=-1)
    chosen = torch.tensor(list(chosen_B), dtype=torch.long, device=logprobs_BV.device)
    picked = logprobs_BV.gather(-1, chosen[:, None])[:, 0].tolist()
    values, ids = logprobs_BV.topk(k, dim=-1) if k else (logprobs_BV[:, :0], logprobs_BV[:, :0].long())
    return [
        TokenLogprob(token, logprob, tuple(zip(row_ids, row_values, strict=True)))
        for token, logprob, row_ids, row_values in zip(
            chosen.tolist(), picked, ids.tolist(), values.tolist(), strict=True
        )
    ]


def prompt_logprobs(logits_TV: torch.Tensor, prompt_ids: Sequence[int], k: int) -> tuple[TokenLogprob | None, ...]:
    """Every prompt token's logprob given the tokens before it; the first token has none (nothing predicts it)."""
    return (None, *top_logprobs(logits_TV[: len(prompt_ids) - 1], prompt_ids[1:], k))
