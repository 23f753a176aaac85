"""``upmoe bench serve --vs-vllm``: the parts that need no vLLM (CI has none): its command line and environment,
the refusal of a venv without vLLM, stopping its process group, and the comparison table."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.serve import agreement, client_counts, comparison_rows
from bench.vllm_baseline import WRAPPER, VllmSettings, kv_cache_bytes, serve_command, serve_env, stop_group, venv_python
from upmoe.cli import main

QWEN2_05B_MOE = {"hidden_size": 896, "num_attention_heads": 14, "num_key_value_heads": 2, "num_hidden_layers": 24}


def settings(**overrides) -> VllmSettings:
    values = dict(
        model_dir=Path("/models/m"), port=8123, dtype="bfloat16", max_num_seqs=64, max_model_len=512, threads=1
    )
    return VllmSettings(**{**values, **overrides})


def test_serve_command_matches_the_upmoe_endpoint() -> None:
    cmd = serve_command(Path("/venv/bin/python"), settings())
    assert cmd[:4] == ["/venv/bin/python", str(WRAPPER), "serve", "/models/m"]
    flags = dict(zip(cmd[4::2], cmd[5::2], strict=False))
    assert flags["--served-model-name"] == "bench"  # the name the bench's clients ask for
    assert flags["--host"] == "127.0.0.1" and flags["--port"] == "8123"
    assert flags["--dtype"] == "bfloat16"
    assert flags["--max-num-seqs"] == "64" and flags["--max-model-len"] == "512"
    assert "--no-enable-prefix-caching" in cmd  # upmoe has no prefix cache


def test_kv_cache_space_in_whole_gib_and_threads_unbound() -> None:
    # 2 (K, V) x 24 layers x 2 KV heads x 64 head_dim x 2 bytes = 12 KiB per token
    assert kv_cache_bytes(QWEN2_05B_MOE, settings()) == 12 * 1024 * 64 * 512
    env = serve_env(QWEN2_05B_MOE, settings())  # 384 MiB: rounds up to vLLM's unit
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert serve_env(QWEN2_05B_MOE, settings(max_model_len=4096, dtype="float32"))["VLLM_CPU_KVCACHE_SPACE"] == "6"
    assert env["OMP_NUM_THREADS"] == "1" and env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert serve_env(QWEN2_05B_MOE, settings(threads=2))["OMP_NUM_THREADS"] == "2"


def test_missing_venv_or_vllm_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bench/vllm_env.sh"):
        venv_python(tmp_path / "nowhere")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").symlink_to(sys.executable)  # this venv's python: no vllm in it
    with pytest.raises(ValueError, match="vllm is not installed"):
        venv_python(tmp_path)


def test_cli_refuses_a_venv_without_vllm_before_measuring(tmp_path: Path, capsys) -> None:
    assert main(["bench", "serve", "--vs-vllm", str(tmp_path)]) == 1
    assert "--vs-vllm" in capsys.readouterr().err


def test_stop_group_leaves_no_process(tmp_path: Path) -> None:
    # A leader with a child in its group, as vllm serve has its engine core and workers.
    proc = subprocess.Popen(["bash", "-c", "sleep 60 & sleep 60"], start_new_session=True)
    stop_group(proc)
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)


def test_comparison_rows_pair_each_client_count_with_ratios() -> None:
    def stats(tok_s: float, ttft: float) -> dict:
        return {"tokens_per_s": tok_s, "ttft_p50": ttft, "ttft_p99": 2 * ttft, "tpot_p50": 0.01, "tpot_p99": 0.02}

    upmoe = {16: stats(500.0, 0.2), 64: stats(800.0, 0.4)}
    vllm = {16: stats(1000.0, 0.05), 64: stats(2000.0, 0.1)}
    rows = comparison_rows("upmoe", "vLLM", upmoe, vllm)
    assert [r[:2] for r in rows] == [["upmoe", 16], ["vLLM", 16], ["upmoe", 64], ["vLLM", 64]]
    assert rows[0][2:7] == [500.0, 0.5, 200.0, 4.0, 400.0]
    assert rows[1][3] == rows[1][5] == 1.0
    assert rows[2][3] == 0.4 and rows[2][5] == 4.0


def test_client_counts_and_agreement() -> None:
    assert client_counts("16") == [16] and client_counts("16,64") == [16, 64]
    with pytest.raises(argparse.ArgumentTypeError):
        client_counts("16,0")
    assert agreement(["a", "b", "c", "d"], ["a", "b", "x", "d"]) == 0.75


def test_a_client_list_needs_vllm(capsys) -> None:
    assert main(["bench", "serve", "--clients", "16,64"]) == 1
    assert "--vs-vllm" in capsys.readouterr().err
