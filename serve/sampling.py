"""Turning one row of logits into the next token: greedy, temperature, nucleus (top-p), seeded per request.

Each request owns a ``torch.Generator``: with a ``seed`` its samples depend only on its own logits, not on
which other requests share the batch, so the same request with the same seed gives the same text.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-5  # temperatures under this are treated as 0 (argmax), as OpenAI-style servers do


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float  # log-softmax of the model's logits (before temperature, top_p and penalties), fp32
    top: tuple[tuple[int, float], ...] = ()  # the k most likely (token, logprob), best first


def token_logprobs(logits_RV: torch.Tensor, chosen: list[int], k: int) -> list[TokenLogprob]:
    """Each row's chosen token with its logprob and the row's k most likely tokens, in one host read."""
    logprobs_RV = torch.log_softmax(logits_RV.float(), dim=-1)
    index = torch.tensor(chosen, dtype=torch.long, device=logprobs_RV.device)[:, None]
    own = logprobs_RV.gather(1, index)[:, 0].tolist()
    if k == 0:
        return [TokenLogprob(t, lp) for t, lp in zip(chosen, own, strict=True)]
    top_lp, top_ids = logprobs_RV.topk(k, dim=-1)
    return [
        TokenLogprob(t, lp, tuple(zip(ids, lps, strict=True)))
        for t, lp, ids, lps in zip(chosen, own, top_ids.tolist(), top_lp.tolist(), strict=True)
    ]


def penalised(logits_V: torch.Tensor, generated: list[int], params: SamplingParams) -> torch.Tensor:
    """OpenAI's penalties over the tokens generated so far: minus presence once per token that occurred, minus
    frequency times its count."""
    if not generated:
        return logits_V
    counts_V = torch.bincount(torch.tensor(generated, device=logits_V.device), minlength=logits_V.shape[-1])
    counts_V = counts_V[: logits_V.shape[-1]].to(logits_V.dtype)
    return logits_V - params.presence_penalty * (counts_V > 0).to(logits_V.dtype) - params.frequency_penalty * counts_V


def make_generator(params: SamplingParams) -> torch.Generator:
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    return torch.Generator(device="cpu").manual_seed(seed % (1 << 63))


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
