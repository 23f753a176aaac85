"""The ingress's HTTP edge: how a request body is read, and how every failure becomes an OpenAI error object.

A body is refused before it is parsed, let alone tokenised: a declared Content-Length over the limit at once,
a chunked body (no Content-Length) as soon as the bytes received pass it. The limit follows from the context
(``request_byte_limit``): a body that could still fit the context is never refused for its size.

Errors raised outside the endpoint's own code (an unknown route, a wrong method, a bug) would otherwise reach
the client as FastAPI's ``{"detail": ...}`` or a plain-text 500; ``install_error_handlers`` makes them OpenAI
error objects too.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from serve.api import OpenAIError, bad_request

# Bytes of request body one context token may take: a JSON-escaped non-ASCII character is 6 to 12 bytes
# ("\u4e2d", a surrogate pair) and a token may span several; token ids in a list are up to 8 bytes each.
# Generous on purpose: the limit is there to stop megabytes, not to judge prompts.
BYTES_PER_TOKEN = 32
MIN_REQUEST_BYTES = 1 << 20  # small contexts still take a chat history with long system prompts

log = logging.getLogger("ray.serve")


def request_byte_limit(max_request_bytes: int | None, context_tokens: int) -> int:
    """The largest request body the ingress reads: ``--max-request-bytes``, else derived from the context."""
    if max_request_bytes is not None:
        return max_request_bytes
    return max(MIN_REQUEST_BYTES, BYTES_PER_TOKEN * context_tokens)


def too_large(limit: int) -> OpenAIError:
    return OpenAIError(
        413,
        f"the request body is larger than this endpoint's limit of {limit} bytes",
        type_="invalid_request_error",
        code="request_too_large",
    )


def _check_content_type(request: Request) -> None:
    # A missing Content-Type is taken as JSON (some clients omit it); a declared other type is a client bug
    # (often a form-encoded curl -d) better named than answered with a JSON parse error.
    declared = request.headers.get("content-type")
    if declared is None:
        return
    media = declared.split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise OpenAIError(
            415,
            f"the request body must be JSON (Content-Type: application/json), not {declared!r}",
            type_="invalid_request_error",
        )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes (413 beyond), which must be declared as JSON (415)."""
    _check_content_type(request)
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise bad_request(f"invalid Content-Length header {declared!r}")
        if int(declared) > limit:
            raise too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def parse_json(raw: bytes) -> Any:
    """Strict JSON: no NaN or Infinity (Python's json takes them), nesting only as deep as the parser copes."""
    try:
        return json.loads(raw, parse_constant=_not_json)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise bad_request(f"the request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise bad_request("the request body is nested too deeply") from exc


# HTTP errors Starlette raises itself, in OpenAI's words for them.
_HTTP_MESSAGES = {
    404: "Invalid URL ({method} {path})",
    405: "Method {method} is not allowed for {path}",
}


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    template = _HTTP_MESSAGES.get(exc.status_code)
    message = template.format(method=request.method, path=request.url.path) if template else str(exc.detail)
    err = OpenAIError(exc.status_code, message, type_="invalid_request_error")
    return JSONResponse(err.body(), status_code=err.status, headers=exc.headers)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's own validation (422) only runs for typed route parameters; OpenAI calls that a 400.
    return JSONResponse(bad_request(f"invalid request: {exc.errors()}").body(), status_code=400)


async def _openai_error(_: Request, err: OpenAIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # A bug, not the client's fault: say so in the usual shape, and keep the traceback in the log.
    log.exception("unhandled error answering %s %s", request.method, request.url.path, exc_info=exc)
    err = OpenAIError(500, "the server failed to answer this request", type_="server_error")
    return JSONResponse(err.body(), status_code=500)


def install_error_handlers(api: FastAPI) -> None:
    api.add_exception_handler(OpenAIError, _openai_error)
    api.add_exception_handler(HTTPException, _http_error)
    api.add_exception_handler(RequestValidationError, _validation_error)
    api.add_exception_handler(Exception, _unexpected)
