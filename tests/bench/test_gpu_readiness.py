"""The GPU-readiness gate at a small shape: training forward and serving on fake CUDA at world 16 / EP 8.

Each bug the gate exists for is put back (as the code had it) to show the gate catches it.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError

import moe_core.all_to_all
import moe_core.moe
import moe_train.expert_parallel
from bench.gpu_readiness import check_serving, check_training_forward
from moe_core.fake_devices import CollectiveDeviceError, DtypeDriftError, checked_collectives, fake_cuda, fake_world
from moe_core.permute import inverse_permutation
from moe_core.registry import get_preset

CFG = get_preset("debug-moe")  # 64 experts, top-8, grouped_mm-sized widths
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _train(param_dtype: torch.dtype = torch.float32):
    return check_training_forward(CFG, world=16, ep=8, seq_len=32, micro_batch=2, param_dtype=param_dtype)


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=["fp32-master", "bf16-params"])
def test_training_forward_runs_on_fake_cuda_at_world_16_ep_8(param_dtype: torch.dtype) -> None:
    result = _train(param_dtype)
    assert result.collectives > 2 * CFG.num_hidden_layers  # the all-to-alls ran, not a local shortcut
    assert "on cuda:0" in result.detail


def test_serving_prefill_and_decode_run_on_fake_cuda_at_ep_8() -> None:
    result = check_serving(CFG, ep=8, max_seq_len=64, prompt_lens=[5, 17, 1], decode_steps=3)
    # Logits of 2 decode tokens and of a 3-token prefill chunk.
    assert result.collectives > 0 and "[5, 1024] torch.float32 on cuda:0" in result.detail


def _torch_without_device(*names: str) -> types.SimpleNamespace:
    """``torch`` whose ``names`` ignore ``device=``: the tensor lands on the CPU, as the buggy code had it."""
    proxy = types.SimpleNamespace(**{n: getattr(torch, n) for n in dir(torch) if not n.startswith("__")})
    for name in names:
        original = getattr(torch, name)
        setattr(proxy, name, lambda *a, _f=original, device=None, **k: _f(*a, **k))
    return proxy


def test_gate_catches_a_host_tensor_in_the_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    # moe_core/all_to_all.py built the row-source index with torch.arange on the CPU.
    monkeypatch.setattr(moe_core.all_to_all, "torch", _torch_without_device("arange"))
    with pytest.raises(FakeTensorDeviceMismatchError):
        _train()


def test_gate_catches_host_accumulators_in_gradient_clipping(monkeypatch: pytest.MonkeyPatch) -> None:
    # clip_gradients summed squared norms into CPU tensors and all-reduced them on the default (NCCL) group.
    monkeypatch.setattr(moe_train.expert_parallel, "torch", _torch_without_device("zeros"))
    with pytest.raises(RuntimeError, match="device"):  # a CPU += CUDA in place, or the collective check
        _train()


def test_collectives_refuse_host_tensors() -> None:
    # mean_over_ranks all-reduced a torch.tensor of floats built on the host.
    with fake_world(4), fake_cuda(), checked_collectives(torch.device("cuda:0")) as calls:
        dist.all_reduce(torch.zeros(2, device="cuda:0"))
        with pytest.raises(CollectiveDeviceError, match="NCCL takes only CUDA tensors"):
            dist.all_reduce(torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert calls == ["all_reduce"]


def _combine_without_cast(y_SD: torch.Tensor, order_S: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """permute.combine_slots as it was: CUDA autocast runs the sum in fp32, and nothing cast it back."""
    num_tokens, top_k = weights_TK.shape
    y = y_SD.index_select(0, inverse_permutation(order_S)).view(num_tokens, top_k, y_SD.shape[-1])
    return (y * weights_TK.unsqueeze(-1).to(y_SD.dtype)).sum(dim=1)


def test_gate_catches_the_residual_turning_fp32_under_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(moe_core.all_to_all, "combine_slots", _combine_without_cast)
    monkeypatch.setattr(moe_core.moe, "combine_slots", _combine_without_cast)
    with pytest.raises(DtypeDriftError, match="returned torch.float32, weights torch.bfloat16"):
        _train(torch.bfloat16)
