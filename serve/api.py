"""The OpenAI wire format: request models (validated by pydantic), response builders and error objects.

Every request field either does what OpenAI (or, for its extensions, vLLM) documents, or is refused with a 400
whose ``param`` names it, so clients never get something other than what they asked for:

- implemented: ``model``, ``prompt`` / ``messages``, ``max_tokens`` (chat: also ``max_completion_tokens``),
  ``temperature``, ``top_p``, ``seed``, ``stop``, ``stream``, ``stream_options.include_usage`` and vLLM's
  ``ignore_eos``;
- informational, accepted as is: ``user``, ``metadata``;
- known but not implemented (``n``, ``logprobs``, penalties, ``tools``, ...): accepted only at a value that asks
  for nothing (null or OpenAI's default, e.g. ``n: 1``, ``presence_penalty: 0``), refused otherwise;
- anything else: refused as OpenAI does, "Unrecognized request argument supplied: NAME".
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve.engine import Finished


class OpenAIError(Exception):
    """An error the client should see as an OpenAI error object with this HTTP status."""

    def __init__(self, status: int, message: str, *, type_: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, type_="invalid_request_error", param=param)


# Request fields that ask nothing of generation (OpenAI's end-user id, tags for the caller's own records).
INFORMATIONAL = frozenset({"user", "metadata"})

# OpenAI request fields this endpoint does not implement, each with the values that ask for nothing (null always
# does): a request may carry them at those values (clients often send defaults), any other value is a 400.
_SAMPLING_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "logprobs": (False,),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "logit_bias": ({},),
}
COMPLETION_UNSUPPORTED = {**_SAMPLING_UNSUPPORTED, "echo": (False,), "best_of": (1,), "suffix": ("",)}
CHAT_UNSUPPORTED = {
    **_SAMPLING_UNSUPPORTED,
    "top_logprobs": (0,),
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


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")  # refused by name in refuse_unsupported

    include_usage: bool = Field(False, strict=True)


class _Sampling(BaseModel):
    # Undeclared fields are kept (``model_extra``) so refuse_unsupported can name them in the 400.
    model_config = ConfigDict(extra="allow")

    # Numbers and booleans are strict, as OpenAI's API is: "stream": "yes" or "max_tokens": true is a 400, not a
    # guess (an int is still a valid float).
    model: str
    max_tokens: int | None = Field(None, strict=True)
    temperature: float = Field(1.0, ge=0.0, le=2.0, strict=True)
    top_p: float = Field(1.0, gt=0.0, le=1.0, strict=True)
    seed: int | None = Field(None, strict=True)
    stop: str | list[str] | None = None
    stream: bool = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    # vLLM's: generation ends only at max_tokens or a stop string, never at EOS
    ignore_eos: bool = Field(False, strict=True)

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def refuse_unsupported(self) -> None:
        refuse_extra_fields(self.model_extra, self._unsupported(), informational=INFORMATIONAL)
        if self.stream_options is not None:
            refuse_extra_fields(self.stream_options.model_extra, {}, prefix="stream_options.")
            if not self.stream:
                raise bad_request("stream_options is only allowed when stream is true", "stream_options")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad_request(f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens")

    def _unsupported(self) -> Mapping[str, tuple[Any, ...]]:
        return _SAMPLING_UNSUPPORTED


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(16, strict=True)  # OpenAI's default for completions

    def _unsupported(self) -> Mapping[str, tuple[Any, ...]]:
        return COMPLETION_UNSUPPORTED

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) > 1:
            raise bad_request("only one prompt per request is supported", "prompt")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # refused by name in refuse_unsupported

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def refuse_unsupported(self, where: str) -> None:
        refuse_extra_fields(self.model_extra, MESSAGE_UNSUPPORTED, prefix=f"{where}.")
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
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(
        None, strict=True
    )  # deprecated by OpenAI in favour of max_completion_tokens; both are honoured
    max_completion_tokens: int | None = Field(None, strict=True)

    def _unsupported(self) -> Mapping[str, tuple[Any, ...]]:
        return CHAT_UNSUPPORTED

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for i, message in enumerate(self.messages):
            message.refuse_unsupported(f"messages[{i}]")
        if self.max_completion_tokens is not None:
            if self.max_completion_tokens < 1:
                raise bad_request(
                    f"max_completion_tokens must be at least 1, got {self.max_completion_tokens}",
                    "max_completion_tokens",
                )
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise bad_request(
                    f"max_tokens ({self.max_tokens}) and max_completion_tokens ({self.max_completion_tokens}) "
                    "disagree; send one of them",
                    "max_completion_tokens",
                )
            self.max_tokens = self.max_completion_tokens


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(done: Finished) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


def completion_body(rid: str, model: str, text: str, done: Finished, chat: bool) -> dict[str, Any]:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": done.reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done.reason}
        obj = "text_completion"
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage(done),
    }


def chunk_body(
    rid: str,
    model: str,
    created: int,
    chat: bool,
    *,
    text: str | None = None,
    role: bool = False,
    finish: str | None = None,
) -> dict[str, Any]:
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}


def usage_chunk(rid: str, model: str, created: int, chat: bool, done: Finished) -> dict[str, Any]:
    obj = "chat.completion.chunk" if chat else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage(done)}


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
