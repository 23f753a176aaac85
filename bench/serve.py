"""``upmoe bench serve``: the endpoint under N concurrent streaming clients vs transformers ``generate`` or vLLM.

Both sides get the same model, the same prompts and one CPU thread per model copy (a replica rank is one Ray
CPU). The endpoint is measured end to end through HTTP (Ray Serve proxy, ingress, replica): output tokens/s
over the wall time of the whole run, time to first token and time per output token (p50/p99). transformers
runs the same requests one after another (a server without batching) and, for reference, as one static batch
per wave of N prompts. With ``--vs-vllm VENV``, ``vllm serve`` (bench/vllm_baseline.py) takes transformers'
place: the same streaming clients drive it with the same requests, and a few non-streamed completions from
both servers check that they decode the same text. Greedy decoding and ``ignore_eos`` throughout, so every
request yields exactly ``--max-tokens`` tokens on every side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.timing import markdown_table, percentile

MAX_SEQ_LEN = 512  # the context of every server here: prompts are ~60 tokens, outputs --max-tokens
AGREEMENT_PROMPTS = 8
DTYPES = ("float32", "bfloat16", "float16")


def client_counts(text: str) -> list[int]:
    """``16`` or ``16,64``: each count of concurrent clients is measured in turn against the same server."""
    counts = [int(c) for c in text.split(",")]
    if any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError(f"client counts must be at least 1, got {text}")
    return counts


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="model directory (default: a fresh debug-moe from `upmoe init`)")
    p.add_argument(
        "--clients",
        type=client_counts,
        help="concurrent clients, or a comma-separated list measured in turn (e.g. 16,64; default 16; with --soak 32)",
    )
    p.add_argument("--max-batch-size", type=int, help="the servers' concurrent sequences (default: the most --clients)")
    p.add_argument("--dtype", choices=DTYPES, help="serving dtype (default: the model's, from its config.json)")
    p.add_argument(
        "--vs-vllm",
        type=Path,
        metavar="VENV",
        help="compare with `vllm serve` from VENV (make it with bench/vllm_env.sh VENV) instead of transformers: "
        "same requests, context, sequences, dtype and threads, plus greedy agreement on a few prompts",
    )
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
        "ignore_eos": True,
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


async def _completion(client, prompt: str, max_tokens: int) -> str:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    response = await client.post("/v1/completions", json=body)
    response.raise_for_status()
    return response.json()["choices"][0]["text"]


def greedy_texts(url: str, prompts: list[str], max_tokens: int) -> list[str]:
    """Non-streamed greedy completions, one request at a time (no batching effects on the numbers)."""
    import httpx

    async def all_of_them() -> list[str]:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            return [await _completion(client, p, max_tokens) for p in prompts]

    return asyncio.run(all_of_them())


def agreement(a: list[str], b: list[str]) -> float:
    """The share of identical completions. Both servers detokenise with the same tokenizer.json, so identical
    greedy token sequences give identical text (and different text means different tokens)."""
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


@contextmanager
def local_endpoint(model_dir: Path, ep: int, max_batch_size: int, dtype: str = "auto") -> Iterator[str]:
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
            "max_seq_len": MAX_SEQ_LEN,
            "max_batch_size": max_batch_size,
            "dtype": dtype,
            "min_replicas": 1,
            "max_replicas": 1,
        }
        serve.run(build_app(options), name="upmoe", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def measure(url: str, prompts: list[str], clients: int, max_tokens: int) -> dict:
    """One timed run of all ``prompts`` from ``clients`` streaming clients, after a warm-up at that load.

    The warm-up is two waves of whole requests, so that every batch shape of the run (ramp-up, full batches,
    ramp-down) has been seen once: vLLM's first run at a load is slow, and after a warm-up of one short wave
    its first measured run was half as fast as its second (debug-moe, 667 vs 1,278 tok/s)."""
    asyncio.run(_drive(url, "bench", prompts[: 2 * clients], clients, max_tokens))
    start = time.perf_counter()
    timings = asyncio.run(_drive(url, "bench", prompts, clients, max_tokens))
    wall = time.perf_counter() - start
    ttfts = [t.ttft for t in timings]
    tpots = [t.tpot for t in timings if t.tpot is not None]
    tokens = sum(t.tokens for t in timings)
    if len(tpots) < len(timings):
        # Token ids past the tokenizer's vocabulary (a model with a larger vocab_size) decode to no text, so
        # TTFT and TPOT, timed by text chunks, mean nothing then; tokens/s, from the usage counts, still holds.
        print(f"warning: {len(timings) - len(tpots)} of {len(timings)} requests streamed under 2 text chunks")
    return {
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p99": percentile(ttfts, 99),
        "tpot_p50": percentile(tpots, 50),
        "tpot_p99": percentile(tpots, 99),
    }


def measure_all(url: str, prompts: list[str], args: argparse.Namespace) -> dict[int, dict]:
    return {clients: measure(url, prompts, clients, args.max_tokens) for clients in args.clients}


def model_dtype(model_dir: Path) -> str:
    config = json.loads((model_dir / "config.json").read_text())
    return config.get("dtype") or config.get("torch_dtype") or "float32"


def measure_transformers(model_dir: Path, prompts: list[str], max_tokens: int, wave: int, dtype: str) -> dict:
    import torch
    import transformers

    from moe_core.tokenizer import Tokenizer

    torch.set_num_threads(1)  # one replica rank's worth of CPU
    tok = Tokenizer.from_dir(model_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
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
    args.clients = args.clients or [16]
    args.requests = args.requests or 192
    if args.vs_vllm is None and len(args.clients) > 1:
        raise ValueError("a list of --clients needs --vs-vllm (the transformers baseline runs one wave size)")
    if args.vs_vllm is not None:
        from bench.vllm_baseline import venv_python

        venv_python(args.vs_vllm)  # a missing vLLM fails now, not after the upmoe run
    with bench_model(args.model) as model_dir:
        args.dtype = args.dtype or model_dtype(model_dir)
        args.max_batch_size = args.max_batch_size or max(args.clients)
        prompts = prompts_for(args.requests)
        with local_endpoint(model_dir, args.ep, args.max_batch_size, args.dtype) as url:
            upmoe = measure_all(url, prompts, args)
            texts = greedy_texts(url, prompts[:AGREEMENT_PROMPTS], args.max_tokens) if args.vs_vllm else []
        if args.vs_vllm is not None:
            return run_vs_vllm(args, model_dir, prompts, upmoe, texts)
        hf = measure_transformers(model_dir, prompts, args.max_tokens, args.clients[0], args.dtype)
    report_vs_transformers(args, upmoe[args.clients[0]], hf)
    return 0


def report_vs_transformers(args: argparse.Namespace, endpoint: dict, hf: dict) -> None:
    clients = args.clients[0]
    ms = 1000.0
    rows = [
        [
            f"upmoe serve (EP={args.ep}, {clients} clients, HTTP)",
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
        (f"transformers generate, static batches of {clients}", hf["static_batch"]),
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


def run_vs_vllm(args: argparse.Namespace, model_dir: Path, prompts: list[str], upmoe: dict, texts: list[str]) -> int:
    """vLLM on the same requests, after the upmoe endpoint has stopped (the two never share the cores)."""
    import httpx

    from bench.vllm_baseline import VllmSettings, vllm_endpoint
    from serve.gang import free_port

    settings = VllmSettings(
        model_dir=model_dir,
        port=free_port(),
        dtype=args.dtype,
        max_num_seqs=args.max_batch_size,
        max_model_len=MAX_SEQ_LEN,
        threads=args.ep,  # one thread per upmoe replica rank
    )
    log = Path(tempfile.gettempdir()) / f"upmoe-bench-vllm-{settings.port}.log"
    print(f"vllm serve: log in {log}")
    with vllm_endpoint(args.vs_vllm, settings, log) as url:
        version = httpx.get(f"{url}/version").json()["version"]
        vllm = measure_all(url, prompts, args)
        vllm_texts = greedy_texts(url, prompts[:AGREEMENT_PROMPTS], args.max_tokens)
    same = agreement(texts, vllm_texts)
    print(
        f"{args.requests} requests x {args.max_tokens} output tokens, greedy, ignore_eos, {args.dtype}, "
        f"{args.ep} CPU thread(s) per server, {args.max_batch_size} sequences, context {MAX_SEQ_LEN}"
    )
    print(
        markdown_table(
            [
                "system",
                "clients",
                "output tok/s",
                "tok/s ÷ vLLM",
                "TTFT p50 ms",
                "TTFT p50 ÷ vLLM",
                "TTFT p99 ms",
                "TPOT p50 ms",
                "TPOT p99 ms",
            ],
            comparison_rows(f"upmoe serve (EP={args.ep})", f"vLLM {version} (CPU)", upmoe, vllm),
        )
    )
    print(f"greedy agreement: {same:.0%} of {len(texts)} non-streamed completions identical")
    for i, (a, b) in enumerate(zip(texts, vllm_texts, strict=True)):
        if a != b:  # a late divergence is a near-tie between two tokens; an early one, a different model
            n = len(os.path.commonprefix([a, b]))
            print(f"  prompt {i}: the first {n} of {len(a)} characters agree, then {a[n:][:12]!r} vs {b[n:][:12]!r}")
    if args.json:
        print(json.dumps({"upmoe": upmoe, "vllm": vllm, "vllm_version": version, "greedy_agreement": same}))
    return 0


def comparison_rows(upmoe_name: str, vllm_name: str, upmoe: dict[int, dict], vllm: dict[int, dict]) -> list[list]:
    """Per client count, upmoe's row then vLLM's; the ratios are upmoe ÷ vLLM (tok/s < 1 and TTFT > 1: slower)."""
    ms = 1000.0
    rows = []
    for clients, v in vllm.items():
        u = upmoe[clients]
        for name, r in ((upmoe_name, u), (vllm_name, v)):
            rows.append(
                [
                    name,
                    clients,
                    r["tokens_per_s"],
                    r["tokens_per_s"] / v["tokens_per_s"],
                    r["ttft_p50"] * ms,
                    r["ttft_p50"] / v["ttft_p50"],
                    r["ttft_p99"] * ms,
                    r["tpot_p50"] * ms,
                    r["tpot_p99"] * ms,
                ]
            )
    return rows
