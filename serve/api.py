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

The models' JSON schemas (published in the OpenAPI document, ``serve.openapi``) say the same: the unimplemented
fields appear with only their accepted values, and no other property is allowed.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

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

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def refuse_unsupported(self) -> None:
        refuse_extra_fields(self.model_extra, self.UNSUPPORTED, informational=self.INFORMATIONAL)
        if self.stream_options is not None:
            refuse_extra_fields(self.stream_options.model_extra, {}, prefix="stream_options.")
            if not self.stream:
                raise bad_request("stream_options is only allowed when stream is true", "stream_options")


TokenId = Annotated[int, Field(ge=0, strict=True)]  # below the vocabulary size too, checked against the tokenizer
# One non-empty prompt per request: a text, a one-text list or token ids. The list's length and emptiness are
# checked in code (clearer messages than a union's); the schema states them.
_TEXT = {"type": "string", "minLength": 1}
_PROMPT = {
    "anyOf": [
        _TEXT,
        {"type": "array", "items": _TEXT, "minItems": 1, "maxItems": 1},
        {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1, "description": "token ids"},
    ]
}
Prompt = Annotated[str | list[str] | list[TokenId], WithJsonSchema(_PROMPT)]


class CompletionRequest(_Sampling):
    UNSUPPORTED = COMPLETION_UNSUPPORTED

    prompt: Prompt
    max_tokens: int | None = Field(16, ge=1, strict=True)  # OpenAI's default for completions

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) > 1:
            raise bad_request("only one prompt per request is supported", "prompt")


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

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for i, message in enumerate(self.messages):
            message.refuse_unsupported(f"messages[{i}]")
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
