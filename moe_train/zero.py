"""DeepSpeed ZeRO stage 1/2 for the optimizer (``--zero-stage 1|2``), on top of our own expert parallelism.

Imported only when a run asks for ZeRO, so ``upmoe export`` and the plain path never load DeepSpeed.

How DeepSpeed learns which parameters are experts
    Expert parameters must be reduced, and their optimizer state partitioned, over the expert-data-parallel
    group (the ranks holding the same experts); everything else over the whole data-parallel world. DeepSpeed's
    ZeRO 1/2 optimizer does exactly that for parameters marked the way its own ``deepspeed.moe`` experts are
    (``allreduce = False``, ``group_name = "ep_size_{EP}"``), placed in optimizer param groups flagged ``moe``
    (``split_params_into_different_moe_groups_for_optimizer``), with the groups made by
    ``deepspeed.utils.groups._create_expert_and_data_parallel``: consecutive EP groups and strided expert-DP
    groups, the layout ``ParallelLayout`` uses (checked at start).
    The one gap: the engine turns that machinery on (``has_moe_layers``) only when it finds an instance of its
    own ``deepspeed.moe.layer.MoE`` among the modules, and our MoE blocks are moe_core's, whose dispatcher does
    the all-to-all. So the engine wraps the model together with ``ExpertParallelMarker``, a parameter-free
    subclass of DeepSpeed's MoE that only carries the expert count and is never called. Everything else is
    DeepSpeed's documented MoE path.

Gradient scaling (the parity test in tests/moe_train/test_zero.py is the judge)
    W = world size; the loss is the mean over ranks of each rank's mean loss (``expert_parallel``). ZeRO's
    reduce-scatter (stage 1 and 2, ``average_tensor``) divides every gradient by the data-parallel size, which
    is W here (no model-parallel ``mpu``), then sums it over the parameter's group: the whole world for a
    non-expert parameter, giving the mean over W; the expert-DP group for an expert parameter, whose local
    gradient the all-to-all's backward has already summed over its EP group, giving Σ_expert-DP / W. That is
    ``reduce_gradients`` exactly, so no correction is applied (no loss scaling, ``gradient_predivide_factor``
    1). ``engine.backward`` divides each micro-batch loss by ``gradient_accumulation_steps``, as the plain loop
    divides by grad_accum.

Clipping
    ZeRO's global norm (``get_grad_norm_direct``) sums every rank's squared gradient partition over the whole
    world. The partitions of an expert group tile it across its expert-DP group and different EP ranks hold
    different experts, so each expert counts once (``_average_expert_grad_norms`` then averages equal values);
    non-expert partitions tile the whole world. The factor max_norm / (norm + 1e-6) is ``clip_gradients``'s.

Precision: fp32 on CPU, where the module's parameters equal ZeRO's fp32 master copy bit for bit; bf16 parameters
with fp32 master weights on GPU (``bf16.enabled``), where checkpoints store the gathered fp32 master weights and
gradients are accumulated and reduced in bf16 (DeepSpeed's default; ``data_types.grad_accum_dtype: fp32`` would
move ZeRO-1 to DeepSpeed's BF16 optimizer, whose state this module does not save). The GPU path is unrun here.
"""

from __future__ import annotations

from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import groups as ds_groups
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

from moe_core.model import CausalLM
from moe_core.state_dict_adapter import is_expert_param
from moe_train.config import TrainConfig
from moe_train.expert_parallel import ParallelLayout, ParallelLayoutError, ProcessGroups
from moe_train.optim import LossFn, LossOutput, build_adamw

DEEPSPEED_BUCKET = 500_000_000  # DeepSpeed's default reduce/all-gather bucket (elements)


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's key for the EP and expert-DP groups of size ``ep_size`` (as ``deepspeed.moe`` names them)."""
    return f"ep_size_{ep_size}"


class ExpertParallelMarker(DeepSpeedMoE):
    """Tells the DeepSpeed engine that the model has expert-parallel parameters (see the module docstring).

    No gate, no experts, no parameters: ``DeepSpeedMoE.__init__`` is skipped on purpose. The groups exist before
    the engine asks for them (``create_expert_groups``), and moe_core's dispatcher does the all-to-all.
    """

    def __init__(self, num_experts: int, ep_size: int) -> None:
        torch.nn.Module.__init__(self)
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.num_local_experts = num_experts // ep_size
        self.expert_group_name = expert_group_name(ep_size)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Nothing to wire: called by the engine on every module that has it."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("ExpertParallelMarker only marks the model for DeepSpeed; it is never called")


class EngineModule(torch.nn.Module):
    """The module DeepSpeed wraps: the model (and the marker under EP); forward returns the micro-batch loss.

    Returning the loss tensor first lets the engine hook its backward prologue onto it (it does not look inside
    our output dataclass). ``model`` keeps its own state-dict keys for checkpoints and export.
    """

    def __init__(self, model: CausalLM, loss_fn: LossFn, marker: ExpertParallelMarker | None) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        if marker is not None:
            self.expert_parallel_marker = marker

    def forward(self, ids: torch.Tensor) -> LossOutput:
        return self.loss_fn(self.model, ids)


