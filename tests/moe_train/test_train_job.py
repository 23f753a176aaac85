"""`upmoe train` end to end on Ray Train with CPU workers (gloo): EP=2 vs EP=1, checkpoints, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from upmoe.cli import main

pytestmark = pytest.mark.slow

COMMON = ["--data", "embedded", "--seq-len", "64", "--micro-batch", "2", "--lr", "3e-3", "--warmup", "2"]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "debug-moe"
    assert main(["init", str(out), "--preset", "debug-moe"]) == 0
    return out


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_ep2_on_ray_train_matches_ep1_and_exports(ray_local, moe_dir: Path, tmp_path: Path) -> None:
    """EP=2 with plain AdamW, one of its workers killed after the step-3 checkpoint, ends like EP=1."""
    from moe_train.config import load_train_config
    from moe_train.trainer import run_training

    ep2, ep1 = tmp_path / "ep2", tmp_path / "ep1"
    # The global-batch aux loss is invariant to how the batch is split over ranks; the per-micro-batch
    # Switch loss is not (f·P of two halves differs from f·P of the whole), so parity is checked with it.
    steps = ["--steps", "6", "--aux-loss", "global", "--eval-data", "embedded:eval", "--eval-every", "4"]
    options = {
        "model": str(moe_dir), "data": "embedded", "out": str(ep2), "workers": 2, "ep": 2, "steps": 6,
        "seq_len": 64, "micro_batch": 2, "lr": 3e-3, "warmup": 2, "aux_loss": "global",
        "eval_data": "embedded:eval", "eval_every": 4, "checkpoint_every": 3, "max_failures": 1,
    }  # fmt: skip
    # Rank 1 dies at 0-based step 3, just after the checkpoint of step 3: Ray Train restarts the group from it.
    marker = tmp_path / "failed.marker"
    run_training(load_train_config(None, options), inject_failure={"step": 3, "rank": 1, "marker": str(marker)})
    assert marker.exists()
    # One worker seeing both ranks' rows: micro-batch 4 = 2 workers x 2. No --checkpoint-every: the last step's
    # checkpoint is written all the same.
    ep1_common = [c if c != "2" or i != COMMON.index("--micro-batch") + 1 else "4" for i, c in enumerate(COMMON)]
    assert main(["train", "--model", str(moe_dir), "--out", str(ep1), "--workers", "1", *ep1_common, *steps]) == 0
    a, b = _metrics(ep2), _metrics(ep1)
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, 7))
    for x, y in zip(a, b, strict=True):
        assert x["lm_loss"] == pytest.approx(y["lm_loss"], abs=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
        assert x["aux_loss"] == pytest.approx(y["aux_loss"], abs=1e-5)
    assert a[-1]["lm_loss"] < a[0]["lm_loss"]
    # Held-out loss at step 4 (--eval-every) and at the end, the same with the eval set split over 2 EP ranks.
    assert [m["step"] for m in a if "eval_loss" in m] == [m["step"] for m in b if "eval_loss" in m] == [4, 6]
    for x, y in zip(a, b, strict=True):
        assert x.get("eval_loss", 0.0) == pytest.approx(y.get("eval_loss", 0.0), abs=1e-5)
    assert a[-1]["eval_loss"] < a[3]["eval_loss"]
    assert (ep2 / "loss.png").stat().st_size > 0
    assert {"load/cv_mean", "load/max_over_mean_mean", "load/dead_experts_total", "mfu", "aux_loss"} <= set(a[-1])
    assert list((ep2 / "wandb").glob("offline-run-*")), "rank 0 logs to W&B (offline without an API key)"

    transformers = pytest.importorskip("transformers")
    from moe_core.loading import load_model

    ids = torch.randint(0, 1024, (2, 32))
    for run in (ep2, ep1):
        exported = tmp_path / f"exported-{run.name}"
        assert main(["export", str(run), str(exported)]) == 0
        ours = load_model(exported).eval()
        hf = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
        with torch.no_grad():
            assert (ours(ids).logits - hf(ids).logits).abs().max().item() <= 1e-4


def test_sigterm_stops_after_a_checkpointed_step(moe_dir: Path, tmp_path: Path) -> None:
    """`upmoe jobs stop` sends SIGTERM to the driver: the run ends cleanly at a step it checkpointed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "upmoe.cli", "train", "--model", moe_dir, "--out", run, *COMMON, "--steps", "100000"]
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (run / "metrics.jsonl").exists() or len(_metrics(run)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out
    last = _metrics(run)[-1]["step"]
    assert 2 <= last < 100000
    assert f"stopped at step {last} of 100000, checkpointed" in out, out
    from moe_train.export import checkpoints

    assert max(checkpoints(run)) == last
    assert main(["export", str(run), str(tmp_path / "exported")]) == 0


def test_bad_input_is_refused_before_workers_start(moe_dir: Path, tmp_path: Path, capsys) -> None:
    base = ["train", "--model", str(moe_dir), "--data", "embedded", "--out", str(tmp_path / "run"), "--seq-len", "64"]
    assert main([*base, "--workers", "3", "--ep", "2"]) == 1
    assert "--ep 2 must divide --workers 3" in capsys.readouterr().err
    assert main([*base, "--workers", "3", "--ep", "3"]) == 1
    assert "routed expert count" in capsys.readouterr().err
    assert main([*base, "--seq-len", "100000"]) == 1
    assert "max_position_embeddings" in capsys.readouterr().err
    assert main(["train", "--model", str(tmp_path), "--data", "embedded", "--out", str(tmp_path / "r")]) == 1
    assert "config.json" in capsys.readouterr().err


# (sharding, steps, 0-based step at which rank 1 dies): the checkpoint every 2 steps is written just before.
# Ray Train's restart of the worker group, with FSDP2's sharded checkpoints. Plain AdamW's recovery is checked in
# test_ep2_on_ray_train_matches_ep1_and_exports, ZeRO-1's resume bit for bit in test_zero (without Ray: cheaper).
@pytest.mark.parametrize("sharding, steps_total, fail_step", [("fsdp", 4, 2)])
def test_killed_worker_recovers_to_the_same_weights(
    ray_local, moe_dir: Path, tmp_path: Path, sharding: str, steps_total: int, fail_step: int
) -> None:
    """FSDP2 (sharded DCP checkpoints), EP=2: a killed worker's group restarts and resumes bit for bit, and
    exports."""
    from moe_core.checkpoint_io import TensorReader
    from moe_train.config import load_train_config
    from moe_train.export import export_run
    from moe_train.trainer import run_training

    def options(out: Path) -> dict:
        return {
            "model": str(moe_dir),
            "data": "embedded",
            "out": str(out),
            "workers": 2,
            "ep": 2,
            "steps": steps_total,
            "seq_len": 64,
            "micro_batch": 2,
            "lr": 3e-3,
            "checkpoint_every": 2,
            "max_failures": 1,
            "sharding": sharding,
        }

    clean = tmp_path / "clean"
    # The uninterrupted run goes through the command line, flags spelled as a user would.
    assert main(["train", *[f"--{k.replace('_', '-')}={v}" for k, v in options(clean).items()]]) == 0
    assert main(["export", str(clean), str(clean / "exported")]) == 0
    killed = tmp_path / "killed"
    marker = tmp_path / "failed.marker"
    failure = {"step": fail_step, "rank": 1, "marker": str(marker)}
    run_training(load_train_config(None, options(killed)), inject_failure=failure)
    recovered = export_run(killed, killed / "exported")
    assert marker.exists()  # the worker really died at 0-based step fail_step, after the checkpoint before it
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, steps_total + 1))
    assert json.loads((killed / "train_config.json").read_text())["sharding"] == sharding
    with TensorReader(clean / "exported") as a, TensorReader(recovered) as b:
        assert a.keys() == b.keys()
        for key in a.keys():
            assert torch.equal(a.get(key), b.get(key)), key


