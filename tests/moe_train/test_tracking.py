"""moe_train.tracking: FLOPs/MFU arithmetic, load metrics, plots, and the W&B tracker read back from disk.

W&B runs offline only (no network): the offline ``.wandb`` transaction log is parsed here directly, since
wandb 0.31 no longer ships a Python reader (its Go core writes the file). The format is LevelDB's log
format (32 KiB blocks of checksummed FULL/FIRST/MIDDLE/LAST chunks) behind a 7-byte ``:W&B`` header,
each record a ``wandb_internal_pb2.Record`` protobuf.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

import pytest
import torch

from moe_core.moe import Routing
from moe_core.registry import get_preset
from moe_train.tracking import (
    DEFAULT_PEAK_FLOPS,
    Tracker,
    default_peak_flops,
    expert_load_metrics,
    flops_per_token,
    load_heatmap_png,
    mfu,
    offline_run_dirs,
    read_metrics,
    resolve_mode,
    routing_counts,
    sync_hint,
    write_loss_curve,
)


@pytest.fixture(autouse=True)
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep W&B off the network and out of $HOME: offline mode, every W&B directory under tmp_path."""
    env_dir = tmp_path / "wandb_env"
    env_dir.mkdir()
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("UPMOE_PEAK_FLOPS", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(env_dir))
    return env_dir


# ---------------------------------------------------------------------------------------------- FLOPs, MFU


def test_flops_per_token_qwen2_57b_a14b_by_hand() -> None:
    # activated 14,249,270,784 - embedding lookup 151,936 x 3,584 = 544,538,624 -> N = 13,704,732,160
    # 6N = 82,228,392,960; attention 6 x 28 layers x 4096 x (28 x 128 = 3584) = 2,466,250,752
    # total 84,694,643,712 ~ 8.47e10 FLOPs per token (~6 x 14.1B).
    flops = flops_per_token(get_preset("qwen2-57b-a14b"), 4096)
    assert flops == 84_694_643_712
    assert 8.4e10 < flops < 8.6e10


def test_flops_per_token_tied_embeddings_keep_the_lm_head() -> None:
    cfg = get_preset("qwen2-0.5b")  # tied: the one matrix is the lm_head matmul, nothing is subtracted
    from moe_core.params import count_parameters

    d_attn = cfg.num_attention_heads * cfg.attn_head_dim
    assert flops_per_token(cfg, 1) == 6 * count_parameters(cfg).activated + 6 * cfg.num_hidden_layers * d_attn


def test_mfu_arithmetic() -> None:
    cfg = get_preset("qwen2-57b-a14b")
    per_token = flops_per_token(cfg, 4096)
    tokens_per_s = 0.4 * 989e12 / per_token  # exactly 40% of one H100
    assert mfu(tokens_per_s, cfg, 4096, 989e12) == pytest.approx(0.4)
    assert mfu(8 * tokens_per_s, cfg, 4096, 989e12, num_devices=8) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        mfu(1.0, cfg, 4096, 0.0)


