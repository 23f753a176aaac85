"""The ingress's OpenAPI document (``/openapi.json``): request bodies from the pydantic request models, errors.

The routes read the raw request themselves (to bound its size and parse strictly before validating, see
``serve.edge``), so FastAPI cannot infer their bodies; each route declares its body with ``body_of`` and its
error answers with ``error_responses``, and ``publish`` puts the models' schemas into the document's components.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from serve.api import ErrorResponse

_REF = "#/components/schemas/{model}"

# Every error status the endpoint answers, with when.
ERROR_STATUSES = {
    400: "invalid request: malformed JSON, a field of the wrong type or value, a prompt beyond the context",
    401: "missing or wrong API key (only when the server was started with an API key)",
    404: "unknown model, or unknown URL",
    413: "request body larger than the endpoint's byte limit (--max-request-bytes)",
    415: "request body not declared as JSON",
    429: "the model replicas are at capacity; retry later",
    503: "no model replica could serve the request",
}
BEARER = {"bearer": {"type": "http", "scheme": "bearer", "description": "only when started with --api-key"}}
SECURED = {"security": [{"bearer": []}]}  # FastAPI ``openapi_extra=`` for a route behind the API key


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses=`` for these error statuses, each an OpenAI error object."""
    return {s: {"model": ErrorResponse, "description": ERROR_STATUSES[s]} for s in statuses}


def body_of(model: type[BaseModel]) -> dict[str, Any]:
    """FastAPI ``openapi_extra=`` for a completion route: ``model`` as its JSON body, JSON or SSE answers."""
    sse = {"schema": {"type": "string"}, "example": 'data: {"choices": [...]}\n\ndata: [DONE]\n\n'}
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": ref(model)}}}},
        "responses": {
            "200": {
                "description": "the completion; with stream: true, server-sent events ending in data: [DONE]",
                "content": {"text/event-stream": sse},
            }
        },
        **SECURED,
    }


def ref(model: type[BaseModel]) -> str:
    return _REF.format(model=model.__name__)


def publish(api: FastAPI, request_models: list[type[BaseModel]]) -> None:
    """Serve FastAPI's document with the request models' schemas (and the bearer scheme) in its components."""

    def document() -> dict[str, Any]:
        if api.openapi_schema is None:
            doc = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
            _, defs = models_json_schema([(m, "validation") for m in request_models], ref_template=_REF)
            components = doc.setdefault("components", {})
            components.setdefault("schemas", {}).update(defs["$defs"])
            components["securitySchemes"] = BEARER
            api.openapi_schema = doc
        return api.openapi_schema

    api.openapi = document  # type: ignore[method-assign]  # FastAPI's documented way to customise the document