def test_load_balancing_loss_reduces_imbalance(ray_local, moe_dir: Path, tmp_path: Path) -> None:
    """Same run length and data: the Switch loss keeps the expert load flatter than no balancing loss."""
    cvs = {}
    for aux in ("none", "switch"):
        run = tmp_path / aux
        args = ["train", "--model", str(moe_dir), "--data", "embedded", "--out", str(run), "--steps", "24"]
        args += ["--seq-len", "128", "--micro-batch", "8", "--lr", "3e-3", "--aux-loss", aux, "--aux-coef", "0.01"]
        assert main([*args, "--wandb-mode", "disabled"]) == 0
        metrics = _metrics(run)
        assert metrics[-1]["lm_loss"] < metrics[0]["lm_loss"] - 1.0  # the loss goes down on the embedded corpus
        cvs[aux] = sum(m["load/cv_mean"] for m in metrics[-5:]) / 5
    assert cvs["switch"] < 0.8 * cvs["none"], cvs


def test_long_context_preset_end_to_end_at_small_scale(ray_local, tmp_path: Path) -> None:
    """Qwen2's second stage at small scale: rope_theta 1e4 -> 1e6, longer context, from a YAML config."""
    base = tmp_path / "base"
    assert main(["init", str(base), "--preset", "debug-moe"]) == 0
    config = json.loads((base / "config.json").read_text())
    config.update(rope_theta=10000.0, max_position_embeddings=256)
    (base / "config.json").write_text(json.dumps(config))
    yaml_path = tmp_path / "train.yaml"
    yaml_path.write_text(f"model: {base}\ndata: embedded\nsteps: 2\nmicro-batch: 1\ncheckpoint_every: 2\n")
    run = tmp_path / "run"
    # The preset's 32768-token context is scaled down with --seq-len; flags override YAML and preset.
    args = ["train", "--config", str(yaml_path), "--preset", "long-context", "--seq-len", "1024", "--out", str(run)]
    assert main([*args, "--wandb-mode", "disabled"]) == 0
    assert main(["export", str(run), str(tmp_path / "exported")]) == 0
    exported = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert exported["rope_theta"] == 1e6 and exported["max_position_embeddings"] == 32768
    assert main(["eval", str(tmp_path / "exported"), "--seq-len", "1024", "--max-tokens", "4096"]) == 0