def test_default_peak_flops(monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_peak_flops("cpu", torch.float32) == DEFAULT_PEAK_FLOPS["cpu"] == 1e11
    assert DEFAULT_PEAK_FLOPS["cuda-h100-bf16"] == 989e12
    with pytest.warns(UserWarning, match="no peak FLOP/s"):
        assert math.isnan(default_peak_flops("mps", torch.float32))
    monkeypatch.setenv("UPMOE_PEAK_FLOPS", "2.5e11")
    assert default_peak_flops("cpu", torch.float32) == 2.5e11


# ---------------------------------------------------------------------------------------------- expert load


def test_expert_load_metrics_balanced() -> None:
    metrics = expert_load_metrics(torch.full((3, 8), 16))
    for i in range(3):
        assert metrics[f"load/layer{i}/cv"] == 0.0
        assert metrics[f"load/layer{i}/max_over_mean"] == 1.0
        assert metrics[f"load/layer{i}/dead_experts"] == 0.0
    assert metrics["load/cv_mean"] == 0.0
    assert metrics["load/max_over_mean_mean"] == 1.0
    assert metrics["load/dead_experts_total"] == 0.0


def test_expert_load_metrics_dead_expert() -> None:
    counts = torch.tensor([[4, 4, 4, 4], [8, 4, 4, 0]])  # layer 1: mean 4, max 8, one expert never chosen
    metrics = expert_load_metrics(counts)
    assert metrics["load/layer0/cv"] == 0.0
    assert metrics["load/layer1/max_over_mean"] == 2.0
    assert metrics["load/layer1/cv"] == pytest.approx(math.sqrt(8) / 4)  # std of (4, 0, 0, -4) = sqrt(8)
    assert metrics["load/layer1/dead_experts"] == 1.0
    assert metrics["load/dead_experts_total"] == 1.0
    assert metrics["load/max_over_mean_mean"] == 1.5
    assert metrics["load/cv_mean"] == pytest.approx(math.sqrt(8) / 8)


def test_routing_counts_bincounts_each_layer() -> None:
    def routing(experts: list[list[int]]) -> Routing:
        experts_TK = torch.tensor(experts)
        return Routing(
            logits_TE=torch.zeros(len(experts), 4),
            probs_TE=torch.full((len(experts), 4), 0.25),
            weights_TK=torch.ones(experts_TK.shape),
            experts_TK=experts_TK,
        )

    counts = routing_counts([routing([[0, 1], [0, 2]]), routing([[3, 3], [3, 1]])], num_experts=4)
    assert counts.tolist() == [[2, 1, 1, 0], [0, 1, 0, 3]]
    assert routing_counts([], num_experts=4).shape == (0, 4)


def test_load_heatmap_png_is_written_and_deterministic(tmp_path: Path) -> None:
    counts = torch.tensor([[10, 0, 30, 40], [20, 20, 20, 20], [0, 0, 0, 0]])  # an all-zero layer too
    first = load_heatmap_png(counts, tmp_path / "a" / "load.png")
    second = load_heatmap_png(counts, tmp_path / "b.png")
    assert first.exists() and first.stat().st_size > 1000
    assert first.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert first.read_bytes() == second.read_bytes()


def test_loss_curve_skips_torn_lines_and_keeps_last_row_per_step(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "lm_loss": 3.0}, {"step": 2, "lm_loss": 2.9}, {"step": 2, "lm_loss": 2.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "lm_lo')
    assert [r["lm_loss"] for r in read_metrics(path)] == [3.0, 2.5]
    assert write_loss_curve(path, tmp_path / "loss.png") == tmp_path / "loss.png"
    assert write_loss_curve(tmp_path / "missing.jsonl", tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


# ---------------------------------------------------------------------------------------------- tracker


def read_wandb_records(path: Path) -> list:
    """Every Record in a .wandb file, checking the header and each chunk's checksum."""
    from wandb.proto import wandb_internal_pb2

    block, data = 32768, path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0)
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room for a chunk header: zero trailer up to the next block
            pos += block - pos % block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:  # zero padding
            continue
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) == checksum
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def history_rows(run_dir: Path) -> list[dict]:
    """The history rows of every offline run under run_dir, with values decoded from JSON."""
    rows = []
    for run in offline_run_dirs(run_dir):
        for wandb_file in run.glob("*.wandb"):
            for record in read_wandb_records(wandb_file):
                if record.WhichOneof("record_type") == "history":
                    rows.append(_nest(record.history.item))
    return rows


def _nest(items: list) -> dict:
    """History items as a dict: wandb-core writes ``nested_key`` paths, e.g. (image key, "_type")."""
    row: dict = {}
    for item in items:
        *parents, leaf = list(item.nested_key) or [item.key]
        node = row
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = json.loads(item.value_json)
    return row


def test_tracker_offline_end_to_end(tmp_path: Path, wandb_offline: Path) -> None:
    run_dir = tmp_path / "run"
    losses = [3.0, 2.5, 2.25, 2.125, 2.0625]
    tracker = Tracker(run_dir, rank=0, config={"lr": 1e-3, "seq_len": 64}, mode=None)
    assert tracker.mode == "offline" and tracker.wandb_enabled
    for step, loss in enumerate(losses, start=1):
        tracker.log({"lm_loss": loss, "loss": loss + 0.01, "tokens_per_s": torch.tensor(100.0 * step)}, step=step)
    png = load_heatmap_png(torch.tensor([[1, 2, 3, 4], [4, 3, 2, 1]]), run_dir / "load.png")
    tracker.log_image("load/heatmap", png, step=5)
    tracker.finish()
    tracker.finish()  # idempotent

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": s, "lm_loss": v, "loss": v + 0.01, "tokens_per_s": 100.0 * s} for s, v in enumerate(losses, 1)
    ]
    assert (run_dir / "loss.png").stat().st_size > 1000

    # The offline run lands in run_dir/wandb (not $WANDB_DIR) under the stored id, and holds what was logged.
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert run_id == tracker.run_id
    (offline,) = offline_run_dirs(run_dir)
    assert offline.name.endswith(run_id) and (offline / f"run-{run_id}.wandb").exists()
    assert not list(wandb_offline.rglob("offline-run-*"))  # $WANDB_DIR only gets wandb-core's service logs
    rows = history_rows(run_dir)
    scalar_rows = [r for r in rows if "lm_loss" in r]
    assert [r["lm_loss"] for r in scalar_rows] == losses
    assert [r["step"] for r in scalar_rows] == [1, 2, 3, 4, 5]
    assert [r["tokens_per_s"] for r in scalar_rows] == [100.0, 200.0, 300.0, 400.0, 500.0]
    (image_row,) = [r for r in rows if "load/heatmap" in r]
    assert image_row["step"] == 5 and image_row["load/heatmap"]["_type"] == "image-file"
    assert list(offline.glob("files/media/images/load/heatmap_*.png"))
    assert sync_hint(run_dir) == f"wandb sync {offline}"

    # A restart resumes the same W&B run id and forgets the steps after its checkpoint.
    again = Tracker(run_dir, rank=0, config={"lr": 2e-3}, resume_step=3)
    assert again.run_id == run_id
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3]
    again.log({"lm_loss": 1.5}, step=4)
    again.finish()
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    first, second = offline_run_dirs(run_dir)
    assert run_id in first.name and run_id in second.name
    assert sync_hint(run_dir) == f"wandb sync {first} && wandb sync --append {second}"
    assert [r["lm_loss"] for r in history_rows(run_dir) if "lm_loss" in r][-1] == 1.5


