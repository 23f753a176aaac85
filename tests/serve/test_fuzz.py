"""Schema-driven fuzzing of a running endpoint: schemathesis generates requests from the ingress's own OpenAPI
document, valid ones (positive) and ones the document says are invalid (negative), streamed or not.

Every answer must be a completion or an OpenAI error object with a documented status, never a 5xx; an invalid
request must be refused (so the document is no looser than the server); the server must be healthy afterwards.
Bounded: a fixed number of examples per operation and mode, no shrinking, the same examples every run.
The soak benchmark's mixed load (``upmoe bench serve --soak``) runs here too, briefly, on the same endpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    status_code_conformance,
)
from serve_testlib import running_endpoint

KEY = "fuzz-key"
MODEL = "fuzz-moe"
CONTEXT = 64  # short generations: a valid request costs at most this many decode steps
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY_LIMIT = 1 << 16  # --max-request-bytes: far above any generated body
EXAMPLES = 100  # per operation and mode: 2 x 2 x 100 POSTs (about half streamed when valid) + GET /v1/models
POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def url(serve_port: int, moe_dir: Path):
    options = {
        "model_dir": str(moe_dir),
        "model_name": MODEL,
        "api_key": KEY,
        "max_seq_len": CONTEXT,
        "max_batch_size": 4,
        "max_request_bytes": BODY_LIMIT,
    }
    with running_endpoint(serve_port, options) as base:
        yield base


@pytest.fixture(scope="module")
def schema(url: str):
    return schemathesis.openapi.from_url(f"{url}/openapi.json")


def openai_error_object(ctx, response, case) -> None:
    """Every failure is ``{"error": {message, type, param, code}}``."""
    if response.status_code < 400:
        return
    body = json.loads(response.content)
    assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    assert isinstance(body["error"]["type"], str), body


def complete_stream(ctx, response, case) -> None:
    """A 200 event stream carries JSON chunks and ends in [DONE], with no error event (a 5xx in disguise).

    schemathesis reads a stream's first 20 events only (its max_stream_events; a request with several prompts
    or choices sends more), then hangs up: the endpoint must take that as a cancel, and the events read must
    still be chunks, not errors."""
    if response.status_code != 200 or not response.headers.get("content-type", [""])[0].startswith("text/event"):
        return
    events = [line[6:] for line in response.content.decode().splitlines() if line.startswith("data: ")]
    if not response.stream_cut_short:
        assert events and events[-1] == "[DONE]", events[-3:]
    for event in events:
        assert event == "[DONE]" or "error" not in json.loads(event), event


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, negative_data_rejection]


def _aimed(case, ours: bool, stream: bool):
    # Random model names are all 404s, and a generated body seldom has the optional "stream": most valid
    # requests name the served model, so they reach generation, and half of those stream.
    if ours and isinstance(case.body, dict):
        case.body["model"] = MODEL
        case.body["stream"] = case.body.get("stream") or stream
    return case


def _cases(operation, mode):
    strategy = operation.as_strategy(generation_mode=mode)
    if mode is NEGATIVE:  # a negated body must stay as generated, or it may turn valid
        return strategy
    return st.builds(_aimed, strategy, st.integers(0, 4).map(lambda i: i < 4), st.booleans())


@pytest.mark.slow
@pytest.mark.parametrize("mode", [POSITIVE, NEGATIVE], ids=["valid", "invalid"])
@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/completions"), ("POST", "/v1/chat/completions")])
def test_fuzzed_requests_get_completions_or_openai_errors(schema, url, method, path, mode):
    session = requests.Session()
    sent: list[int] = []
    streamed = 0

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=_cases(schema[path][method], mode))
    def fuzz(case) -> None:
        response = case.call(base_url=url, session=session, headers=AUTH, timeout=120)
        nonlocal streamed
        sent.append(response.status_code)
        streamed += response.headers.get("content-type", [""])[0].startswith("text/event-stream")
        case.validate_response(response, checks=CHECKS, additional_checks=[openai_error_object, complete_stream])

    start = time.monotonic()
    fuzz()
    counts = {code: sent.count(code) for code in sorted(set(sent))}
    print(
        f"{method} {path} {mode.value}: {len(sent)} requests in {time.monotonic() - start:.1f} s: {counts}, "
        f"{streamed} streamed"
    )
    assert len(sent) >= EXAMPLES // 2  # hypothesis really generated (not everything filtered away)
    if mode is POSITIVE:
        assert counts.get(200, 0) > streamed > 0, "valid requests must reach the model, streamed and not"


def test_models_listing_conforms(schema, url):
    case = schema["/v1/models"]["GET"].Case()
    response = case.call(base_url=url, headers=AUTH, timeout=30)
    case.validate_response(response, checks=CHECKS, additional_checks=[openai_error_object])
    assert [m["id"] for m in response.json()["data"]] == [MODEL]


def test_a_short_soak_fails_no_valid_request(url):
    from bench.serve import prompts_for
    from bench.soak import soak

    prompts = [p[:60] for p in prompts_for(16)]  # within the fuzzing context
    result = soak(url, MODEL, 40, 8, 8, prompts, warmup=8, headers=AUTH)
    assert result["failed_valid"] == 0 and result["misanswered_invalid"] == 0, result["failures"]
    assert set(result["by_kind"]) == {"stream", "plain", "cancel", "invalid"} and result["healthy_after"]
    assert result["rss_start_bytes"] > 10 << 20  # the replica's processes were found


def test_max_request_bytes_is_the_limit(url):
    def post(size: int) -> httpx.Response:
        body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1}).encode()
        padded = body[:-1] + b" " * (size - len(body)) + b"}"  # JSON whitespace: the same request, `size` bytes
        return httpx.post(f"{url}/v1/completions", content=padded, headers=AUTH, timeout=60)

    assert post(BODY_LIMIT).status_code == 200
    over = post(BODY_LIMIT + 1)
    assert over.status_code == 413 and f"limit of {BODY_LIMIT} bytes" in over.json()["error"]["message"]


def test_the_server_is_healthy_after_the_fuzzing(url):
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    for stream in (False, True):
        body = {"model": MODEL, "prompt": "still there?", "max_tokens": 4, "stream": stream}
        response = httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=60)
        assert response.status_code == 200, response.text