def deepspeed_config(cfg: TrainConfig, world: int, num_params: int) -> dict[str, Any]:
    """The engine's config: our batch shape, clipping and ZeRO stage; bf16 on GPU, fp32 on CPU."""
    bucket = int(min(DEEPSPEED_BUCKET, num_params))  # a bucket larger than the model only costs memory
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch * cfg.grad_accum * world,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {
            "stage": cfg.zero_stage,
            # DeepSpeed's MoE path requires reduce-scatter, and contiguous gradients for stage 2 (stage 1 warns).
            "reduce_scatter": True,
            "contiguous_gradients": True,
            "overlap_comm": False,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
        },
        "bf16": {"enabled": cfg.gpus_per_worker > 0},
        # The same torch AdamW as the plain path; DeepSpeed only calls its own Adam variants "tested".
        "zero_allow_untested_optimizer": True,
        "steps_per_print": None,
    }


def create_expert_groups(layout: ParallelLayout, rank: int) -> str:
    """DeepSpeed's EP / expert-DP groups (a collective: every rank calls it), checked against ``layout``."""
    name = expert_group_name(layout.ep_size)
    if name not in ds_groups._get_expert_data_parallel_group_dict():
        ds_groups._create_expert_and_data_parallel(layout.ep_size)
    expert_dp = dist.get_process_group_ranks(ds_groups._get_expert_data_parallel_group(name))
    if sorted(expert_dp) != layout.expert_dp_group_ranks(rank):
        raise ParallelLayoutError(
            f"DeepSpeed's expert-data-parallel group {sorted(expert_dp)} for rank {rank} differs from ours "
            f"{layout.expert_dp_group_ranks(rank)}"
        )
    return name


def mark_expert_params(model: torch.nn.Module, group_name: str) -> None:
    """Mark expert parameters as ``deepspeed.moe`` marks its experts (``is_moe_param`` reads ``allreduce``)."""
    for name, p in model.named_parameters():
        if is_expert_param(name):
            p.allreduce = False
            p.group_name = group_name


def build_engine(model: CausalLM, groups: ProcessGroups | None, cfg: TrainConfig, world: int, loss_fn: LossFn) -> Any:
    """``deepspeed.initialize`` on the process group Ray Train (or a test) already set up."""
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    marker = None
    params: list[Any] = [{"params": list(model.parameters()), "name": "dense"}]
    if groups is not None and groups.layout.ep_size > 1:
        layout = groups.layout
        mark_expert_params(model, create_expert_groups(layout, groups.rank))
        marker = ExpertParallelMarker(layout.num_experts, layout.ep_size)
        params = split_params_into_different_moe_groups_for_optimizer(params)
    # With EP = 1 every rank holds every expert: experts are plain data-parallel parameters, no MoE groups.
    num_params = sum(p.numel() for p in model.parameters())
    engine, *_ = deepspeed.initialize(
        model=EngineModule(model, loss_fn, marker),
        optimizer=build_adamw(params, cfg),
        config=deepspeed_config(cfg, world, num_params),
    )
    return engine


class ZeroStepper:
    """zero_stage 1/2: the DeepSpeed engine does the backward bookkeeping, reduction, clipping and AdamW step."""

    def __init__(
        self, model: CausalLM, groups: ProcessGroups | None, cfg: TrainConfig, world: int, loss_fn: LossFn
    ) -> None:
        self.model = model
        self.engine = build_engine(model, groups, cfg, world, loss_fn)

    def set_lr(self, lr: float) -> None:
        """Our schedule (``lr_at``), set on the wrapped AdamW's groups: no DeepSpeed scheduler is configured."""
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def micro_step(self, ids: torch.Tensor, last: bool) -> LossOutput:
        # The loop owns the boundary, so one engine.step() per global batch (DeepSpeed's documented pattern).
        self.engine.set_gradient_accumulation_boundary(last)
        loss, parts, counts = self.engine(ids)
        self.engine.backward(loss)
        return loss, parts, counts

    def step(self) -> float:
        self.engine.step()
        return float(self.engine.get_global_grad_norm())

    def reduced_grads(self) -> dict[str, torch.Tensor]:
        """Every parameter's full reduced gradient, between the last micro-step and ``step`` (a collective).

        For tests and debugging: ZeRO keeps only this rank's partition, so this gathers it back.
        """
        return {name: safe_get_full_grad(p).clone() for name, p in self.model.named_parameters()}

    def model_state(self) -> dict[str, torch.Tensor]:
        """The model's state dict, with fp32 master weights (a collective) when the module itself is bf16."""
        state = self.model.state_dict()
        if not self.engine.bfloat16_enabled():
            return state
        for name, p in self.model.named_parameters(remove_duplicate=False):
            state[name] = safe_get_full_fp32_param(p)
        return state

    def optimizer_state(self) -> Any:
        """This rank's ZeRO state: its AdamW moments and fp32 master partition (DeepSpeed's per-rank format)."""
        return self.engine.optimizer.state_dict()

    def load(self, model_state: dict[str, torch.Tensor], optimizer_state: Any) -> None:
        """Restore exactly: module weights first, then this rank's moments and fp32 master partition."""
        self.model.load_state_dict(model_state)
        per_rank: list[Any] = [None] * dist.get_world_size()
        per_rank[dist.get_rank()] = optimizer_state  # ZeRO reads only its own entry for a same-layout restore
        self.engine.optimizer.load_state_dict(per_rank, load_optimizer_states=True, load_from_fp32_weights=True)
