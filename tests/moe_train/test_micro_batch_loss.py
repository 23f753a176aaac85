"""micro_batch_loss: the aux loss and the expert counts training logs describe the routing the forward chose.

With aux-loss-free balancing (``--aux-free-bias-rate``) the routers' ``selection_bias`` changes which experts
run; the Switch loss must take f_e from those experts and P_e from the unbiased probabilities, not a top-k
redone from the router logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

from moe_core.model import CausalLM, next_token_loss
from moe_core.registry import get_preset
from moe_train.config import AuxLoss, TrainConfig
from moe_train.loop import micro_batch_loss

pytestmark = pytest.mark.usefixtures("torch_single_thread")

AUX_COEF, Z_COEF = 0.5, 0.1


def _model() -> CausalLM:
    model = CausalLM(get_preset("debug-moe"))
    model.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.weight.mul_(20.0)  # a peaked router, so which experts are counted changes the loss a lot
    return model.train()


@pytest.mark.parametrize("aux_loss", [AuxLoss.SWITCH, AuxLoss.GLOBAL])
def test_micro_batch_loss_uses_the_routing_the_forward_chose(aux_loss: AuxLoss, tmp_path: Path) -> None:
    model = _model()
    num_experts, top_k = model.config.num_experts, model.config.num_experts_per_tok
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    tokens = ids.numel()
    with torch.no_grad():
        plain = model(ids)
    # In every layer, favour the top_k experts its router likes least: a bias of 1 beats any probability, so
    # every token selects exactly them.
    favoured = []
    for moe, routing in zip(model.moe_layers(), plain.routings, strict=True):
        least = routing.probs_TE.mean(0).argsort()[:top_k]
        moe.gate.selection_bias[least] = 1.0
        favoured.append(least)

    cfg = TrainConfig(
        model=str(tmp_path),
        data=str(tmp_path),
        out=str(tmp_path),
        aux_loss=aux_loss,
        aux_coef=AUX_COEF,
        z_loss_coef=Z_COEF,
    )
    loss, parts, counts = micro_batch_loss(model, ids, cfg)
    parts = {k: v.item() for k, v in parts.items()}  # detached device scalars

    # The logged counts are the experts that ran.
    assert counts is not None and counts.shape == (len(favoured), num_experts)
    for layer, least in enumerate(favoured):
        want = torch.zeros(num_experts, dtype=torch.long)
        want[least] = tokens
        assert torch.equal(counts[layer].cpu(), want)

    # The aux loss: f_e from those experts, P_e the unbiased softmax of the same (biased) forward's logits.
    with torch.no_grad():
        again = model(ids)
    f_E = torch.zeros(num_experts)
    for least in favoured:
        f_E[least] += tokens
    f_E /= tokens * len(favoured)
    p_E = torch.cat([torch.softmax(r.logits_TE.float(), -1) for r in again.routings]).mean(0)
    want_aux = num_experts * (f_E * p_E).sum().item()
    assert parts["aux_loss"] == pytest.approx(want_aux, abs=1e-5)
    # ... which is far from what a top-k redone from the logits gives (the defect this guards against).
    redone = load_balancing_loss_func(tuple(r.logits_TE for r in again.routings), num_experts, top_k).item()
    assert parts["aux_loss"] < redone - 0.5

    # The total is lm + coefficients · parts, and the aux loss reaches the routers' weights.
    lm = next_token_loss(again.logits, ids).item()
    assert parts["lm_loss"] == pytest.approx(lm, abs=1e-5)
    assert loss.item() == pytest.approx(lm + AUX_COEF * want_aux + Z_COEF * parts["z_loss"], abs=1e-5)
    loss.backward()
    assert all(moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().max() > 0 for moe in model.moe_layers())
