"""``--sharding fsdp``: PyTorch FSDP2 (``fully_shard``) composed with the all-to-all expert parallelism.

Which rank holds what (World = DP × EP, EP groups of consecutive ranks, as ``expert_parallel.ParallelLayout``):
- non-expert parameters (embeddings, attention, router, shared expert, lm_head) are sharded over the whole world;
- a rank's routed experts (its EP rank's contiguous block) are sharded over its expert-data-parallel group, the
  ranks holding the same experts; every expert element thus lives on exactly one rank.
torchtitan builds the same composition. Each decoder layer is one FSDP unit (its experts a nested one), so a
layer's parameters are gathered just before it runs and freed after it.

Gradients (docs/design.md §6): FSDP2 reduce-scatters and divides by its mesh size. For non-expert parameters
that is the mean over the W ranks, as required. An expert's gradient, already summed over its EP group by the
all-to-all's backward, must be summed over its expert-DP group and divided by W. FSDP2 gives the mean over that
group (W / EP ranks), so the last micro-step divides expert gradients by EP: sum / (W / EP) / EP = sum / W. (A
divide factor of W would be skipped where the expert-DP group is one rank: FSDP2 then does not reduce at all.)

Precision: on GPUs parameters are gathered in bf16 for compute while the sharded master copy, the gradients'
reduction and AdamW's state stay fp32 (``MixedPrecisionPolicy``); on CPU everything is fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    _init_optim_state,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from moe_core.host_reads import floats
from moe_core.loading import materialise_and_fill
from moe_core.model import CausalLM
from moe_core.state_dict_adapter import is_expert_param
from moe_train.config import TrainConfig
from moe_train.expert_parallel import ProcessGroups
from moe_train.optim import LossFn, LossOutput, build_adamw


@dataclass
class Meshes:
    world: DeviceMesh  # 1-D, every rank: non-expert parameters
    experts: DeviceMesh | None  # 2-D ("ep", "edp"): a rank's EP group along "ep", its expert-DP group along "edp"

    @property
    def expert_dp(self) -> DeviceMesh | None:
        return self.experts["edp"] if self.experts is not None else None


def build_meshes(device_type: str, world: int, ep: int) -> Meshes:
    """The meshes for ``world`` ranks at EP ``ep`` (collective: every rank calls it in the same order)."""
    world_mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("dp",))
    if ep < 1 or world % ep:
        raise ValueError(f"EP size {ep} must divide the world size {world}")
    # mesh[e, d] = d·EP + e: along "ep" consecutive ranks (an EP group), along "edp" ranks EP apart.
    ranks = torch.arange(world).view(world // ep, ep).T
    expert_mesh = DeviceMesh(device_type, ranks, mesh_dim_names=("ep", "edp"))
    return Meshes(world=world_mesh, experts=expert_mesh)


def mixed_precision(device_type: str) -> MixedPrecisionPolicy:
    if device_type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()  # fp32 throughout: what the CPU parity tests compare


def apply_fsdp(model: CausalLM, meshes: Meshes, mp: MixedPrecisionPolicy) -> None:
    """Shard ``model`` in place: experts over their expert-DP mesh, each decoder layer and the root over all."""
    for layer in model.model.layers:
        if layer.is_moe:
            if meshes.expert_dp is None:
                raise ValueError("a MoE model needs expert meshes")
            fully_shard(layer.mlp.experts, mesh=meshes.expert_dp, mp_policy=mp)  # FsdpStepper divides by EP
        fully_shard(layer, mesh=meshes.world, mp_policy=mp)
    fully_shard(model, mesh=meshes.world, mp_policy=mp)


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def clip_sharded_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """Clip to the global gradient norm. Every element lives on exactly one rank, so the squared norm is the sum
    over all ranks of each rank's local shards (one all-reduce, on the compute device)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    device = next(model.parameters()).device
    sq = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        sq += local(g).double().pow(2).sum()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sq)
    norm = floats(sq.sqrt().reshape(1))[0]
    if max_norm > 0 and norm > max_norm:
        for g in grads:
            local(g).mul_(max_norm / (norm + 1e-6))
    return norm


