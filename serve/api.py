"""The OpenAI wire format: request models (validated by pydantic), response builders and error objects.

Every request field either does what OpenAI (or, for its extensions, vLLM) documents, or is refused with a 400
whose ``param`` names it, so clients never get something other than what they asked for:

- implemented: ``model``, ``prompt`` / ``messages``, ``max_tokens`` (chat: also ``max_completion_tokens``),
  ``temperature``, ``top_p``, ``seed``, ``stop``, ``stream``, ``stream_options.include_usage``, ``n``,
  ``presence_penalty`` and ``frequency_penalty`` (-2..2, over the generated tokens), vLLM's ``ignore_eos``;
  chat: ``logprobs`` (true/false) and ``top_logprobs`` (0..20, only with ``logprobs: true``); completions:
  ``logprobs`` (0..20 alternatives per token: a higher cap than OpenAI's 5, vLLM's default; ``false`` asks for
  none), ``echo`` (the prompt before the completion, with its tokens' logprobs when ``logprobs`` is set), and a
  list of prompts (texts or token-id lists) in one request;
- informational, accepted as is: ``user``, ``metadata``;
- known but not implemented (``logit_bias``, ``best_of``, ``tools``, ...): accepted only at a value that asks
  for nothing (null or OpenAI's default, e.g. ``best_of: 1``), refused otherwise;
- anything else: refused as OpenAI does, "Unrecognized request argument supplied: NAME".

A request has at most MAX_CHOICES choices: ``n`` times the number of prompts. Choice ``i * n + j`` is the j-th
completion of prompt i (OpenAI's and vLLM's order); usage counts each prompt once and every choice's tokens.

Logprobs are the model's (log-softmax of its raw logits, before penalties, temperature and top-p), in OpenAI's
two formats: chat's ``{"content": [{token, logprob, bytes, top_logprobs}]}`` and the legacy completions'
``{tokens, token_logprobs, top_logprobs, text_offset}``, whose top_logprobs maps token text to logprob for the
chosen token and the ``logprobs`` most likely (so up to ``logprobs + 1`` entries, as vLLM). Every generated
token is listed, a stop token included (vLLM does the same, and lm-evaluation-harness relies on it); the first
prompt token of an echo has ``null`` logprob and top_logprobs. Token texts are each token decoded alone (a
token holding part of a character shows U+FFFD; its ``bytes`` are the real ones).

The models' JSON schemas (published in the OpenAPI document, ``serve.openapi``) say the same: the unimplemented
fields appear with only their accepted values, and no other property is allowed.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from serve.engine import Event, Finished, PromptLogprobs, TextDelta, TokenLogprob
from serve.sampling import SamplingParams
from serve.text import TextOffsets, TokenTexts

MAX_LOGPROBS = 20  # most likely alternatives per token (OpenAI's chat limit; vLLM's default max_logprobs)
MAX_CHOICES = 128  # choices in one request, n x prompts (OpenAI's limit on n)
LOWEST_LOGPROB = -9999.0  # what OpenAI and vLLM send for -inf (JSON has no infinity)


class OpenAIError(Exception):
    """An error the client should see as an OpenAI error object with this HTTP status."""

    def __init__(self, status: int, message: str, *, type_: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, type_="invalid_request_error", param=param)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """What every failure answers (``OpenAIError.body``), as the OpenAPI document describes it."""

    error: ErrorDetail


# Request fields that ask nothing of generation (OpenAI's end-user id, tags for the caller's own records).
SAMPLING_INFORMATIONAL = frozenset({"user", "metadata"})

# OpenAI request fields this endpoint does not implement, each with the values that ask for nothing (null always
# does): a request may carry them at those values (clients often send defaults), any other value is a 400.
_SAMPLING_UNSUPPORTED: dict[str, tuple[Any, ...]] = {"logit_bias": ({},)}
COMPLETION_UNSUPPORTED = {**_SAMPLING_UNSUPPORTED, "best_of": (1,), "suffix": ("",)}
CHAT_UNSUPPORTED = {
    **_SAMPLING_UNSUPPORTED,
    "tools": ([],),
    "tool_choice": ("none",),
    "parallel_tool_calls": (),
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
    "reasoning_effort": (),
    "store": (False,),
    "service_tier": ("auto", "default"),
    "web_search_options": (),
}
MESSAGE_UNSUPPORTED = {
    "name": (),
    "tool_calls": ([],),
    "tool_call_id": (),
    "function_call": (),
    "refusal": (),
    "audio": (),
}


def _same(value: Any, neutral: Any) -> bool:
    """JSON equality that keeps booleans apart from numbers (``0`` is not ``false``, ``1`` is not ``true``)."""
    if isinstance(value, bool) or isinstance(neutral, bool):
        return value is neutral
    return bool(value == neutral)


def refuse_extra_fields(
    extra: Mapping[str, Any] | None,
    unsupported: Mapping[str, tuple[Any, ...]],
    *,
    prefix: str = "",
    informational: frozenset[str] = frozenset(),
) -> None:
    """400 for a field the model does not declare: unknown (OpenAI's wording), or known but asking for
    something this endpoint does not do. ``param`` names the field (``prefix`` locates a nested object)."""
    extra = extra or {}
    unknown = [f"{prefix}{k}" for k in extra if k not in unsupported and k not in informational]
    if unknown:
        plural = "s" if len(unknown) > 1 else ""
        raise bad_request(f"Unrecognized request argument{plural} supplied: {', '.join(unknown)}", unknown[0])
    for key, value in extra.items():
        if key not in unsupported or value is None or any(_same(value, v) for v in unsupported[key]):
            continue
        name, shown = f"{prefix}{key}", json.dumps(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        accepted = " or ".join(json.dumps(v) for v in (None, *unsupported[key]))
        raise bad_request(f"{name}={shown} is not supported by this endpoint; omit it or send {accepted}", name)


def _declare_extras(schema: dict[str, Any], cls: type) -> None:
    """JSON schema of a model whose undeclared fields are refused in code: list the unimplemented fields with
    the values ``refuse_extra_fields`` accepts, the informational ones as anything, and allow nothing else."""
    properties = schema.setdefault("properties", {})
    for name, neutral in cls.UNSUPPORTED.items():
        properties[name] = {
            "anyOf": [{"type": "null"}, *({"const": v} for v in neutral)],
            "description": "not implemented: accepted only at a value that asks for nothing",
        }
    for name in cls.INFORMATIONAL:
        properties[name] = {"description": "informational: accepted and not used"}
    schema["additionalProperties"] = False


class _Refusing(BaseModel):
    """A request object that keeps undeclared fields (``model_extra``) so refuse_unsupported can name them in
    the 400; UNSUPPORTED and INFORMATIONAL list the undeclared fields it accepts."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_declare_extras)
    UNSUPPORTED: ClassVar[Mapping[str, tuple[Any, ...]]] = {}
    INFORMATIONAL: ClassVar[frozenset[str]] = frozenset()


class StreamOptions(_Refusing):
    include_usage: bool = Field(False, strict=True)


class _Sampling(_Refusing):
    UNSUPPORTED = _SAMPLING_UNSUPPORTED
    INFORMATIONAL = SAMPLING_INFORMATIONAL

    # Numbers and booleans are strict, as OpenAI's API is: "stream": "yes" or "max_tokens": true is a 400, not a
    # guess (an int is still a valid float).
    model: str
    max_tokens: int | None = Field(None, ge=1, strict=True)
    temperature: float = Field(1.0, ge=0.0, le=2.0, strict=True)
    top_p: float = Field(1.0, gt=0.0, le=1.0, strict=True)
    seed: int | None = Field(None, strict=True)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    stream: bool = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    # vLLM's: generation ends only at max_tokens or a stop string, never at EOS
    ignore_eos: bool = Field(False, strict=True)
    n: int = Field(1, ge=1, le=MAX_CHOICES, strict=True)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, strict=True)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, strict=True)

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )

    def refuse_unsupported(self) -> None:
        refuse_extra_fields(self.model_extra, self.UNSUPPORTED, informational=self.INFORMATIONAL)
        if self.stream_options is not None:
            refuse_extra_fields(self.stream_options.model_extra, {}, prefix="stream_options.")
            if not self.stream:
                raise bad_request("stream_options is only allowed when stream is true", "stream_options")


