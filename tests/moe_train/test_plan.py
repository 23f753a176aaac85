"""``upmoe train --plan``: the meta-device estimate against a real step's measured peak, and the command.

The measured side runs the same step on real CPU tensors in a fresh process and takes its peak RSS minus the
RSS before the step, both without mapped files (after a tiny warm-up step, so one-off library buffers are not
counted; the peak is reset just before the step). glibc's mmap
threshold is pinned: otherwise it grows after large frees and keeps freed tensors in the heap, so RSS would
stop following the live tensors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_core.registry import get_preset

ROOT = Path(__file__).resolve().parents[2]
# ~35 M parameters: the step's peak (~0.7-1.2 GB) dwarfs what the process holds besides the tensors.
SHAPE = dict(
    hidden_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    num_experts=16,
    num_experts_per_tok=4,
    moe_intermediate_size=256,
    shared_expert_intermediate_size=512,
    vocab_size=4096,
)

MEASURE = """
import dataclasses, json, sys, warnings
def status():  # kB
    rows = (line.split() for line in open("/proc/self/status"))
    return {r[0].rstrip(":"): int(r[1]) for r in rows if r[0] in ("VmHWM:", "VmRSS:", "RssFile:", "RssShmem:")}
def files(s):
    return s["RssFile"] + s["RssShmem"]
import torch
warnings.filterwarnings("ignore")
torch.set_num_threads(1)
from moe_train.config import TrainConfig
from moe_train.plan import plan_training, run_step_for_real
cfg = TrainConfig(**json.loads(sys.argv[2]))
if sys.argv[1] == "plan":
    print(plan_training(cfg).peak_gib_per_rank * 2**30)
else:
    run_step_for_real(dataclasses.replace(cfg, seq_len=8, micro_batch=1))  # library buffers, allocated once
    open("/proc/self/clear_refs", "w").write("5")  # the peak RSS (VmHWM) starts again from here
    before = status()
    run_step_for_real(cfg)
    after = status()
    # Mapped files (libtorch's code) are left out: under memory pressure the kernel drops their pages and the
    # step maps them again, which is not the step's memory. Their share at the peak is taken as at the end.
    print((after["VmHWM"] - files(after) - (before["VmRSS"] - files(before))) * 1024)
"""


def _model_config(tmp_path: Path, **overrides: object) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(get_preset("debug-moe", **overrides).to_hf_dict()))
    return tmp_path


def _measure(mode: str, cfg: dict) -> float:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, mode, json.dumps(cfg)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "options",
    [dict(grad_accum=2), dict(activation_checkpointing=True)],
    ids=["accumulating", "activation-checkpointing"],
)
def test_planned_peak_matches_the_measured_peak(tmp_path: Path, options: dict) -> None:
    cfg = dict(
        model=str(_model_config(tmp_path, **SHAPE)),
        data="embedded",
        out=str(tmp_path / "run"),
        seq_len=512,
        micro_batch=4,
        zero_stage=0,
        expert_backend="eager",  # on meta grouped_mm takes only bf16 (CUDA's rule); a CPU plan runs fp32
        **options,
    )
    planned, measured = _measure("plan", cfg), _measure("real", cfg)
    print(f"planned {planned / 1e9:.3f} GB, measured {measured / 1e9:.3f} GB")
    assert measured > 5e8  # the step, not noise
    assert abs(planned - measured) / measured < 0.15, (
        f"planned {planned / 2**30:.3f} GiB, measured {measured / 2**30:.3f}"
    )


def _plan_cli(*args: str | Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "upmoe.cli", "train", "--plan", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def test_plan_command_for_an_expert_parallel_gpu_layout(tmp_path: Path) -> None:
    config = _model_config(tmp_path) / "config.json"
    layout = ["--workers", "16", "--ep", "8", "--gpus-per-worker", "1", "--zero-stage", "0", "--seq-len", "256"]
    out = _plan_cli("--model-config", config, *layout, "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    plan = json.loads(out.stdout.strip().splitlines()[-1])
    assert plan["fits"] is True and plan["world"] == 16 and plan["ep"] == 8
    assert 0 < plan["params_gib"] < plan["peak_gib_per_rank"]
    assert plan["optimizer_gib"] == pytest.approx(2 * plan["params_gib"], rel=0.01)  # AdamW: two fp32 moments
    assert "rank 0 of 16 (EP 8" in out.stdout

    tiny = _plan_cli("--model-config", config, *layout, "--gpu-memory-gib", "0.001")
    assert tiny.returncode == 3 and "does NOT fit in 0.001 GiB" in tiny.stdout


def test_plan_refuses_what_it_cannot_run(tmp_path: Path) -> None:
    config = _model_config(tmp_path) / "config.json"
    out = _plan_cli("--model-config", config, "--gpus-per-worker", "1", "--zero-stage", "1")
    assert out.returncode != 0 and "DeepSpeed cannot" in out.stderr


def test_gpu_runs_are_refused_when_the_plan_does_not_fit(tmp_path: Path, capsys) -> None:
    from moe_train.config import TrainConfig
    from moe_train.trainer import check_memory_plan

    layout = dict(model=str(_model_config(tmp_path)), data="embedded", out="o", workers=4, ep=2, gpus_per_worker=1)
    check_memory_plan(TrainConfig(**layout, seq_len=128))
    assert "GiB per rank of 80 GiB (fits)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="does not fit 0.0001 GiB GPUs(.|\n)*add workers"):
        check_memory_plan(TrainConfig(**layout, seq_len=128, gpu_memory_gib=1e-4))
    check_memory_plan(TrainConfig(**layout, seq_len=128, gpu_memory_gib=1e-4, plan_check=False))  # asked not to