class FsdpStepper:
    """``--sharding fsdp``: the model sharded by FSDP2 (which reduces the gradients), our clipping, torch AdamW on
    the fp32 shards. Its checkpoints are sharded (``sharded_state``, ``moe_train.sharded_checkpoint``), not the
    rank files of the other steppers' ``model_state``/``optimizer_state``/``load``."""

    def __init__(
        self,
        model: CausalLM,
        groups: ProcessGroups | None,
        cfg: TrainConfig,
        world: int,
        loss_fn: LossFn,
        meshes: Meshes | None = None,
        device: torch.device | None = None,
    ) -> None:
        """A model on the meta device (``loop.build_rank_model``'s) is sharded there, then allocated on
        ``device`` and filled from ``cfg.model``, each rank reading only its shards; a materialised one (the
        planner's) is sharded in place."""
        on_meta = next(model.parameters()).is_meta
        device = torch.device(device or "cpu") if on_meta else next(model.parameters()).device
        self.meshes = meshes or build_meshes(device.type, world, cfg.ep if groups is not None else 1)
        apply_fsdp(model, self.meshes, mixed_precision(device.type))
        if on_meta:
            materialise_and_fill(model, cfg.model, device)
        self.model, self.groups, self.cfg, self.world, self.loss_fn = model, groups, cfg, world, loss_fn
        self.opt = build_adamw(model.parameters(), cfg)
        self.expert_params = [p for layer in model.model.layers if layer.is_moe for p in layer.mlp.experts.parameters()]

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr

    def micro_step(self, ids: torch.Tensor, last: bool) -> LossOutput:
        loss, parts, counts = self.loss_fn(self.model, ids)
        (loss / self.cfg.grad_accum).backward()  # FSDP reduce-scatters each micro-batch's gradients into shards
        if last:
            self._finish_expert_reduction()
        return loss, parts, counts

    def step(self) -> float:
        grad_norm = clip_sharded_gradients(self.model, self.cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return grad_norm

    @torch.no_grad()
    def _finish_expert_reduction(self) -> None:
        """FSDP2 averaged expert gradients over the expert-DP group (summed over micro-batches); the global loss
        is a mean over all W ranks (see the module docstring)."""
        ep = self.meshes.experts["ep"].size() if self.meshes.experts is not None else 1
        for p in self.expert_params:
            if p.grad is not None:
                local(p.grad).div_(ep)

    def reduced_grads(self) -> dict[str, torch.Tensor]:
        """This rank's reduced gradients, whole (gathered over their mesh): for the parity tests, before ``step``."""
        return {n: _full(p.grad) for n, p in self.model.named_parameters() if p.grad is not None}

    def full_rank_state(self) -> dict[str, torch.Tensor]:
        """This rank's parameters whole (gathered over their mesh), as a plain process holding its experts has them."""
        return {n: _full(p.detach()) for n, p in self.model.named_parameters()}

    def sharded_state(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """(what a sharded checkpoint stores, the model's and the optimizer's own state dicts).

        The stored view shares memory with the other two, so loading into it in place loads the run. Expert
        tensors appear there as slices of one global tensor over every expert (``global_experts``): the same
        checkpoint then loads into any layout, whatever EP and expert-DP sizes it has.
        """
        _init_optim_state(self.opt)  # AdamW creates its state lazily: a resumed run has none yet
        model_sd = get_model_state_dict(self.model)
        optim_sd = get_optimizer_state_dict(self.model, self.opt)
        view = {
            "model": {k: self.global_experts(k, v) for k, v in model_sd.items()},
            "optim": {
                "state": {
                    fqn: {k: self.global_experts(fqn, v) for k, v in per_param.items()}
                    for fqn, per_param in optim_sd["state"].items()
                },
                "param_groups": optim_sd["param_groups"],
            },
        }
        return view, model_sd, optim_sd

    def load_sharded_state(self, model_sd: dict[str, Any], optim_sd: dict[str, Any]) -> None:
        set_model_state_dict(self.model, model_sd)
        set_optimizer_state_dict(self.model, self.opt, optim_sd)

    def global_experts(self, fqn: str, value: Any) -> Any:
        """An expert tensor (this rank's shard of its EP rank's experts) as its slice of the global [E, ...] tensor:
        split over "ep" first (the contiguous blocks of ``state_dict_adapter.expert_block``), then over "edp"
        (FSDP2's shards), as DTensor places Shard(0), Shard(0) on the ("ep", "edp") mesh. Anything else unchanged."""
        if not (isinstance(value, DTensor) and is_expert_param(fqn) and value.ndim == 3):
            return value
        shape = (self.model.config.num_experts, *value.shape[1:])
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(
            value.to_local(), self.meshes.experts, [Shard(0), Shard(0)], run_check=False, shape=shape, stride=stride
        )


def _full(t: torch.Tensor) -> torch.Tensor:
    """A copy of the whole tensor (over a one-rank mesh ``full_tensor`` hands back the shard itself)."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).clone()
