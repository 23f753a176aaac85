"""Fake devices for proving scale without a GPU: the pieces the GPU-readiness gate and the memory planner share.

- ``fake_world``: this process as one rank of a ``torch.testing._internal.distributed.fake_pg`` process group of
  any size; collectives do nothing but keep shapes.
- ``fake_cuda``: ``FakeTensorMode`` with ``device="cuda"`` tensors on a CPU build of torch (no data, no memory),
  where mixing CPU and CUDA tensors raises ``FakeTensorDeviceMismatchError`` as on a GPU. Python indexing of
  such tensors needs ``FakeCudaIndexing`` (below); autograd on them aborts a CPU build, so backward runs on the
  meta device instead.
- ``checked_collectives``: the fake process group would take a CPU tensor that NCCL refuses; this refuses it.
- ``EmulatedAutocast``: CUDA autocast's dtype rules for a device that has none here (fake "cuda", "meta"), so
  dtype flows that break only on a GPU break here and activations have a GPU's sizes.
- ``residual_dtype_checked``: the residual stream must stay in the weights' dtype.

Data-dependent host reads (split sizes, cache lengths) answer a capacity plan's assumptions there
(``moe_core.host_reads``). Nothing here imports beyond torch.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._pytree import tree_flatten, tree_map

from moe_core.config import ModelConfig
from moe_core.model import CausalLM

COLLECTIVES = (
    "all_reduce",
    "all_to_all_single",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
)


class CollectiveDeviceError(RuntimeError):
    """A collective got a tensor that is not on the compute device (NCCL would refuse it)."""


@contextlib.contextmanager
def fake_world(world_size: int, rank: int = 0) -> Iterator[None]:
    """This process as ``rank`` of a ``world_size`` process group whose collectives do nothing."""
    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def checked_collectives(device: torch.device) -> Iterator[list[str]]:
    """Every ``torch.distributed`` collective raises unless each tensor it gets is on ``device``; yields the
    names of the collectives called, in order."""
    calls: list[str] = []

    def checked(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            for t in tensors:
                if t.device.type != device.type:
                    raise CollectiveDeviceError(
                        f"dist.{name} got a tensor on {t.device} (shape {list(t.shape)}); the compute device is "
                        f"{device}: NCCL takes only CUDA tensors"
                    )
            calls.append(name)
            return original(*args, **kwargs)

        return wrapper

    with contextlib.ExitStack() as stack:
        for name in COLLECTIVES:
            stack.enter_context(mock.patch.object(dist, name, checked(name, getattr(dist, name))))
        yield calls


# What CUDA autocast does to each op (torch.amp's "CUDA Ops that can autocast to float16" and "... to float32"
# lists; the ones this model's forward uses, and their near relatives).
_LOWER_PRECISION_OPS = frozenset(
    {"linear", "matmul", "__matmul__", "mm", "bmm", "addmm", "baddbmm", "addbmm", "scaled_dot_product_attention"}
)
_FP32_OPS = frozenset(
    {
        "sum",
        "prod",
        "cumsum",
        "cumprod",
        "softmax",
        "log_softmax",
        "cross_entropy",
        "nll_loss",
        "pow",
        "__pow__",
        "rsqrt",
        "exp",
        "log",
        "layer_norm",
        "norm",
        "mse_loss",
    }
)


class EmulatedAutocast(TorchFunctionMode):
    """CUDA autocast's dtype rules on ``device_type`` tensors: fake "cuda" (a CPU build disables
    ``torch.autocast("cuda")``) or "meta" (which has no autocast at all).

    Casts the floating inputs of the ops above on that device as CUDA autocast would, and tells the experts
    (``moe_core.experts.autocast_dtype``) that autocast is on there, as the training step's autocast would.
    """

    def __init__(self, device_type: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.device_type, self.dtype = device_type, dtype

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        target = self.dtype if name in _LOWER_PRECISION_OPS else torch.float32 if name in _FP32_OPS else None
        if target is not None:

            def cast(x: Any) -> Any:
                if isinstance(x, torch.Tensor) and x.is_floating_point() and x.device.type == self.device_type:
                    return x.to(target)
                return x

            args, kwargs = tree_map(cast, args), tree_map(cast, kwargs)
        return func(*args, **kwargs)

    def __enter__(self) -> EmulatedAutocast:
        import moe_core.experts

        original, ours = moe_core.experts.autocast_dtype, self.device_type
        # Only the experts' own question is answered: torch's (activation checkpointing asks it too) would then
        # try to enter a real autocast on a device that has none.
        self._patch = mock.patch.object(
            moe_core.experts, "autocast_dtype", lambda dt: self.dtype if dt == ours else original(dt)
        )
        self._patch.start()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._patch.stop()


class FakeCudaIndexing(TorchFunctionMode):
    """Python indexing (``x[i]``, ``x[i] = v``) of fake CUDA tensors, as views and ``aten.index``/``index_put_``.

    A CPU build of torch cannot index a CUDA tensor from Python even when it is fake: the indexing entry point
    takes a CUDA device guard first, which such a build lacks. The aten ops themselves work, so this spells the
    same indexing with them: slices, ints, None and Ellipsis as views, then integer tensors through
    ``aten.index`` (which places advanced-index dimensions as Python indexing does). Boolean masks are not
    spelled (their result's shape depends on the data, so there is no fake answer); the code avoids them.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and args[0].device.type == "cuda":
            view, indices = _basic_then_advanced(args[0], args[1])
            if func is torch.Tensor.__getitem__:
                return view if indices is None else torch.ops.aten.index.Tensor(view, indices)
            value = args[2]
            if not isinstance(value, torch.Tensor):
                value = torch.full((), value, dtype=view.dtype, device=view.device)
            if indices is None:
                torch.ops.aten.copy_(view, value)
            else:
                torch.ops.aten.index_put_(view, indices, value)
            return None
        return func(*args, **(kwargs or {}))


def _basic_then_advanced(x: torch.Tensor, index: Any) -> tuple[torch.Tensor, list | None]:
    """Apply the slices, ints and None of ``index`` as views; the integer-tensor part as ``aten.index`` indices."""
    index = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in index):
        at = index.index(Ellipsis)
        used = sum(1 for i in index if i is not None and i is not Ellipsis)
        index = index[:at] + (slice(None),) * (x.dim() - used) + index[at + 1 :]
    aten, dim, advanced = torch.ops.aten, 0, {}
    for i in index:
        if i is None:
            x, dim = aten.unsqueeze(x, dim), dim + 1
        elif isinstance(i, slice):
            start, stop = i.start or 0, 2**62 if i.stop is None else i.stop
            x, dim = aten.slice(x, dim, start, stop, i.step or 1), dim + 1
        elif isinstance(i, int):
            x = aten.select(x, dim, i)
        elif isinstance(i, torch.Tensor) and i.dtype != torch.bool:
            advanced[dim], dim = i, dim + 1
        else:
            raise TypeError(f"FakeCudaIndexing does not spell the index {i!r}")
    if not advanced:
        return x, None
    return x, [advanced.get(d) for d in range(max(advanced) + 1)]


