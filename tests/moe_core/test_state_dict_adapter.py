"""The one contract for HF key spellings and expert placement (``moe_core.state_dict_adapter``)."""

from __future__ import annotations

import pytest
import torch

from moe_core.registry import get_preset
from moe_core.state_dict_adapter import (
    ExpertSplitError,
    check_expert_split,
    expected_hf_keys,
    expert_block,
    expert_tensors,
    hf_tensors,
    is_expert_param,
)


def test_each_rank_owns_its_contiguous_block_and_the_blocks_cover_every_expert_once() -> None:
    blocks = [expert_block(64, 8, r) for r in range(8)]
    assert blocks[0] == (0, 8) and blocks[3] == (24, 8)
    owned = [e for first, count in blocks for e in range(first, first + count)]
    assert owned == list(range(64))


@pytest.mark.parametrize(("experts", "ep", "rank"), [(64, 3, 0), (64, 0, 0), (8, 4, 4), (8, 4, -1)])
def test_a_split_that_does_not_fit_is_refused(experts: int, ep: int, rank: int) -> None:
    with pytest.raises(ExpertSplitError):
        expert_block(experts, ep, rank)


def test_check_expert_split_names_both_numbers() -> None:
    with pytest.raises(ExpertSplitError, match="EP size 3 must divide the routed expert count 64"):
        check_expert_split(64, 3)


def test_stacked_experts_split_into_exactly_the_keys_a_checkpoint_holds() -> None:
    cfg = get_preset("debug-moe")
    with torch.device("meta"):
        from moe_core.model import CausalLM

        params = list(CausalLM(cfg).named_parameters())
    keys = [k for k, _ in hf_tensors(iter(params), cfg)]
    assert len(keys) == len(set(keys))
    assert set(keys) == expected_hf_keys(cfg)
    assert all(is_expert_param(k) == (".mlp.experts." in k) for k in keys)
    assert not is_expert_param("model.layers.0.mlp.shared_expert.up_proj.weight")


def test_gate_rows_come_before_up_rows_and_ranks_number_their_experts_globally() -> None:
    gate_up = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)  # 2 local experts, F = 2, D = 3
    out = dict(expert_tensors(5, "gate_up_proj", gate_up, first_expert=6))
    assert sorted(out) == sorted(
        f"model.layers.5.mlp.experts.{e}.{p}.weight" for e in (6, 7) for p in ("gate_proj", "up_proj")
    )
    assert torch.equal(out["model.layers.5.mlp.experts.7.gate_proj.weight"], gate_up[1, :2])
    assert torch.equal(out["model.layers.5.mlp.experts.7.up_proj.weight"], gate_up[1, 2:])
