"""The ingress's HTTP edge without Ray: body limits, strict JSON, and failures as OpenAI error objects."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from serve.edge import MIN_REQUEST_BYTES, install_error_handlers, parse_json, read_body, request_byte_limit

LIMIT = 100_000


@pytest.fixture(scope="module")
def client() -> TestClient:
    api = FastAPI()
    install_error_handlers(api)

    @api.post("/echo")
    async def echo(request: Request) -> dict:
        return {"payload": parse_json(await read_body(request, LIMIT))}

    @api.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    return TestClient(api, raise_server_exceptions=False)


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_the_byte_limit_follows_the_context_with_a_floor():
    assert request_byte_limit(None, 512) == MIN_REQUEST_BYTES
    assert request_byte_limit(None, 131072) == 32 * 131072
    assert request_byte_limit(5000, 131072) == 5000  # --max-request-bytes wins


def test_oversized_bodies_are_413_declared_or_chunked(client):
    assert client.post("/echo", json="x" * 5000).json() == {"payload": "x" * 5000}
    big = b'"' + b"x" * LIMIT + b'"'
    assert _error(client.post("/echo", content=big), 413)["code"] == "request_too_large"
    # No Content-Length (chunked): refused once the bytes received pass the limit.
    chunked = client.post("/echo", content=iter([big[:60_000], big[60_000:]]))
    assert "content-length" not in {k.lower() for k in chunked.request.headers}
    _error(chunked, 413)


@pytest.mark.parametrize(
    "body,content_type,status,words",
    [
        (b'{"a": NaN}', "application/json", 400, "NaN is not JSON"),
        (b'{"a": -Infinity}', "application/json", 400, "not JSON"),
        (b"[" * 20_000 + b"]" * 20_000, "application/json", 400, "nested too deeply"),
        (b"\xff\xfe", "application/json", 400, "not valid JSON"),
        (b'{"a": 1}', "application/x-www-form-urlencoded", 415, "must be JSON"),
        (b'{"a": 1}', "text/plain", 415, "must be JSON"),
    ],
)
def test_bodies_that_are_not_strict_json_are_refused(client, body, content_type, status, words):
    assert (
        words in _error(client.post("/echo", content=body, headers={"content-type": content_type}), status)["message"]
    )


def test_json_content_types_are_accepted(client):
    for content_type in ("application/json; charset=utf-8", "application/merge-patch+json", None):
        headers = {"content-type": content_type} if content_type else {}
        assert client.post("/echo", content=b"[1]", headers=headers).status_code == 200


def test_routing_errors_and_bugs_are_openai_errors(client):
    assert _error(client.get("/nowhere"), 404)["message"] == "Invalid URL (GET /nowhere)"
    response = client.get("/echo")
    assert "GET is not allowed" in _error(response, 405)["message"] and response.headers["allow"] == "POST"
    error = _error(client.get("/boom"), 500)
    assert error["type"] == "server_error" and "a bug" not in error["message"]
