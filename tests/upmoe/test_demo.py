"""``upmoe demo`` end to end at a tiny step count: every stage runs and the summary carries real numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.testlib import free_port

pytestmark = pytest.mark.slow


def test_demo_runs_every_stage_and_reports(tmp_path: Path):
    out = tmp_path / "demo"
    cmd = [
        sys.executable,
        "-m",
        "upmoe.cli",
        "demo",
        "--out",
        str(out),
        "--pretrain-steps",
        "30",
        "--train-steps",
        "10",
        "--micro-batch",
        "2",
        "--port",
        str(free_port()),
    ]
    env = {**os.environ, "RAY_ADDRESS": "", "WANDB_MODE": "offline"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for stage in range(1, 7):
        assert f"[{stage}/6]" in result.stdout
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["step0_upcycled_loss"] > 0 and summary["final_moe_loss"] > 0 and summary["final_dense_loss"] > 0
    assert summary["continued_tokens"] == 10 * 2 * 2 * 128
    assert summary["reply"]  # the served MoE answered through the OpenAI API
    assert (out / "loss_curves.png").stat().st_size > 0
    assert json.loads((out / "moe" / "config.json").read_text())["model_type"] == "qwen2_moe"