def test_other_ranks_write_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    tracker = Tracker(run_dir, rank=1, config={"a": 1}, mode="offline", resume_step=0)
    tracker.log({"lm_loss": 1.0}, step=1)
    tracker.log_image("img", tmp_path / "nothing.png", step=1)
    tracker.finish()
    assert not tracker.active and not tracker.wandb_enabled and tracker.run_id is None
    assert not run_dir.exists()


def test_disabled_writes_metrics_but_no_wandb(tmp_path: Path, wandb_offline: Path) -> None:
    run_dir = tmp_path / "run"
    tracker = Tracker(run_dir, rank=0, config={}, mode="disabled")
    for step in (1, 2):
        tracker.log({"lm_loss": 1.0 / step}, step=step)
    tracker.log_image("img", tmp_path / "nothing.png", step=2)
    tracker.finish()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert (run_dir / "loss.png").exists()
    assert not (run_dir / "wandb").exists() and not (run_dir / "wandb_run_id").exists()
    assert list(wandb_offline.iterdir()) == []


def test_wandb_failure_warns_once_and_keeps_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    def broken_init(*args: object, **kwargs: object) -> None:
        raise wandb.errors.CommError("no network")

    monkeypatch.setattr(wandb, "init", broken_init)
    with pytest.warns(RuntimeWarning, match="W&B init failed") as caught:
        tracker = Tracker(tmp_path / "run", rank=0, config={}, mode="online")
        tracker.log({"lm_loss": 2.0}, step=1)
        tracker.log_image("img", tmp_path / "nothing.png", step=1)
        tracker.finish()
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert not tracker.wandb_enabled
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == [{"step": 1, "lm_loss": 2.0}]


def test_resolve_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_mode("disabled") == "disabled"
    assert resolve_mode("dryrun") == "offline"
    with pytest.raises(ValueError, match="mode"):
        resolve_mode("shared")
    monkeypatch.delenv("WANDB_MODE")
    assert resolve_mode(None) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode(None) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode(None) == "disabled"


def test_offline_run_dirs_sort_by_time_then_restart_suffix(tmp_path: Path) -> None:
    names = ["offline-run-20260102_000000-abc", "offline-run-20260101_000000-abc-10", "offline-run-20260101_000000-abc"]
    names.append("offline-run-20260101_000000-abc-2")
    for name in names:
        (tmp_path / "wandb" / name).mkdir(parents=True)
    assert [d.name[-8:] for d in offline_run_dirs(tmp_path)] == ["0000-abc", "00-abc-2", "0-abc-10", "0000-abc"]
    assert [d.name[12:20] for d in offline_run_dirs(tmp_path)] == ["20260101"] * 3 + ["20260102"]
    assert sync_hint(tmp_path / "nothing") is None
