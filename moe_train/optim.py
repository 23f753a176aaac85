"""The optimizer step behind the training loop: one small interface, two implementations.

``PlainStepper`` (``--zero-stage 0``) is PyTorch AdamW with our own gradient reduction and clipping
(``expert_parallel``): short enough to read in one sitting, and the reference the DeepSpeed path is tested
against. ``moe_train.zero.ZeroStepper`` (``--zero-stage 1|2``) hands the same step to DeepSpeed ZeRO. Both run
each micro-batch's loss through the same function, scale it by 1 / grad_accum, and update once per global batch
with the same AdamW hyper-parameters, so the loop reads the same either way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
import torch.distributed as dist

from moe_core.model import CausalLM
from moe_train.config import TrainConfig
from moe_train.expert_parallel import ProcessGroups, clip_gradients, reduce_gradients

# A micro-batch's loss, its parts for logging (detached, on the device), and its per-layer expert counts (None for
# dense models).
LossOutput = tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]
LossFn = Callable[[CausalLM, torch.Tensor], LossOutput]

ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8


def build_adamw(params: Iterable[Any], cfg: TrainConfig) -> torch.optim.AdamW:
    """The Qwen2 report's AdamW (β=(0.9, 0.95), ε=1e-8), weight decay on every parameter as before."""
    return torch.optim.AdamW(params, lr=cfg.lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=cfg.weight_decay)


class Stepper(Protocol):
    """What the loop needs from an optimizer: micro-steps, one update per global batch, and its state."""

    model: CausalLM

    def set_lr(self, lr: float) -> None: ...

    def micro_step(self, ids: torch.Tensor, last: bool) -> LossOutput:
        """Forward and backward of one micro-batch; ``last`` marks the end of the global batch."""
        ...

    def step(self) -> float:
        """Reduce, clip and update; returns the global gradient norm before clipping."""
        ...

    def model_state(self) -> dict[str, torch.Tensor]: ...

    def optimizer_state(self) -> Any: ...

    def load(self, model_state: dict[str, torch.Tensor], optimizer_state: Any) -> None: ...


@torch.no_grad()
def reduce_dense_gradients(model: torch.nn.Module, world: int) -> None:
    """Data parallelism for a dense model: every gradient is the mean over the ranks."""
    for p in model.parameters():
        if p.grad is not None and world > 1:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


class PlainStepper:
    """zero_stage 0: torch AdamW on the full parameters, gradients reduced as ``expert_parallel`` explains."""

    def __init__(
        self, model: CausalLM, groups: ProcessGroups | None, cfg: TrainConfig, world: int, loss_fn: LossFn
    ) -> None:
        self.model, self.groups, self.cfg, self.world, self.loss_fn = model, groups, cfg, world, loss_fn
        self.opt = build_adamw(model.parameters(), cfg)

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr

    def micro_step(self, ids: torch.Tensor, last: bool) -> LossOutput:
        loss, parts, counts = self.loss_fn(self.model, ids)
        (loss / self.cfg.grad_accum).backward()
        return loss, parts, counts

    def step(self) -> float:
        if self.groups is not None:
            reduce_gradients(self.model, self.groups)
        else:
            reduce_dense_gradients(self.model, self.world)
        grad_norm = clip_gradients(self.model, self.groups, self.cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return grad_norm

    def model_state(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def optimizer_state(self) -> Any:
        return self.opt.state_dict()

    def load(self, model_state: dict[str, torch.Tensor], optimizer_state: Any) -> None:
        self.model.load_state_dict(model_state)
        self.opt.load_state_dict(optimizer_state)
