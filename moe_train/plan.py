"""``upmoe train --plan``: per-rank GPU memory of a training layout, measured by running the real step.

The estimate is not a formula. It builds rank 0's part of the real model on fake tensors (shapes, no data,
no memory: ``FakeTensorMode``), joins a fake process group of the layout's world size
(``moe_core.fake_devices``), installs the real expert-parallel dispatcher, sharding (FSDP2 included) and
optimizer, and runs one real training step: forward, loss, backward, gradient reduction and clipping,
optimizer step, then builds the checkpoint state the loop would save. torch's ``MemTracker`` counts every
tensor each phase allocates, by kind, at its peak: the approach of torchtitan's memory estimator. Fake CPU
tensors stand in for the GPU's (FSDP2 needs a mesh device type this build has; torch's CPU attention takes a
flash kernel, which keeps what GPU flash attention keeps), and on a GPU plan CUDA autocast is emulated, so
activations have the sizes they have on a GPU.

What the plan assumes: routing spread evenly over the experts (the all-to-all's split sizes have no data on
fake tensors, ``moe_core.host_reads``), and a 10 % headroom (``--headroom``) for what the tracker cannot see:
the CUDA context, NCCL buffers and allocator fragmentation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

from moe_core.config import ModelConfig
from moe_core.experts import ExpertBackend
from moe_core.fake_devices import EmulatedAutocast, fake_world
from moe_core.model import CausalLM
from moe_train.config import TrainConfig, model_config_for
from moe_train.expert_parallel import ParallelLayout, build_process_groups, install_expert_parallel
from moe_train.tracking import flops_per_token

GIB = 2**30


class PlanError(ValueError):
    """The layout cannot be planned (or run) as given."""


@dataclass
class TrainingPlan:
    world: int
    ep: int
    seq_len: int
    micro_batch: int
    sharding: str
    activation_checkpointing: bool
    gpu_memory_gib: float
    headroom: float
    params_gib: float  # this rank's parameters
    grads_gib: float  # at the forward/backward peak
    optimizer_gib: float
    activations_gib: float  # activations and temporaries at the forward/backward peak
    forward_backward_peak_gib: float
    optimizer_step_peak_gib: float
    checkpoint_save_peak_gib: float
    rank_params: int
    flops_per_token: float
    notes: list[str] = field(default_factory=list)

    @property
    def peak_gib_per_rank(self) -> float:
        return max(self.forward_backward_peak_gib, self.optimizer_step_peak_gib, self.checkpoint_save_peak_gib)

    @property
    def budget_gib(self) -> float:
        return self.gpu_memory_gib * (1 - self.headroom)

    @property
    def fits(self) -> bool:
        return self.peak_gib_per_rank <= self.budget_gib

    def as_dict(self) -> dict[str, Any]:
        out = {**asdict(self), "peak_gib_per_rank": self.peak_gib_per_rank, "fits": self.fits}
        return {**out, "budget_gib": self.budget_gib}

    def table(self) -> str:
        rows = [
            ("parameters", self.params_gib),
            ("gradients", self.grads_gib),
            ("optimizer state", self.optimizer_gib),
            ("activations and temporaries", self.activations_gib),
            ("peak: forward + backward", self.forward_backward_peak_gib),
            ("peak: optimizer step", self.optimizer_step_peak_gib),
            ("peak: building the checkpoint", self.checkpoint_save_peak_gib),
            ("peak per rank", self.peak_gib_per_rank),
        ]
        head = (
            f"rank 0 of {self.world} (EP {self.ep}, sharding {self.sharding}, seq {self.seq_len} × micro-batch "
            f"{self.micro_batch}, activation checkpointing {'on' if self.activation_checkpointing else 'off'}): "
            f"{self.rank_params / 1e9:.2f} B parameters on this rank"
        )
        lines = [head] + [f"  {name:<32} {gib:9.2f} GiB" for name, gib in rows]
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(
            f"  {verdict} in {self.gpu_memory_gib:g} GiB with {self.headroom:.0%} headroom "
            f"(budget {self.budget_gib:.1f} GiB)"
        )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def plan_training(cfg: TrainConfig, gpu_memory_gib: float = 80.0, headroom: float = 0.10) -> TrainingPlan:
    """Measure rank 0's memory for ``cfg``'s layout (see the module docstring)."""
    if cfg.sharding not in ("none", "fsdp"):
        raise PlanError(
            f"--sharding {cfg.sharding}: the plan runs the real step on fake tensors, which DeepSpeed cannot do; "
            "plan --sharding fsdp or none"
        )
    return _plan(cfg, model_config_for(cfg), gpu_memory_gib, headroom)


def _plan(cfg: TrainConfig, model_cfg: ModelConfig, gpu_memory_gib: float, headroom: float) -> TrainingPlan:
    world, on_gpu = cfg.workers, cfg.gpus_per_worker > 0
    notes = ["routing assumed even over the experts (the all-to-all's sizes have no data on fake tensors)"]
    with fake_world(world):
        model, groups = _rank_model(cfg, model_cfg, world, notes)
        meshes = None
        if cfg.sharding == "fsdp":  # built outside FakeTensorMode: a mesh reads its ranks from a tensor
            from moe_train.fsdp import build_meshes

            meshes = build_meshes("cpu", world, cfg.ep if groups is not None else 1)
        # Fake CPU tensors stand in for the GPU's: FSDP2 needs a real device type for its mesh, and on CPU torch's
        # attention takes its flash kernel, whose memory is the GPU's flash attention's (output + log-sum-exp).
        with FakeTensorMode(allow_non_fake_inputs=True):
            plan = _measure(cfg, model, groups, world, on_gpu, meshes)
    fb, step, save = plan
    return TrainingPlan(
        world=world,
        ep=cfg.ep,
        seq_len=cfg.seq_len,
        micro_batch=cfg.micro_batch,
        sharding=cfg.sharding,
        activation_checkpointing=cfg.activation_checkpointing,
        gpu_memory_gib=gpu_memory_gib,
        headroom=headroom,
        params_gib=fb.get("PARAM", 0) / GIB,
        grads_gib=fb.get("GRAD", 0) / GIB,
        optimizer_gib=fb.get("OPT", 0) / GIB,
        activations_gib=(fb.get("ACT", 0) + fb.get("TEMP", 0)) / GIB,
        forward_backward_peak_gib=sum(fb.values()) / GIB,
        optimizer_step_peak_gib=sum(step.values()) / GIB,
        checkpoint_save_peak_gib=sum(save.values()) / GIB,
        rank_params=sum(p.numel() for p in model.parameters()),
        flops_per_token=flops_per_token(model_cfg, cfg.seq_len),
        notes=notes,
    )


def _measure(
    cfg: TrainConfig, model: CausalLM, groups: Any, world: int, on_gpu: bool, meshes: Any
) -> tuple[dict, dict, dict]:
    """Peaks by kind of forward + backward, the optimizer step and building the checkpoint (inside FakeTensorMode)."""
    from moe_train.loop import accumulate_global_batch, build_stepper, rank_checkpoint_state

    model.to_empty(device="cpu")
    model.tie_weights()
    stepper = build_stepper(cfg, model, groups, world, meshes)  # FSDP2 shards here: only the shards stay
    _allocate_optimizer_state(stepper)  # the steady state: every step after the first holds it throughout
    micro_batches = [torch.zeros(cfg.micro_batch, cfg.seq_len, dtype=torch.long) for _ in range(cfg.grad_accum)]

    def device_autocast() -> Any:  # a GPU step runs under CUDA autocast; emulated on the stand-in CPU tensors
        return EmulatedAutocast("cpu") if on_gpu else contextlib.nullcontext()

    # Activation checkpointing recomputes under the same autocast, as torch's own would for a real one.
    model.checkpoint_contexts = lambda: (contextlib.nullcontext(), device_autocast())

    def forward_backward(tracker: MemTracker) -> None:
        with device_autocast():
            # Two micro-batches show the peak of accumulation (gradients held through the next forward); more
            # change nothing. MemTracker counts one forward per module: its module stats are reset in between.
            for i, ids in enumerate(micro_batches[:2]):
                if i:
                    tracker.reset_mod_stats()
                accumulate_global_batch(stepper, [ids])

    fb = _peak_by_kind(stepper, forward_backward)
    step = _peak_by_kind(stepper, lambda _: stepper.step())
    save = _peak_by_kind(stepper, lambda _: rank_checkpoint_state(stepper, 1, cfg.zero_stage))
    return fb, step, save


@torch.no_grad()
def _allocate_optimizer_state(stepper: Any) -> None:
    for p in stepper.model.parameters():
        p.grad = torch.zeros_like(p)
    stepper.opt.step()
    stepper.opt.zero_grad(set_to_none=True)


def _peak_by_kind(stepper: Any, phase: Callable[[MemTracker], Any]) -> dict[str, int]:
    """Bytes at the peak of ``phase``, by MemTracker's kinds (PARAM, GRAD, OPT, ACT, ...), all devices together
    (the fake CPU tensors stand for the GPU's; the batch's ids, a few KB, are moved there anyway)."""
    tracker = MemTracker()
    tracker.track_external(stepper.model, stepper.opt)
    with tracker:
        result = phase(tracker)
    del result
    out: dict[str, int] = {}
    for kinds in tracker.get_tracker_snapshot("peak").values():
        for kind, nbytes in kinds.items():
            name = getattr(kind, "name", str(kind))
            if name != "Total":
                out[name] = out.get(name, 0) + nbytes
    return out


def _rank_model(
    cfg: TrainConfig, model_cfg: ModelConfig, world: int, notes: list[str], device: str = "meta"
) -> tuple[CausalLM, Any]:
    """Rank 0's model as ``loop.build_rank_model`` builds it (fp32 master weights): on meta, for the plan to
    materialise as fake tensors, or for real on ``device``."""
    backend = cfg.expert_backend
    if backend == ExpertBackend.MEGABLOCKS.value:
        notes.append("megablocks planned as 'grouped' (same tensors; its kernels need a real GPU)")
        backend = ExpertBackend.GROUPED.value
    groups, first, count = None, 0, None
    if model_cfg.is_moe:
        layout = ParallelLayout(world_size=world, ep_size=cfg.ep, num_experts=model_cfg.num_experts)
        groups = build_process_groups(layout)
        first, count = layout.first_expert(0), layout.experts_per_rank
    with torch.device("meta"):
        model = CausalLM(model_cfg, expert_backend=backend, first_expert=first, num_local_experts=count)
    if device != "meta":
        model.to_empty(device=device)
        model.tie_weights()
        model.reset_buffers()
        model.init_weights(torch.Generator(device).manual_seed(0))
    model.train()
    if groups is not None and cfg.ep > 1:
        install_expert_parallel(model, groups)
    model.activation_checkpointing = cfg.activation_checkpointing
    return model, groups


def run_step_for_real(cfg: TrainConfig, device: str = "cpu") -> None:
    """The step the plan measures, on real tensors: for checking the plan against a device's own peak (a CPU
    process's peak RSS in the tests, ``torch.cuda.max_memory_allocated`` on a GPU). One rank: a real run of a
    larger world would need its other ranks."""
    from moe_train.loop import accumulate_global_batch, build_stepper, rank_checkpoint_state

    if cfg.workers != 1:
        raise PlanError("run_step_for_real runs one rank: use --workers 1")
    vocab = model_config_for(cfg).vocab_size
    with fake_world(1):
        model, groups = _rank_model(cfg, model_config_for(cfg), 1, [], device)
        stepper = build_stepper(cfg, model, groups, 1)
        _allocate_optimizer_state(stepper)
        for _ in range(min(2, cfg.grad_accum)):
            accumulate_global_batch(stepper, [torch.randint(0, vocab, (cfg.micro_batch, cfg.seq_len))])
        stepper.step()
        rank_checkpoint_state(stepper, 1, cfg.zero_stage)
