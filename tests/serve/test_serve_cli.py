"""``upmoe serve``: the emitted Serve config deploys the same app, bad input fails before Ray starts, and a
running server prints its URL, answers, and shuts down cleanly on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from serve.launch import serve_config
from serve.options import load_serve_options
from tests.testlib import free_port

UPMOE = [sys.executable, "-m", "upmoe.cli"]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*UPMOE, *args], capture_output=True, text=True, timeout=timeout)


def test_emit_config_is_a_serve_config_for_build_app(moe_dir: Path):
    result = _run("serve", str(moe_dir), "--ep", "2", "--max-replicas", "3", "--port", "9000", "--emit-config")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert config["http_options"] == {"host": "127.0.0.1", "port": 9000}
    (app,) = config["applications"]
    assert app["import_path"] == "serve.app:build_app"
    assert app["args"]["ep"] == 2 and app["args"]["max_replicas"] == 3
    opts = load_serve_options(None, app["args"])  # the args are valid options as they stand
    assert serve_config(opts)["applications"][0]["args"] == app["args"]


def test_options_from_yaml_with_flags_winning(moe_dir: Path, tmp_path: Path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"model_dir": str(moe_dir), "ep": 2, "max-batch-size": 8}))
    result = _run("serve", "--config", str(cfg), "--ep", "4", "--emit-config")
    args = yaml.safe_load(result.stdout)["applications"][0]["args"]
    assert (args["ep"], args["max_batch_size"]) == (4, 8)


def test_bad_input_fails_fast_with_a_clear_message(moe_dir: Path, tmp_path: Path):
    cases = [
        ((str(tmp_path / "missing"),), "missing"),
        ((str(moe_dir), "--ep", "3"), "--ep 3 must divide the routed expert count 64"),
        ((str(moe_dir), "--min-replicas", "3", "--max-replicas", "2"), "--min-replicas"),
        ((str(moe_dir), "--max-seq-len", "100000"), "exceeds the model's context"),
        ((str(moe_dir), "--max-request-bytes", "0"), "--max-request-bytes must be positive"),
        ((str(moe_dir), "--bogus", "1"), "unrecognized arguments"),
        ((str(moe_dir), "--kv-cache-gib", "0.0001"), "one sequence of the serving context"),
        ((str(moe_dir), "--max-num-batched-tokens", "0"), "--max-num-batched-tokens must be at least 1"),
        ((str(moe_dir / "config.json"), "--plan", "--ep", "3"), "--ep 3 must divide"),
    ]
    for args, words in cases:
        result = _run("serve", *args, timeout=60)
        assert result.returncode != 0
        assert words in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_serve_prints_the_url_answers_and_stops_on_ctrl_c(moe_dir: Path):
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": ""}  # a private local Ray, whatever else runs on this machine
    proc = subprocess.Popen(
        [*UPMOE, "serve", str(moe_dir), "--port", str(port), "--max-seq-len", "128", "--model-name", "m"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 180
        lines = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "ready" in line and f":{port}" in line:
                break
            assert proc.poll() is None, "".join(lines)
        reply = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
        rest = proc.stdout.read()
        assert "shutting down" in rest
    finally:
        if proc.poll() is None:
            proc.kill()


def test_plan_sizes_a_rank_from_one_real_step_on_fake_cuda(moe_dir: Path):
    args = ["--ep", "4", "--gpu-memory-gib", "1", "--max-batch-size", "8", "--max-num-batched-tokens", "64"]
    result = _run("serve", "--plan", str(moe_dir / "config.json"), *args, "--plan-seq-len", "512", "--json")
    assert result.returncode == 0, result.stderr
    assert "512-token sequences" in result.stdout and "EP 4" in result.stdout
    plan = json.loads(result.stdout.strip().splitlines()[-1])
    budget = 0.9 * 2**30
    assert plan["activations_gib"] > 0 and plan["weights_gib"] > 0
    left = budget - (plan["weights_gib"] + plan["activations_gib"]) * 2**30
    assert plan["kv_blocks"] == int(left // plan["kv_block_bytes"])
    assert plan["sequences_that_fit"] == plan["kv_blocks"] // (512 // 16) and plan["fits"]
    tiny = _run("serve", "--plan", str(moe_dir / "config.json"), "--gpu-memory-gib", "0.001")
    assert tiny.returncode == 3 and "does NOT fit" in tiny.stdout
