"""The Ray Serve application: an OpenAI-compatible ingress in front of an autoscaled model deployment.

    client ──HTTP──> OpenAIIngress (FastAPI: auth, validation, tokenisation, SSE)
                        └──handle──> ModelServer replicas (each an EP gang + continuous-batching engine)

A completions request with several prompts fans out into one ``GenerationRequest`` per prompt (each with the
request's ``n``), sent to one replica in one call and run there together; their events, tagged with the
prompt's position, become choices ``i * n + j`` (``serve.api`` ``Choices``), whole or streamed.

``build_app(args)`` is the import path ``serve deploy`` and KubeRay's RayService use (``serve.app:build_app``);
its ``args`` are ``serve.options.ServeOptions`` fields. The autoscaling config is explicit on purpose: Ray
Serve LLM's defaults effectively never add replicas.
"""

# No ``from __future__ import annotations`` here: FastAPI must see the real ``Request`` annotations of the
# ingress methods, or it treats ``request`` as a query parameter.
import asyncio
import hmac
import json
import logging
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError

from moe_core.loading import parse_dtype
from moe_core.tokenizer import Tokenizer, TokenizerError
from serve.api import (
    ChatRequest,
    Choices,
    CompletionRequest,
    OpenAIError,
    PromptInput,
    bad_request,
    new_id,
    sse,
)
from serve.edge import install_error_handlers, parse_json, read_body, request_byte_limit
from serve.engine import (
    Engine,
    EngineFailedError,
    Event,
    Failed,
    Finished,
    GenerationRequest,
    PromptLogprobs,
    TextDelta,
)
from serve.openapi import SECURED, body_of, error_responses, publish
from serve.options import ServeOptions
from serve.plan import kv_cache_blocks
from serve.runner import ShardSpec, check_expert_split, serving_context
from serve.text import TokenTexts

log = logging.getLogger("ray.serve")

HEALTH_PING_TIMEOUT_S = 10.0
GIL_SWITCH_INTERVAL_S = 0.0005
# No per-request access-log lines: at tens of requests per second they cost the ingress and replica measurable
# CPU; errors and warnings are still logged, and the metrics count every request.
QUIET_LOGS = {"enable_access_log": False}
# Streamed text leaves a replica at most this often per request (the first token at once). Each message is a
# Ray hop to the ingress and another to the HTTP proxy; per-token messages for 16 streams cost more CPU than
# the model's decode step, while 50 ms is below what a reader notices.
STREAM_INTERVAL_S = 0.1
# A request that has produced no token yet is safe to run again, so when its replica fails it is retried
# (on the replacement, if that was the only replica) for up to this long before the client sees a 503.
RETRY_BEFORE_FIRST_TOKEN_S = 60.0


