"""``upmoe bench serve``: the endpoint under N concurrent streaming clients vs transformers ``generate``.

Both sides get the same model, the same prompts and one CPU thread per model copy (a replica rank is one Ray
CPU). The endpoint is measured end to end through HTTP (Ray Serve proxy, ingress, replica): output tokens/s
over the wall time of the whole run, time to first token and time per output token (p50/p99). transformers
runs the same requests one after another (a server without batching) and, for reference, as one static batch
per wave of N prompts. Greedy decoding throughout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.timing import markdown_table, percentile


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="model directory (default: a fresh debug-moe from `upmoe init`)")
    p.add_argument("--clients", type=int, help="concurrent clients (default 16; with --soak 32)")
    p.add_argument("--requests", type=int, help="requests in total (default 192; with --soak, give N there)")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel ranks of the endpoint's replica")
    p.add_argument(
        "--soak",
        type=int,
        nargs="?",
        const=2000,
        metavar="N",
        help="instead: N requests (default 2000) mixing streamed, non-streamed, cancelled mid-stream and invalid "
        "ones; reports failed valid requests, p99 latency and the replica's RSS growth (bench/soak.py)",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON on the last line")


@dataclass
class RequestTiming:
    tokens: int
    ttft: float
    tpot: float | None


def prompts_for(n: int) -> list[str]:
    from moe_core.corpus import embedded_corpus

    docs = [d for d in embedded_corpus("train").splitlines() if len(d) > 80]
    return [docs[i % len(docs)][:200] for i in range(n)]


async def _one(client, model: str, prompt: str, max_tokens: int) -> RequestTiming:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    ttft = stamps[0] - start if stamps else time.perf_counter() - start
    tpot = (stamps[-1] - stamps[0]) / (tokens - 1) if len(stamps) > 1 and tokens > 1 else None
    return RequestTiming(tokens, ttft, tpot)


async def _drive(url: str, model: str, prompts: list[str], clients: int, max_tokens: int) -> list[RequestTiming]:
    import httpx

    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results: list[RequestTiming] = []

    async def client_loop(client) -> None:
        while not queue.empty():
            results.append(await _one(client, model, queue.get_nowait(), max_tokens))

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    return results


@contextmanager
def local_endpoint(model_dir: Path, ep: int, clients: int) -> Iterator[str]:
    """One ``ModelServer`` replica of ``model_dir`` (served as "bench") on a private local Ray; yields its URL."""
    import ray
    from ray import serve

    from serve.app import build_app
    from serve.gang import free_port

    port = free_port()
    ray.init(
        address="local", num_cpus=max(4, ep + 1), include_dashboard=False, log_to_driver=False, configure_logging=False
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = {
            "model_dir": str(model_dir),
            "model_name": "bench",
            "ep": ep,
            "max_seq_len": 512,
            "max_batch_size": clients,
            "min_replicas": 1,
            "max_replicas": 1,
        }
        serve.run(build_app(options), name="upmoe", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def measure_endpoint(model_dir: Path, args: argparse.Namespace, prompts: list[str]) -> dict:
    with local_endpoint(model_dir, args.ep, args.clients) as url:
        asyncio.run(_drive(url, "bench", prompts[: args.clients], args.clients, 8))  # warm-up
        start = time.perf_counter()
        timings = asyncio.run(_drive(url, "bench", prompts, args.clients, args.max_tokens))
        wall = time.perf_counter() - start
    ttfts = [t.ttft for t in timings]
    tpots = [t.tpot for t in timings if t.tpot is not None]
    tokens = sum(t.tokens for t in timings)
    return {
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p99": percentile(ttfts, 99),
        "tpot_p50": percentile(tpots, 50),
        "tpot_p99": percentile(tpots, 99),
    }


def measure_transformers(model_dir: Path, prompts: list[str], max_tokens: int, wave: int) -> dict:
    import torch
    import transformers

    from moe_core.tokenizer import Tokenizer

    torch.set_num_threads(1)  # one replica rank's worth of CPU
    tok = Tokenizer.from_dir(model_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    encoded = [tok.encode(p) for p in prompts]
    gen = dict(max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)

    hf.generate(torch.tensor([encoded[0]]), **{**gen, "max_new_tokens": 4})  # warm-up
    start = time.perf_counter()
    tokens = 0
    for ids in encoded:
        out = hf.generate(torch.tensor([ids]), **gen)
        tokens += out.shape[1] - len(ids)
    sequential = {"tokens": tokens, "seconds": time.perf_counter() - start}

    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(encoded), wave):
        group = encoded[i : i + wave]
        width = max(map(len, group))
        ids = torch.tensor([[0] * (width - len(g)) + g for g in group])  # left padding for generation
        mask = torch.tensor([[0] * (width - len(g)) + [1] * len(g) for g in group])
        out = hf.generate(ids, attention_mask=mask, **gen)
        tokens += (out.shape[1] - width) * len(group)
    batched = {"tokens": tokens, "seconds": time.perf_counter() - start}
    for r in (sequential, batched):
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
    return {"sequential": sequential, "static_batch": batched}


@contextmanager
def bench_model(model: Path | None) -> Iterator[Path]:
    """``model``, or a fresh debug-moe from ``upmoe init`` in a temporary directory."""
    from upmoe.cli import main

    if model is not None:
        yield model
        return
    work = Path(tempfile.mkdtemp(prefix="upmoe-bench-serve-"))
    try:
        main(["init", str(work / "debug-moe"), "--preset", "debug-moe"])
        yield work / "debug-moe"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    if args.soak is not None:
        from bench.soak import run_soak

        return run_soak(args)
    args.clients = args.clients or 16
    args.requests = args.requests or 192
    with bench_model(args.model) as model_dir:
        prompts = prompts_for(args.requests)
        endpoint = measure_endpoint(model_dir, args, prompts)
        hf = measure_transformers(model_dir, prompts, args.max_tokens, args.clients)
    ms = 1000.0
    rows = [
        [
            f"upmoe serve (EP={args.ep}, {args.clients} clients, HTTP)",
            endpoint["tokens_per_s"],
            1.0,
            endpoint["ttft_p50"] * ms,
            endpoint["ttft_p99"] * ms,
            endpoint["tpot_p50"] * ms,
            endpoint["tpot_p99"] * ms,
        ],
    ]
    for name, r in (
        ("transformers generate, one request at a time", hf["sequential"]),
        (f"transformers generate, static batches of {args.clients}", hf["static_batch"]),
    ):
        rows.append([name, r["tokens_per_s"], r["tokens_per_s"] / endpoint["tokens_per_s"], "", "", "", ""])
    print(f"{args.requests} requests x {args.max_tokens} output tokens, greedy, 1 CPU thread per model copy")
    print(
        markdown_table(
            ["system", "output tok/s", "tok/s ÷ upmoe", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms"],
            rows,
        )
    )
    speedup = endpoint["tokens_per_s"] / hf["sequential"]["tokens_per_s"]
    print(
        f"upmoe serve / transformers (one at a time): {speedup:.2f}x; "
        f"/ transformers (static batches): {endpoint['tokens_per_s'] / hf['static_batch']['tokens_per_s']:.2f}x"
    )
    if args.json:
        print(json.dumps({"endpoint": endpoint, "transformers": hf, "speedup_vs_sequential": speedup}))
    return 0