TokenId = Annotated[int, Field(ge=0, strict=True)]  # below the vocabulary size too, checked against the tokenizer
# A text, token ids, or a list of either: one prompt or several. Emptiness and the number of prompts are checked
# in code (clearer messages than a union's); the schema states them.
_TEXT = {"type": "string", "minLength": 1}
_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1, "description": "token ids"}
_PROMPT = {
    "anyOf": [
        _TEXT,
        {"type": "array", "items": _TEXT, "minItems": 1, "maxItems": MAX_CHOICES, "description": "prompts"},
        _IDS,
        {"type": "array", "items": _IDS, "minItems": 1, "maxItems": MAX_CHOICES, "description": "token-id prompts"},
    ]
}
Prompt = Annotated[str | list[str] | list[TokenId] | list[list[TokenId]], WithJsonSchema(_PROMPT)]
LogprobCount = Annotated[int, Field(ge=0, le=MAX_LOGPROBS, strict=True)]


class CompletionRequest(_Sampling):
    UNSUPPORTED = COMPLETION_UNSUPPORTED

    prompt: Prompt
    max_tokens: int | None = Field(16, ge=1, strict=True)  # OpenAI's default for completions
    # false is accepted as "none" (clients send it); 0 asks for the chosen tokens' logprobs alone
    logprobs: LogprobCount | Literal[False] | None = None
    echo: bool = Field(False, strict=True)

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: one text or token-id list each."""
        if isinstance(self.prompt, str) or not self.prompt or isinstance(self.prompt[0], int):
            return [self.prompt]  # type: ignore[list-item]
        return list(self.prompt)  # type: ignore[arg-type]

    def logprob_count(self) -> int | None:
        return None if self.logprobs is None or self.logprobs is False else self.logprobs

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        count = len(self.prompts())
        if count * self.n > MAX_CHOICES:
            raise bad_request(
                f"{count} prompts x n={self.n} is {count * self.n} choices; at most {MAX_CHOICES} per request",
                "n" if count == 1 else "prompt",
            )


# Content parts are checked in refuse_unsupported (so a refusal names the part); the schema says what passes.
_TEXT_PART = {
    "type": "object",
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    "required": ["type", "text"],
    "additionalProperties": False,
}
TextParts = Annotated[list[dict[str, Any]], WithJsonSchema({"type": "array", "items": _TEXT_PART})]


class ChatMessage(_Refusing):
    UNSUPPORTED = MESSAGE_UNSUPPORTED

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | TextParts | None = None

    def refuse_unsupported(self, where: str) -> None:
        refuse_extra_fields(self.model_extra, self.UNSUPPORTED, prefix=f"{where}.")
        for j, part in enumerate(self.content if isinstance(self.content, list) else []):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request("only text content parts are supported", f"{where}.content[{j}]")
            refuse_extra_fields(
                {k: v for k, v in part.items() if k not in ("type", "text")}, {}, prefix=f"{where}.content[{j}]."
            )

    def text(self) -> str:
        """Plain-text content; a list of parts must be text parts (this model reads no images)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request("only text content parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Sampling):
    UNSUPPORTED = CHAT_UNSUPPORTED

    messages: list[ChatMessage] = Field(min_length=1)
    # deprecated by OpenAI in favour of max_completion_tokens; both are honoured
    max_tokens: int | None = Field(None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(None, ge=1, strict=True)
    logprobs: bool = Field(False, strict=True)
    top_logprobs: LogprobCount | None = None  # only with logprobs: true (0 asks for nothing, so it is allowed)

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for i, message in enumerate(self.messages):
            message.refuse_unsupported(f"messages[{i}]")
        if self.top_logprobs and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise bad_request(
                    f"max_tokens ({self.max_tokens}) and max_completion_tokens ({self.max_completion_tokens}) "
                    "disagree; send one of them",
                    "max_completion_tokens",
                )
            self.max_tokens = self.max_completion_tokens


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _logprob(value: float) -> float:
    return max(value, LOWEST_LOGPROB)


def _chat_token(token: int, logprob: float, names: TokenTexts) -> dict[str, Any]:
    return {"token": names.text(token), "logprob": _logprob(logprob), "bytes": list(names.bytes(token))}


def chat_logprobs(entries: Sequence[TokenLogprob], names: TokenTexts) -> dict[str, Any]:
    """OpenAI chat's logprobs object for these generated tokens."""
    content = [
        {**_chat_token(e.token, e.logprob, names), "top_logprobs": [_chat_token(t, lp, names) for t, lp in e.top]}
        for e in entries
    ]
    return {"content": content}


def completion_logprobs(
    ids: Sequence[int], entries: Sequence[TokenLogprob | None], offsets: TextOffsets, prompt_tokens: int = 0
) -> dict[str, Any]:
    """The legacy completions logprobs object for these tokens: the first ``prompt_tokens`` are an echoed
    prompt, the rest generated (whose text does not show special tokens); ``offsets`` carries on from the
    choice's earlier tokens."""
    names = offsets.names
    tokens, logprobs, tops, text_offset = [], [], [], []
    for position, (token, entry) in enumerate(zip(ids, entries, strict=True)):
        tokens.append(names.text(token))
        text_offset.append(offsets.push(token, shown=position < prompt_tokens or not names.special(token)))
        if entry is None:
            logprobs.append(None)
            tops.append(None)
            continue
        logprobs.append(_logprob(entry.logprob))
        top = {names.text(token): _logprob(entry.logprob)}
        for alt, lp in entry.top:
            top.setdefault(names.text(alt), _logprob(lp))
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": text_offset}


@dataclass(frozen=True)
class PromptInput:
    ids: list[int]
    text: str  # what an echo shows: the prompt as sent, or its token ids decoded


@dataclass
class ChoiceOutput:
    """What one choice produced: its text, its tokens' logprobs (when asked for) and how it ended."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: Finished | None = None


def collect(events: Sequence[Event], n: int) -> tuple[tuple[TokenLogprob | None, ...], list[ChoiceOutput]]:
    """One prompt's events, gathered: its prompt logprobs (empty if not asked for) and its n choices."""
    prompt: tuple[TokenLogprob | None, ...] = ()
    choices = [ChoiceOutput() for _ in range(n)]
    for event in events:
        if isinstance(event, PromptLogprobs):
            prompt = event.entries
        elif isinstance(event, TextDelta):
            choices[event.index].text += event.text
            choices[event.index].logprobs.extend(event.logprobs)
        elif isinstance(event, Finished):
            choices[event.index].finished = event
    return prompt, choices


class Choices:
    """How a request's events become OpenAI choices, whole or streamed: each choice's index (prompt i's j-th
    completion is i * n + j), its echoed prompt and its logprobs, in the chat or the legacy format."""

    def __init__(self, body: ChatRequest | CompletionRequest, prompts: list[PromptInput], names: TokenTexts) -> None:
        self.chat = isinstance(body, ChatRequest)
        self.object = "chat.completion" if self.chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if self.chat else "text_completion"
        self.n, self.prompts, self.names = body.n, prompts, names
        self.logprobs = body.logprob_count()
        self.echo = isinstance(body, CompletionRequest) and body.echo
        self._offsets: dict[int, TextOffsets] = {}  # per streamed completions choice: text_offset so far

    def index(self, prompt: int, choice: int) -> int:
        return prompt * self.n + choice

    # ---- whole answers ----

    def body(self, rid: str, model: str, answers: list[list[Event]]) -> dict[str, Any]:
        """The response to a non-streamed request: every prompt's events, in prompt order."""
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i, events in enumerate(answers):
            prompt_entries, outputs = collect(events, self.n)
            prompt_tokens += len(self.prompts[i].ids)
            for j, out in enumerate(outputs):
                assert out.finished is not None, "the model server returns only finished choices"
                completion_tokens += out.finished.completion_tokens
                choices.append(self._whole(i, j, out, prompt_entries))
        return {
            "id": rid,
            "object": self.object,
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens),
        }

    def _whole(
        self, i: int, j: int, out: ChoiceOutput, prompt_entries: tuple[TokenLogprob | None, ...]
    ) -> dict[str, Any]:
        reason = out.finished.reason if out.finished else None
        if self.chat:
            logprobs = None if self.logprobs is None else chat_logprobs(out.logprobs, self.names)
            message = {"role": "assistant", "content": out.text}
            return {"index": self.index(i, j), "message": message, "logprobs": logprobs, "finish_reason": reason}
        legacy = None
        if self.logprobs is not None:
            echoed = self.prompts[i].ids if self.echo else []
            ids = [*echoed, *(e.token for e in out.logprobs)]
            entries = [*(prompt_entries if self.echo else ()), *out.logprobs]
            legacy = completion_logprobs(ids, entries, TextOffsets(self.names), len(echoed))
        text = (self.prompts[i].text if self.echo else "") + out.text
        return {"index": self.index(i, j), "text": text, "logprobs": legacy, "finish_reason": reason}

    # ---- streamed answers: one choice object per chunk ----

    def chunk(self, rid: str, model: str, created: int, choice: dict[str, Any]) -> dict[str, Any]:
        return {"id": rid, "object": self.chunk_object, "created": created, "model": model, "choices": [choice]}

    def usage_chunk(self, rid: str, model: str, created: int, prompt_tokens: int, completion_tokens: int) -> dict:
        body = {"id": rid, "object": self.chunk_object, "created": created, "model": model, "choices": []}
        return {**body, "usage": usage(prompt_tokens, completion_tokens)}

    def opening(self, i: int, prompt_entries: tuple[TokenLogprob | None, ...]) -> list[dict[str, Any]]:
        """What prompt i's choices start with: chat's assistant role, or a completion's echoed prompt."""
        if self.chat:
            delta = {"role": "assistant", "content": ""}
            return [
                {"index": self.index(i, j), "delta": delta, "logprobs": None, "finish_reason": None}
                for j in range(self.n)
            ]
        if not self.echo:
            return []
        opened = []
        for j in range(self.n):
            legacy = None
            if self.logprobs is not None:
                ids = self.prompts[i].ids
                legacy = completion_logprobs(ids, prompt_entries, self._stream_offsets(self.index(i, j)), len(ids))
            opened.append(
                {"index": self.index(i, j), "text": self.prompts[i].text, "logprobs": legacy, "finish_reason": None}
            )
        return opened

    def delta(self, i: int, event: TextDelta) -> dict[str, Any]:
        index = self.index(i, event.index)
        if self.chat:
            logprobs = None if self.logprobs is None else chat_logprobs(event.logprobs, self.names)
            return {"index": index, "delta": {"content": event.text}, "logprobs": logprobs, "finish_reason": None}
        legacy = None
        if self.logprobs is not None:
            ids = [e.token for e in event.logprobs]
            legacy = completion_logprobs(ids, event.logprobs, self._stream_offsets(index))
        return {"index": index, "text": event.text, "logprobs": legacy, "finish_reason": None}

    def finish(self, i: int, event: Finished) -> dict[str, Any]:
        index = self.index(i, event.index)
        if self.chat:
            return {"index": index, "delta": {}, "logprobs": None, "finish_reason": event.reason}
        return {"index": index, "text": "", "logprobs": None, "finish_reason": event.reason}

    def _stream_offsets(self, index: int) -> TextOffsets:
        return self._offsets.setdefault(index, TextOffsets(self.names))


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
