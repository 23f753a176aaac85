"""Batched greedy decoding with the KV cache equals transformers' generate(do_sample=False)."""

from __future__ import annotations

import pytest
import torch

from moe_core.generate import greedy_generate
from moe_core.loading import save_model
from moe_core.model import CausalLM
from moe_core.registry import get_preset


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["debug", "debug-moe"])
def test_greedy_matches_transformers_generate(preset, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = get_preset(preset)
    model = CausalLM(cfg)
    model.init_weights(torch.Generator().manual_seed(7))
    # Larger weights than the default init make the argmax decisive, so fp32 noise cannot flip a token.
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    save_model(model, tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()

    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=gen).tolist() for n in (5, 11, 8)]
    ours = greedy_generate(model.eval(), prompts, 32)
    for prompt, new in zip(prompts, ours, strict=True):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert new == ref[0, len(prompt) :].tolist()


def test_greedy_stops_at_stop_token():
    cfg = get_preset("debug")
    model = CausalLM(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    first = greedy_generate(model, [[5, 6, 7]], 4)[0]
    stopped = greedy_generate(model, [[5, 6, 7]], 4, stop_ids={first[0]})[0]
    assert stopped == first[:1]
