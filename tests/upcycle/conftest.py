"""Fixtures for the upcycling tests: tiny dense sources (ours and transformers'), and one local Ray per module.

Sources are session-scoped and built without Ray. In-process ``upmoe upcycle`` runs share the module-scoped
``ray_local`` cluster (the job only calls ``ray.init()`` when Ray is not initialised), so a test module pays
for one Ray start, not one per run.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from upcycle_testlib import FFN, HIDDEN, LAYERS, VOCAB, copy_tokenizer, run_cli

# Per layer, (mean, std) of gate_proj, up_proj and down_proj in the `skewed` source: far from N(0, 0.02) and
# different per matrix and per layer, so re-drawn values can only match if drawn from the right matrix's stats.
SKEWED_STATS = {
    0: ((0.05, 0.10), (-0.02, 0.05), (0.01, 0.20)),
    1: ((-0.10, 0.03), (0.00, 0.15), (0.03, 0.07)),
}


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """One local 2-CPU Ray for the module ("local": never attach to some other cluster on this machine)."""
    import ray

    if ray.is_initialized():  # someone else's cluster: use it, leave it running
        yield
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("upcycle-sources")


@pytest.fixture(scope="session")
def debug_dense(models_dir: Path) -> Path:
    """``upmoe init --preset debug``: our dense Qwen2 (hidden 64, FFN 256, 2 layers), fp32, with a tokenizer."""
    out = models_dir / "debug"
    result = run_cli("init", out, "--preset", "debug", "--seed", "1")
    assert result.rc == 0, result.err
    return out


@pytest.fixture(scope="session")
def skewed_dense(models_dir: Path, debug_dense: Path) -> Path:
    """The debug model with each FFN matrix redrawn from its own N(mean, std) (see SKEWED_STATS)."""
    out = models_dir / "skewed"
    shutil.copytree(debug_dense, out)
    (shard,) = out.glob("model-*.safetensors")
    tensors = load_file(shard)
    g = torch.Generator().manual_seed(11)
    for layer, stats in SKEWED_STATS.items():
        for proj, (mean, std) in zip(("gate_proj", "up_proj", "down_proj"), stats, strict=True):
            key = f"model.layers.{layer}.mlp.{proj}.weight"
            tensors[key] = mean + std * torch.randn(tensors[key].shape, generator=g)
    save_file(tensors, shard, metadata={"format": "pt"})
    return out


def _hf_dense(out: Path, tokenizer_from: Path, kind: str, layers: int, seed: int) -> Path:
    """A dense model made and saved by transformers (the oracle's own files), plus our tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[kind]
    cfg = config_cls(
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=layers,
        num_attention_heads=2,  # the `debug` preset's attention: 2 query heads of 32, 1 KV head
        num_key_value_heads=1,
        vocab_size=VOCAB,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_cls(cfg).eval()
        with torch.no_grad():  # norm weights away from 1, so a dropped or misplaced norm shows
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1 + 0.2 * torch.randn_like(p))
    model.save_pretrained(out)
    copy_tokenizer(tokenizer_from, out)
    return out


@pytest.fixture(scope="session")
def llama_dense(models_dir: Path, debug_dense: Path) -> Path:
    """A ``LlamaForCausalLM`` (no QKV bias) of the debug shape, saved by transformers."""
    return _hf_dense(models_dir / "llama", debug_dense, "llama", LAYERS, seed=2)


@pytest.fixture(scope="session")
def qwen2_six_layers(models_dir: Path, debug_dense: Path) -> Path:
    """A 6-layer ``Qwen2ForCausalLM`` saved by transformers: 7 upcycling tasks, long enough to interrupt."""
    return _hf_dense(models_dir / "qwen2-6l", debug_dense, "qwen2", 6, seed=3)
