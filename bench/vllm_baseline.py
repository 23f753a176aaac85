"""vLLM as the baseline of ``upmoe bench serve --vs-vllm VENV``: its command line, environment and process.

vLLM runs from a venv of its own (``bench/vllm_env.sh VENV`` makes one) through ``bench/vllm_wrapper.py``,
with settings matched to the upmoe endpoint it is compared with: the same served name, context, concurrent
sequences, dtype and number of CPU threads, and no prefix cache (upmoe has none, and the warm-up's prompts
come back in the measured run). It gets a process group of its own, so that stopping it also stops the
engine-core and worker processes it spawns.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

WRAPPER = Path(__file__).with_name("vllm_wrapper.py")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
STARTUP_TIMEOUT_S = 900.0  # a first start compiles the model with inductor: ~45 s for debug-moe on 2 busy cores
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class VllmSettings:
    model_dir: Path
    port: int
    dtype: str  # float32, bfloat16 or float16
    max_num_seqs: int
    max_model_len: int
    threads: int


def venv_python(venv: Path) -> Path:
    """VENV's python, once it is known to have vLLM: a clear error here beats a traceback from a child process."""
    python = venv / "bin" / "python"
    if not python.is_file():
        raise ValueError(
            f"--vs-vllm {venv}: not a Python venv (no bin/python); create it with bench/vllm_env.sh {venv}"
        )
    probe = [str(python), "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"]
    if subprocess.run(probe, capture_output=True).returncode != 0:
        raise ValueError(f"--vs-vllm {venv}: vllm is not installed there; install it with bench/vllm_env.sh {venv}")
    return python


def serve_command(python: Path, s: VllmSettings) -> list[str]:
    return [
        str(python),
        str(WRAPPER),
        "serve",
        str(s.model_dir),
        "--served-model-name",
        "bench",
        "--host",
        "127.0.0.1",
        "--port",
        str(s.port),
        "--dtype",
        s.dtype,
        "--max-num-seqs",
        str(s.max_num_seqs),
        "--max-model-len",
        str(s.max_model_len),
        "--no-enable-prefix-caching",
        "--disable-uvicorn-access-log",
        "--disable-log-stats",
    ]


def kv_cache_bytes(config: dict, s: VllmSettings) -> int:
    """Keys and values of every layer for max_num_seqs full contexts: what upmoe's KV cache holds too."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    per_token = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * DTYPE_BYTES[s.dtype]
    return per_token * s.max_num_seqs * s.max_model_len


def serve_env(config: dict, s: VllmSettings) -> dict[str, str]:
    """The process environment: KV cache space in whole GiB (vLLM's unit; its default is 4), and ``threads``
    unbound OpenMP threads (upmoe's ranks do not pin cores either; on a shared machine pinning to a busy core
    would only hurt vLLM)."""
    kv_gib = max(1, math.ceil(kv_cache_bytes(config, s) / 2**30))
    return {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": str(kv_gib),
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": str(s.threads),
    }


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM vLLM's process group, wait for every member to exit, SIGKILL whatever is left after the timeout."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader, or the group never empties
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode} before /health answered; log:\n{_tail(log)}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"vllm serve did not answer /health in {STARTUP_TIMEOUT_S:.0f} s; log:\n{_tail(log)}")


def _tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def vllm_endpoint(venv: Path, s: VllmSettings, log: Path) -> Iterator[str]:
    """``vllm serve`` with settings ``s`` (served as "bench"), its output in ``log``; yields its URL once healthy."""
    python = venv_python(venv)
    config = json.loads((s.model_dir / "config.json").read_text())
    with log.open("w") as out:
        proc = subprocess.Popen(
            serve_command(python, s),
            env=serve_env(config, s),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{s.port}"
        wait_healthy(url, proc, log)
        yield url
    finally:
        stop_group(proc)