def meta_model(cfg: ModelConfig, dtype: torch.dtype, first: int, count: int | None) -> CausalLM:
    """This rank's part of the model on the meta device, in ``dtype``, as ``load_model`` builds it. Call it
    outside FakeTensorMode, then ``materialise`` it inside (random init would need a CUDA generator)."""
    with torch.device("meta"):
        model = CausalLM(cfg, first_expert=first, num_local_experts=count)
    return model.to(dtype)


def materialise(model: CausalLM, device: str) -> CausalLM:
    model.to_empty(device=device)
    model.tie_weights()
    return model


class DtypeDriftError(RuntimeError):
    """The residual stream left the weights' dtype (bf16 weights with an fp32 residual double its memory and
    hand the next layer's grouped matmuls mixed dtypes)."""


@contextlib.contextmanager
def residual_dtype_checked(model: CausalLM) -> Iterator[None]:
    """Every decoder layer must return hidden states in the weights' dtype."""
    want = model.model.embed_tokens.weight.dtype

    def check(module: torch.nn.Module, inputs: Any, output: Any) -> None:
        hidden = output[0]
        if hidden.dtype != want:
            raise DtypeDriftError(f"decoder layer {module.self_attn.layer_idx} returned {hidden.dtype}, weights {want}")

    hooks = [layer.register_forward_hook(check) for layer in model.model.layers]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def fake_cuda() -> Iterator[None]:
    """Fake tensors, CUDA among them, with Python indexing of CUDA ones. Real tensors passed in (a meta model
    being materialised, host data) become fake CPU ones, so mixing them with CUDA tensors still raises."""
    with FakeTensorMode(allow_non_fake_inputs=True), FakeCudaIndexing():
        yield