def resolve_dtype(opts: ServeOptions, gpu: bool | None = None) -> torch.dtype:
    """--dtype, where auto is bf16 on GPU and fp32 on CPU (``gpu``: default from --gpus-per-rank)."""
    if opts.dtype != "auto":
        return parse_dtype({"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[opts.dtype])
    on_gpu = bool(opts.gpus_per_rank) if gpu is None else gpu
    return torch.bfloat16 if on_gpu else torch.float32


def shard_spec(opts: ServeOptions) -> ShardSpec:
    """What every rank of a replica loads and allocates; sized on rank 0 (on GPU, from its device's memory)."""
    cfg = check_expert_split(opts.model_dir, opts.ep)
    dtype = resolve_dtype(opts)
    max_seq_len = serving_context(cfg, opts.max_seq_len)
    return ShardSpec(
        model_dir=opts.model_dir,
        num_blocks=kv_cache_blocks(cfg, opts, dtype, max_seq_len),
        max_seq_len=max_seq_len,
        dtype=dtype,
        device="cuda" if opts.gpus_per_rank else "cpu",
        ep_size=opts.ep,
    )


# An event of a request's prompt i: completions requests carry several prompts to the replica in one call.
Tagged = tuple[int, Event]


def merge_text(events: list[Tagged]) -> list[Tagged]:
    """Join each choice's text deltas into its first one (their concatenation, text and logprobs, is all a
    client can observe; a choice's deltas all come before its Finished, and choices are independent)."""
    merged: list[Tagged] = []
    first: dict[tuple[int, int], int] = {}  # (prompt, choice) -> position of its first delta in merged
    for i, event in events:
        key = (i, event.index) if isinstance(event, TextDelta) else None
        if key is not None and key in first:
            prev = merged[first[key]][1]
            assert isinstance(prev, TextDelta) and isinstance(event, TextDelta)
            merged[first[key]] = (i, TextDelta(prev.text + event.text, prev.index, prev.logprobs + event.logprobs))
            continue
        if key is not None:
            first[key] = len(merged)
        merged.append((i, event))
    return merged


class ModelServer:
    """One model replica: rank 0 of an EP gang, running the engine. Serve scales these."""

    def __init__(self, options: dict[str, Any]) -> None:
        from serve.gang import GangRunner, set_threads_from_ray
        from serve.metrics import ReplicaMetrics
        from serve.runner import LocalRunner

        set_threads_from_ray()
        # The engine thread releases the GIL around every torch op and must win it back from the replica's
        # asyncio threads each time; with Python's default 5 ms switch interval a decode step of ~100 small ops
        # waits far longer for the GIL than it computes.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self.opts = ServeOptions(**options)
        spec = shard_spec(self.opts)
        self.runner = GangRunner(spec, self.opts.gpus_per_rank) if spec.ep_size > 1 else LocalRunner(spec)
        tokenizer = Tokenizer.from_dir(self.opts.model_dir)
        self.engine = Engine(
            self.runner,
            tokenizer,
            stats=ReplicaMetrics(),
            max_num_seqs=self.opts.max_batch_size,
            max_batched_tokens=self.opts.max_num_batched_tokens,
        ).start()

    async def generate(self, requests: list[GenerationRequest]) -> AsyncIterator[list[Tagged]]:
        """Stream the events of a request's prompts (one GenerationRequest each), tagged with the prompt's
        position and coalesced: each message carries everything that arrived meanwhile.

        One call per client request, whatever its number of prompts: it is one unit of the replica's
        max_ongoing_requests, and Serve handles (retries, cancels) it as one. Every message is a hop through Ray
        to the ingress (and another to the HTTP proxy), so the first message goes at once and later ones at most
        every STREAM_INTERVAL_S. The stream ends when every choice has finished (or one failed). If the caller
        goes away, the request is cancelled.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Tagged] = asyncio.Queue()

        def sink_for(i: int) -> Any:
            def sink(event: Event) -> None:
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, (i, event))
                except RuntimeError:  # the event loop is gone: the replica is shutting down
                    pass

            return sink

        handles: list[Any] = []
        unfinished = sum(r.n for r in requests)
        sent_at: float | None = None
        try:
            for i, request in enumerate(requests):
                handles.append(self.engine.submit(request, sink_for(i)))
            while True:
                batch = [await queue.get()]
                if sent_at is not None:  # the first message goes at once: time to first token matters
                    await asyncio.sleep(max(0.0, sent_at + STREAM_INTERVAL_S - time.monotonic()))
                sent_at = time.monotonic()
                while not queue.empty():
                    batch.append(queue.get_nowait())
                yield merge_text(batch)
                unfinished -= sum(isinstance(e, Finished) for _, e in batch)
                if unfinished == 0 or any(isinstance(e, Failed) for _, e in batch):
                    return
        finally:
            for handle in handles:
                self.engine.cancel(handle)

    async def complete(self, requests: list[GenerationRequest]) -> list[list[Event]]:
        """Each prompt's events in one message, each choice's text joined (non-streaming requests)."""
        tagged: list[Tagged] = []
        async for batch in self.generate(requests):
            tagged.extend(batch)
        failed = next((e for _, e in tagged if isinstance(e, Failed)), None)
        if failed is not None:
            raise EngineFailedError(failed.message)
        answers: list[list[Event]] = [[] for _ in requests]
        for i, event in merge_text(tagged):
            answers[i].append(event)
        return answers

    def check_health(self) -> None:
        if self.engine.failure is not None:
            raise EngineFailedError(self.engine.failure)
        ping = getattr(self.runner, "ping_workers", None)
        if ping is not None:
            ping(HEALTH_PING_TIMEOUT_S)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()


api = FastAPI(title="upmoe", description="OpenAI-compatible completions from an upmoe model")
install_error_handlers(api)
publish(api, [CompletionRequest, ChatRequest])
# What a POST route may answer besides its completion; /v1/models only checks the key.
POST_ERRORS = error_responses(400, 401, 404, 413, 415, 429, 503)


def _describe(errors: Any) -> str:
    parts = []
    for e in errors:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "; ".join(parts) or "invalid request"


async def _parse(request: Request, model_cls: type, limit: int) -> Any:
    payload = parse_json(await read_body(request, limit))
    if not isinstance(payload, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        # JSON may spell a lone UTF-16 surrogate ("\ud800"), which no tokenizer (nor UTF-8) can take.
        json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_request("the request holds a lone UTF-16 surrogate (\\ud800-\\udfff); send valid Unicode") from exc
    try:
        return model_cls.model_validate(payload)
    except ValidationError as exc:
        errors = exc.errors()
        param = next((str(e["loc"][0]) for e in errors if e.get("loc")), None)  # the top-level field at fault
        raise bad_request(_describe(errors), param) from exc


def _at_capacity() -> OpenAIError:
    return OpenAIError(429, "the server is at capacity; retry later", type_="rate_limit_error")


def _unavailable(exc: Exception) -> OpenAIError:
    # The client gets the kind of failure; the Ray traceback (paths, actor ids) only goes to the log.
    log.warning("no model replica could serve a request: %s", exc)
    return OpenAIError(
        503, f"no model replica could serve the request ({type(exc).__name__}); retry later", type_="server_error"
    )


class _Backoff:
    """Waits between retries (0.5 s doubling to 5 s) until RETRY_BEFORE_FIRST_TOKEN_S, then gives up with a 503."""

    def __init__(self) -> None:
        self.deadline = time.monotonic() + RETRY_BEFORE_FIRST_TOKEN_S
        self.delay = 0.5

    async def wait_or_raise(self, exc: Exception) -> None:
        if time.monotonic() + self.delay > self.deadline:
            raise _unavailable(exc) from exc
        await asyncio.sleep(self.delay)
        self.delay = min(2 * self.delay, 5.0)


# Defined before the ingress class: Serve pickles that class by value with the globals it sees then.
async def _first_event(events: AsyncIterator[Tagged]) -> Tagged:
    tagged = await anext(events)
    if isinstance(tagged[1], Failed):
        raise OpenAIError(503, tagged[1].message, type_="server_error")
    return tagged


async def _sse_stream(
    rid: str, model: str, choices: Choices, first: Tagged, events: AsyncIterator[Tagged], include_usage: bool
) -> AsyncIterator[str]:
    created = int(time.time())
    started: set[int] = set()
    prompt_tokens = completion_tokens = 0
    tagged: Tagged | None = first
    while tagged is not None:
        i, event = tagged
        if i not in started:  # prompt i's first event: its choices open (with the echo and its logprobs)
            started.add(i)
            prompt_tokens += len(choices.prompts[i].ids)
            entries = event.entries if isinstance(event, PromptLogprobs) else ()
            for choice in choices.opening(i, entries):
                yield sse(choices.chunk(rid, model, created, choice))
        if isinstance(event, TextDelta):
            yield sse(choices.chunk(rid, model, created, choices.delta(i, event)))
        elif isinstance(event, Finished):
            completion_tokens += event.completion_tokens
            yield sse(choices.chunk(rid, model, created, choices.finish(i, event)))
        elif isinstance(event, Failed):
            yield sse(OpenAIError(503, event.message, type_="server_error").body())
            break
        tagged = await anext(events, None)
    else:
        if include_usage:
            yield sse(choices.usage_chunk(rid, model, created, prompt_tokens, completion_tokens))
    yield sse("[DONE]")


@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, model: Any, options: dict[str, Any]) -> None:
        self.model = model
        self.opts = ServeOptions(**options)
        self.tokenizer = Tokenizer.from_dir(self.opts.model_dir)
        self.names = TokenTexts(self.tokenizer)
        self.max_seq_len = serving_context(check_expert_split(self.opts.model_dir, self.opts.ep), self.opts.max_seq_len)
        self.max_request_bytes = request_byte_limit(self.opts.max_request_bytes, self.max_seq_len)

    def _authorize(self, request: Request) -> None:
        if not self.opts.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.opts.api_key.encode()):
            raise OpenAIError(401, "invalid or missing API key", type_="invalid_request_error", code="invalid_api_key")

    def _check_model(self, name: str) -> None:
        if name != self.opts.model_name:
            raise OpenAIError(
                404,
                f"the model {name!r} does not exist; this endpoint serves {self.opts.model_name!r}",
                type_="invalid_request_error",
                param="model",
                code="model_not_found",
            )

    @api.get("/health", include_in_schema=False)
    async def health(self) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": self.opts.model_name})

    @api.get("/v1/models", responses=error_responses(401), openapi_extra=SECURED)
    async def models(self, request: Request) -> JSONResponse:
        self._authorize(request)
        card = {"id": self.opts.model_name, "object": "model", "created": 0, "owned_by": "upmoe"}
        return JSONResponse({"object": "list", "data": [card]})

    async def _accept(self, request: Request, model_cls: type) -> Any:
        """Authorise, parse and validate a POST body; refuse what this endpoint does not do."""
        self._authorize(request)
        body = await _parse(request, model_cls, self.max_request_bytes)
        body.refuse_unsupported()
        self._check_model(body.model)
        return body

    @api.post("/v1/completions", responses=POST_ERRORS, openapi_extra=body_of(CompletionRequest))
    async def completions(self, request: Request) -> Any:
        body: CompletionRequest = await self._accept(request, CompletionRequest)
        return await self._respond(body, [self._prompt_input(p, body.echo) for p in body.prompts()])

    def _prompt_input(self, prompt: str | list[int], echo: bool) -> PromptInput:
        if isinstance(prompt, str):
            return PromptInput(self.tokenizer.encode(prompt), prompt)
        ids = [int(t) for t in prompt]
        if any(t < 0 or t >= self.tokenizer.vocab_size for t in ids):
            raise bad_request("prompt token ids must be in the vocabulary", "prompt")
        # An echo of token ids shows them decoded, special tokens and all (it is what the model read).
        return PromptInput(ids, self.tokenizer.decode(ids, skip_special_tokens=False) if echo else "")

    @api.post("/v1/chat/completions", responses=POST_ERRORS, openapi_extra=body_of(ChatRequest))
    async def chat_completions(self, request: Request) -> Any:
        body: ChatRequest = await self._accept(request, ChatRequest)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            prompt_ids = self.tokenizer.encode(self.tokenizer.apply_chat_template(messages))
        except TokenizerError as exc:
            raise bad_request(str(exc), "messages") from exc
        return await self._respond(body, [PromptInput(prompt_ids, "")])

    def _generation_request(self, body: Any, prompt_ids: list[int]) -> GenerationRequest:
        if not prompt_ids:
            raise bad_request("the prompt is empty", "prompt")
        room = self.max_seq_len - len(prompt_ids)
        if room < 1:
            raise bad_request(
                f"the prompt has {len(prompt_ids)} tokens; this endpoint's context is {self.max_seq_len} tokens",
                "messages" if isinstance(body, ChatRequest) else "prompt",
            )
        max_tokens = body.max_tokens if body.max_tokens is not None else room
        if max_tokens > room:
            raise bad_request(
                f"this endpoint's context is {self.max_seq_len} tokens; you requested {len(prompt_ids) + max_tokens} "
                f"({len(prompt_ids)} in the prompt, {max_tokens} for the completion)",
                "max_tokens",
            )
        logprobs = body.logprob_count()
        echo = isinstance(body, CompletionRequest) and body.echo
        return GenerationRequest(
            prompt_ids,
            max_tokens,
            body.sampling_params(),
            body.stop_strings(),
            ignore_eos=body.ignore_eos,
            n=body.n,
            logprobs=logprobs,
            prompt_logprobs=logprobs if echo else None,
        )

    async def _respond(self, body: Any, prompts: list[PromptInput]) -> Any:
        """Generate for every prompt (each with the request's n choices), whole or streamed."""
        gens = [self._generation_request(body, p.ids) for p in prompts]  # every prompt is checked before any runs
        choices = Choices(body, prompts, self.names)
        rid = new_id("chatcmpl" if choices.chat else "cmpl")
        if not body.stream:
            answers = await self._with_retries(lambda: self.model.complete.remote(gens))
            return JSONResponse(choices.body(rid, body.model, answers))
        events = self._events(gens)
        first = await _first_event(events)  # errors before the first token become HTTP errors, not broken streams
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _sse_stream(rid, body.model, choices, first, events, include_usage), media_type="text/event-stream"
        )

    async def _with_retries(self, call: Any) -> Any:
        """Run a whole (non-streamed) generation, retrying on a failed replica until the deadline."""
        backoff = _Backoff()
        while True:
            try:
                return await call()
            except BackPressureError as exc:
                raise _at_capacity() from exc
            except Exception as exc:  # the replica died or its engine failed; nothing was sent yet
                await backoff.wait_or_raise(exc)

    async def _events(self, gens: list[GenerationRequest]) -> AsyncIterator[Tagged]:
        """The model's events for ``gens``; retried while the failure happened before the first token."""
        backoff = _Backoff()
        while True:
            started = False
            try:
                async for batch in self.model.options(stream=True).generate.remote(gens):
                    for i, event in batch:
                        if isinstance(event, Failed) and not started:
                            raise EngineFailedError(event.message)
                        started = True
                        yield i, event
                return
            except BackPressureError as exc:
                raise _at_capacity() from exc
            except Exception as exc:  # the replica died or its engine failed
                if started:
                    yield 0, Failed(f"the model replica failed mid-generation: {exc}")
                    return
                await backoff.wait_or_raise(exc)


def autoscaling_config(opts: ServeOptions) -> dict[str, Any]:
    return {
        "min_replicas": opts.min_replicas,
        "initial_replicas": opts.min_replicas,
        "max_replicas": opts.max_replicas,
        "target_ongoing_requests": opts.target_ongoing_requests,
        "upscale_delay_s": opts.upscale_delay_s,
        "downscale_delay_s": opts.downscale_delay_s,
        "look_back_period_s": 5.0,
    }


def build_app(args: dict[str, Any]) -> Any:
    """The Serve application for ``args`` (ServeOptions fields); checks the model before deploying anything."""
    opts = ServeOptions(**args)
    opts.validate()
    cfg = check_expert_split(opts.model_dir, opts.ep)  # the model directory is readable and --ep fits its experts
    max_seq_len = serving_context(cfg, opts.max_seq_len)
    if not opts.gpus_per_rank or opts.kv_cache_gib is not None:  # a GPU's default is sized on the GPU
        kv_cache_blocks(cfg, opts, resolve_dtype(opts), max_seq_len)  # room for one full-context sequence
    options = opts.as_dict()
    rank_bundle = {"CPU": 1, "GPU": opts.gpus_per_rank} if opts.gpus_per_rank else {"CPU": 1}
    model = serve.deployment(
        ModelServer,
        name="ModelServer",
        ray_actor_options={"num_cpus": 1, "num_gpus": opts.gpus_per_rank},
        placement_group_bundles=[rank_bundle] * opts.ep,
        placement_group_strategy="STRICT_PACK" if opts.gpus_per_rank else "PACK",
        autoscaling_config=autoscaling_config(opts),
        max_ongoing_requests=2 * opts.max_batch_size,
        max_queued_requests=opts.max_queued_requests,
        health_check_period_s=2,
        health_check_timeout_s=30,
        logging_config=QUIET_LOGS,
        graceful_shutdown_timeout_s=5,
    ).bind(options)
    # The ingress only validates and relays, so one replica holds every open request: its limit must be far
    # above the model's (Serve's default of 5 would cap the whole endpoint at 5 concurrent requests).
    ingress = serve.deployment(
        OpenAIIngress,
        name="OpenAIIngress",
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=4096,
        logging_config=QUIET_LOGS,
    )
    return ingress.bind(model, options)
