"""``upmoe bench serve --soak N``: the endpoint under sustained mixed load, for failures and leaks.

N requests from concurrent clients (32 by default), drawn with a fixed seed: streamed, non-streamed, streams the
client abandons after the first text chunk (a disconnect the replica must clean up after), and invalid
requests (which must get an OpenAI error object, not a completion and not a 5xx). Reported: valid requests
that failed (goal 0), latency percentiles of the completed ones, and the replica's resident memory after a
warm-up and at the end (goal: at most 5 % growth), read from its processes on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import psutil

from bench.timing import markdown_table, percentile

KINDS = {"stream": 0.4, "plain": 0.3, "cancel": 0.15, "invalid": 0.15}  # the mix, by share of requests
RSS_GROWTH_GOAL = 0.05
WARMUP_REQUESTS = 128  # enough for every kind, every batch size up to the clients and the allocator's arenas
# Processes holding the model: the replica actor and, with EP > 1, its gang's rank workers (Ray names each
# actor process "ray::CLASS..." in its command line).
REPLICA_PROCESSES = ("ServeReplica:upmoe:ModelServer", "ray::RankWorker")
ERROR_FIELDS = {"message", "type", "param", "code"}


def invalid_bodies(model: str) -> list[Any]:
    """Requests the endpoint must refuse, each for a different reason (bytes are sent as they are)."""
    return [
        b'{"model": "' + model.encode() + b'", "prompt": ',  # truncated JSON
        {"model": model, "prompt": "hi", "max_tokens": "ten"},
        {"model": model, "prompt": "hi", "stream": "yes"},
        {"model": model, "prompt": "hi", "top_k": 5},
        {"model": model, "prompt": "hi", "max_tokens": 10**6},
        {"model": "no-such-model", "prompt": "hi"},
        b'{"model": "' + model.encode() + b'", "prompt": "\\ud800"}',  # a lone surrogate
    ]


@dataclass
class Outcome:
    kind: str
    ok: bool
    seconds: float
    detail: str = ""


def _body(model: str, prompt: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}


async def _streamed(client: Any, body: dict[str, Any], abandon: bool) -> tuple[bool, str]:
    """Read an SSE completion to [DONE]; with ``abandon``, hang up after the first text chunk."""
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return False, f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return not abandon, "" if not abandon else "the stream ended before the first text"
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return False, f"error event: {chunk['error']['message']}"
            if abandon and chunk["choices"] and chunk["choices"][0]["text"]:
                return True, ""  # leaving the block closes the connection mid-stream
    return False, "the stream ended without [DONE]"


async def _plain(client: Any, body: dict[str, Any]) -> tuple[bool, str]:
    response = await client.post("/v1/completions", json=body)
    if response.status_code != 200:
        return False, f"HTTP {response.status_code}: {response.text[:200]}"
    return bool(response.json()["choices"]), ""


async def _invalid(client: Any, body: Any) -> tuple[bool, str]:
    if isinstance(body, bytes):
        response = await client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    else:
        response = await client.post("/v1/completions", json=body)
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False, f"HTTP {response.status_code}, not an OpenAI error object: {response.text[:200]}"
    ok = 400 <= response.status_code < 500 and set(error) == ERROR_FIELDS
    return ok, "" if ok else f"HTTP {response.status_code}: {error}"


async def _one(client: Any, kind: str, request: Any, model: str, max_tokens: int) -> Outcome:
    start = time.perf_counter()
    try:
        if kind == "invalid":
            ok, detail = await _invalid(client, request)
        elif kind == "plain":
            ok, detail = await _plain(client, _body(model, request, max_tokens, stream=False))
        else:
            ok, detail = await _streamed(client, _body(model, request, max_tokens, stream=True), kind == "cancel")
    except Exception as exc:  # a dropped connection or a timeout is a failed request, not a crashed benchmark
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    return Outcome(kind, ok, time.perf_counter() - start, detail)


def plan(n: int, prompts: list[str], model: str, seed: int = 0) -> list[tuple[str, Any]]:
    """N (kind, prompt or invalid body) pairs, the same for the same seed."""
    rng = random.Random(seed)
    bad = invalid_bodies(model)
    kinds = rng.choices(list(KINDS), weights=list(KINDS.values()), k=n)
    return [(k, rng.choice(bad) if k == "invalid" else prompts[i % len(prompts)]) for i, k in enumerate(kinds)]


async def drive(
    url: str, model: str, work: list[tuple[str, Any]], clients: int, max_tokens: int, headers: dict[str, str]
) -> list[Outcome]:
    import httpx

    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    for item in work:
        queue.put_nowait(item)
    outcomes: list[Outcome] = []

    async def client_loop(client: Any) -> None:
        while not queue.empty():
            kind, request = queue.get_nowait()
            outcomes.append(await _one(client, kind, request, model, max_tokens))

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits, headers=headers) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    return outcomes


def replica_rss() -> int:
    """Bytes resident in the processes that hold the model (this machine's Ray only)."""
    total = 0
    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        if proc.info["memory_info"] is not None and any(name in cmdline for name in REPLICA_PROCESSES):
            total += proc.info["memory_info"].rss
    return total


def soak(
    url: str,
    model: str,
    n: int,
    clients: int,
    max_tokens: int,
    prompts: list[str],
    *,
    warmup: int = WARMUP_REQUESTS,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Warm up, then N mixed requests; the numbers ``report`` prints. ``headers`` go with every request."""
    headers = headers or {}
    asyncio.run(drive(url, model, plan(warmup, prompts, model, seed=1), clients, max_tokens, headers))
    rss_start = replica_rss()
    start = time.perf_counter()
    outcomes = asyncio.run(drive(url, model, plan(n, prompts, model), clients, max_tokens, headers))
    wall = time.perf_counter() - start
    rss_end = replica_rss()
    after = asyncio.run(drive(url, model, [("plain", prompts[0])], 1, 4, headers))  # still answering afterwards
    valid = [o for o in outcomes if o.kind != "invalid"]
    latencies = [o.seconds for o in valid if o.ok and o.kind != "cancel"]  # whole completions only
    failures = [o for o in outcomes if not o.ok]
    return {
        "requests": len(outcomes),
        "by_kind": dict(Counter(o.kind for o in outcomes)),
        "seconds": wall,
        "failed_valid": sum(1 for o in valid if not o.ok),
        "misanswered_invalid": sum(1 for o in outcomes if o.kind == "invalid" and not o.ok),
        "failures": [f"{o.kind}: {o.detail}" for o in failures[:5]],
        "latency_p50_s": percentile(latencies, 50),
        "latency_p99_s": percentile(latencies, 99),
        "rss_start_bytes": rss_start,
        "rss_end_bytes": rss_end,
        "rss_growth": (rss_end - rss_start) / rss_start if rss_start else float("nan"),
        "healthy_after": after[0].ok,
    }


def report(r: dict[str, Any], clients: int, max_tokens: int) -> None:
    mix = ", ".join(f"{r['by_kind'].get(k, 0)} {k}" for k in KINDS)
    print(f"{r['requests']} requests ({mix}) from {clients} clients, up to {max_tokens} output tokens, greedy")
    mib = 1 << 20
    rows = [
        [
            r["seconds"],
            r["failed_valid"],
            r["misanswered_invalid"],
            r["latency_p50_s"] * 1000,
            r["latency_p99_s"] * 1000,
            r["rss_start_bytes"] / mib,
            r["rss_end_bytes"] / mib,
            100 * r["rss_growth"],
        ]
    ]
    headers = ["wall s", "failed valid", "misanswered invalid", "p50 ms", "p99 ms", "RSS start MiB", "RSS end MiB"]
    print(markdown_table([*headers, "RSS growth %"], rows))
    for line in r["failures"]:
        print(f"  failed: {line}")
    met = goals_met(r) and r["rss_growth"] <= RSS_GROWTH_GOAL
    print(f"goals (0 failed, every invalid refused, RSS growth <= 5 %, healthy after): {'met' if met else 'MISSED'}")


def run_soak(args: argparse.Namespace) -> int:
    from bench.serve import bench_model, local_endpoint, prompts_for

    if args.requests is not None:
        raise SystemExit("--soak N sets the number of requests; drop --requests")
    if args.vs_vllm is not None or (args.clients and len(args.clients) > 1):
        raise SystemExit("--soak takes one --clients count and no --vs-vllm")
    clients = args.clients[0] if args.clients else 32
    batch = args.max_batch_size or clients
    with bench_model(args.model) as model_dir, local_endpoint(model_dir, args.ep, batch, args.dtype or "auto") as url:
        result = soak(url, "bench", args.soak, clients, args.max_tokens, prompts_for(256))
    report(result, clients, args.max_tokens)
    if args.json:
        print(json.dumps(result))
    return 0 if goals_met(result) else 1


def goals_met(r: dict[str, Any]) -> bool:
    """No failed valid request, every invalid one refused properly, and the endpoint still answering (RSS
    growth is reported against its goal, not failed on: a first run on a new machine may still be warming)."""
    return r["failed_valid"] == 0 and r["misanswered_invalid"] == 0 and r["healthy_after"]
