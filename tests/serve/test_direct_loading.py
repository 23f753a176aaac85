"""A serving rank loads only its tensors, straight into the serving dtype: peak memory while loading is at most
1.1 × the rank's weight bytes (here on the host; a GPU rank's device holds nothing but its parameters, and the
host converts one chunk at a time). Measured in a fresh process as the peak of anonymous memory, sampled: the
checkpoint's pages are mapped files, reclaimable, and not the loader's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_core.loading import save_model
from moe_core.model import CausalLM
from moe_core.registry import get_preset

ROOT = Path(__file__).resolve().parents[2]
# fp32 on disk, so a load that read whole tensors, or the whole model in fp32, before casting would show:
# the embedding alone (32768 × 512 fp32, 64 MiB) is a third of the rank's bf16 weights.
SHAPE = dict(
    hidden_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    num_experts=16,
    num_experts_per_tok=4,
    moe_intermediate_size=512,
    shared_expert_intermediate_size=1024,
    vocab_size=32768,
)

MEASURE = """
import json, sys
from tests.memory_sampling import AnonPeak
import torch
torch.set_num_threads(1)
from moe_core.config import read_model_config
from moe_core.fake_devices import meta_model
from moe_core.loading import materialise_and_fill
from moe_core.state_dict_adapter import expert_block
model_dir, ep, rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg = read_model_config(model_dir)
first, count = expert_block(cfg.num_experts, ep, rank)
model = meta_model(cfg, torch.bfloat16, first, count)  # what load_model builds: no memory on meta
with AnonPeak(interval_s=0.0005) as peak:
    materialise_and_fill(model, model_dir, "cpu")
weights = sum(p.numel() * p.element_size() for p in model.parameters())
dtypes = sorted({str(p.dtype) for p in model.parameters()})
print(json.dumps({"weights": weights, "peak": peak.bytes, "rope": str(model.rope_inv_freq.dtype), "dtypes": dtypes}))
"""


@pytest.fixture(scope="module")
def fp32_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = CausalLM(get_preset("debug-moe", **SHAPE))
    model.init_weights(torch.Generator().manual_seed(0))
    return save_model(model, tmp_path_factory.mktemp("direct-load") / "m", dtype=torch.float32)


def test_a_rank_loads_in_bf16_within_1_1_times_its_weight_bytes(fp32_checkpoint: Path) -> None:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed buffers go back to the kernel at once
    cmd = [sys.executable, "-c", MEASURE, str(fp32_checkpoint), "4", "1"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"rank weights {got['weights'] / 2**20:.1f} MiB, loading peak {got['peak'] / 2**20:.1f} MiB")
    assert got["dtypes"] == ["torch.bfloat16"] and got["rope"] == "torch.float32"
    assert got["weights"] > 100 * 2**20  # the measurement is well above noise
    assert got["peak"] <= 1.1 * got["weights"], f"peak {got['peak'] / got['weights']:.3f} × the weights"
