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
        "15",
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
    assert summary == json.loads((out / "summary.json").read_text())
    for key in ("dense_step0_loss", "moe_step0_loss", "dense_final_loss", "moe_final_loss"):
        assert isinstance(summary[key], float) and summary[key] > 0, key
    assert summary["tokens"] == 10 * 2 * 2 * 128
    cross = summary["crossover_tokens"]
    assert cross is None or (isinstance(cross, int) and 0 < cross <= summary["tokens"])
    # Curves from step 0 (the upcycled / base model) to the end, at the same token counts for both.
    assert [t for t, _ in summary["moe_curve"]] == [t for t, _ in summary["dense_curve"]]
    assert summary["moe_curve"][0] == [0, summary["moe_step0_loss"]]
    assert summary["moe_curve"][-1] == [summary["tokens"], summary["moe_final_loss"]]
    # The MoE is compared at more active compute per token, and says so.
    assert summary["moe_flops_per_token"] > summary["dense_flops_per_token"] > 0
    assert summary["moe_flops"] == summary["moe_flops_per_token"] * summary["tokens"]
    assert ("passes the dense baseline at" in result.stdout) == (cross is not None)
    assert summary["reply"]  # the served MoE answered through the OpenAI API
    assert (out / "loss_curves.png").stat().st_size > 0
    assert json.loads((out / "moe" / "config.json").read_text())["model_type"] == "qwen2_moe"
