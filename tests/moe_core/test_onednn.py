"""Weights prepacked for oneDNN (CPU inference): the same logits as the plain model, no weight held twice."""

from __future__ import annotations

import pytest
import torch

from moe_core import onednn
from moe_core.experts import Experts
from moe_core.generate import run_step
from moe_core.kv_cache import PagedKVCache, StepRow
from moe_core.model import CausalLM
from moe_core.registry import get_preset

pytestmark = [
    pytest.mark.usefixtures("torch_single_thread"),
    pytest.mark.skipif(not onednn.available("cpu", torch.float32), reason="this torch build has no oneDNN"),
]


def _pair(dtype: torch.dtype, **overrides) -> tuple[CausalLM, CausalLM]:
    plain = CausalLM(get_preset("debug-moe", **overrides))
    plain.init_weights(torch.Generator().manual_seed(0))
    plain = plain.to(dtype).eval()
    packed = CausalLM(get_preset("debug-moe", **overrides)).to(dtype).eval()
    packed.load_state_dict(plain.state_dict())
    packed.tie_weights()
    assert onednn.pack_for_cpu_inference(packed) > 0
    return plain, packed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_model_gives_the_plain_models_logits(dtype: torch.dtype) -> None:
    plain, packed = _pair(dtype)
    ids = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want, got = plain(ids).logits.float(), packed(ids).logits.float()
        # And over the paged KV cache, as the serving engine runs it: a prefill row and a decode row.
        rows = [StepRow(ids[0].tolist(), 0, [0, 1]), StepRow(ids[1, :1].tolist(), 0, [2])]
        steps = [run_step(m, PagedKVCache(m.config, 3, dtype=dtype), rows).logits.float() for m in (plain, packed)]
    # Same math, other kernels: fp32 sums in another order (relative 1e-6 per matmul); bf16 rounds the same
    # products, but one flipped rounding in a layer can move a logit by a bf16 step of the residual stream.
    tol = 1e-4 if dtype == torch.float32 else 0.1
    assert (want - got).abs().max().item() <= tol * want.abs().max().item()
    assert (steps[0] - steps[1]).abs().max().item() <= tol * steps[0].abs().max().item()


def test_packing_drops_the_plain_weights_and_keeps_tied_ones() -> None:
    plain, packed = _pair(torch.float32, tie_word_embeddings=True)
    experts = [m for m in packed.modules() if isinstance(m, Experts)]
    assert experts and all(e.gate_up_proj is None and e.down_proj is None for e in experts)
    assert "packed" in repr(experts[0])
    # Only embeddings, norms, routers, biases (and a tied LM head, which is the embedding) stay plain.
    left = sum(p.numel() for p in packed.parameters())
    assert left < 0.25 * sum(p.numel() for p in plain.parameters())
    assert isinstance(packed.lm_head, torch.nn.Linear)
    assert packed.lm_head.weight is packed.model.embed_tokens.weight


def test_available_only_for_cpu_and_packable_dtypes() -> None:
    assert not onednn.available("meta", torch.float32)
    assert not onednn.available("cpu", torch.float16)
