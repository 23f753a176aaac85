"""Training options: one typed config, filled from defaults, then a YAML file, then command-line flags.

Defaults follow the Qwen2 report's pretraining settings: AdamW β=(0.9, 0.95), ε=1e-8, cosine decay to 10 %
of the peak learning rate, weight decay 0.1, gradient clipping 1.0; fp32 on CPU.

``sharding`` picks how parameters, gradients and optimizer state are spread over the ranks: ``none`` is PyTorch
AdamW with our own gradient reduction (``expert_parallel``), kept as the reference every other path is tested
against; ``zero1``/``zero2`` are DeepSpeed ZeRO (``moe_train.zero``); ``fsdp`` is PyTorch FSDP2 composed with
expert parallelism (``moe_train.fsdp``). ``zero_stage`` is the older spelling of the first three (0, 1, 2).
Left unset it is ``fsdp`` with GPUs and ``none`` on CPU: sharding exists to spread state across accelerators
(``upmoe train --plan`` shows FSDP2 is what fits Qwen2-57B-A14B on 16 × 80 GB), and the models that fit a CPU gain
nothing from it (DeepSpeed would also first JIT-compile a C++ op there, about 40 s). Activation checkpointing is
likewise on by default with GPUs only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any

import yaml


class AuxLoss(str, Enum):
    SWITCH = "switch"  # per micro-batch
    GLOBAL = "global"  # expert counts all-reduced over the data-parallel group first
    NONE = "none"


ZERO_STAGES = (0, 1, 2)
SHARDINGS = ("none", "zero1", "zero2", "fsdp")
_STAGE_OF = {"none": 0, "zero1": 1, "zero2": 2, "fsdp": 0}


def default_sharding(gpus_per_worker: int) -> str:
    """FSDP2 on GPUs (the layout that fits the flagship, ``upmoe train --plan``); the plain optimizer on CPU (see
    the module docstring)."""
    return "fsdp" if gpus_per_worker > 0 else "none"


@dataclass(kw_only=True)
class TrainConfig:
    model: str
    data: str
    out: str
    eval_data: str | None = None
    eval_every: int = 0  # held-out loss every N steps (0: only at the end); needs eval_data
    workers: int = 1
    ep: int = 1
    gpus_per_worker: int = 0
    steps: int = 100
    seq_len: int = 4096
    micro_batch: int = 1
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup: int = 0
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    aux_loss: AuxLoss = AuxLoss.SWITCH
    aux_coef: float = 0.001
    z_loss_coef: float = 0.0
    aux_free_bias_rate: float = 0.0  # DeepSeek-V3's auxiliary-loss-free balancing: bias step γ per optimizer step
    expert_backend: str | None = None  # eager | grouped | megablocks (default: grouped)
    activation_checkpointing: bool | None = None  # None: on with GPUs (activations dominate there), off on CPU
    zero_stage: int | None = None  # 0: plain AdamW; 1/2: DeepSpeed ZeRO; None: 1 with GPUs, 0 on CPU
    sharding: str | None = None  # none | zero1 | zero2 | fsdp; None: from zero_stage
    gpu_memory_gib: float = 80.0  # per GPU: what the memory plan checks a GPU run against
    plan_check: bool = True  # GPU runs: refuse a layout whose memory plan does not fit (``moe_train.plan``)
    checkpoint_every: int = 0
    heatmap_every: int = 50  # steps between expert-load heatmap images (0: never)
    wandb_project: str | None = None
    wandb_mode: str | None = None  # online | offline | disabled; default: online iff WANDB_API_KEY is set
    peak_flops: float | None = None  # device peak for the MFU estimate (default: by device and dtype)
    max_failures: int = 0
    seed: int = 0
    ray_address: str | None = None
    # Model config overrides for a context-extension stage (written into exported checkpoints too).
    rope_theta: float | None = None
    max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        self.aux_loss = AuxLoss(self.aux_loss)
        if self.sharding is None and self.zero_stage is None:
            self.sharding = default_sharding(self.gpus_per_worker)
        if self.sharding in _STAGE_OF:
            stage = _STAGE_OF[self.sharding]
            if self.zero_stage is not None and self.zero_stage != stage:
                raise ValueError(f"--sharding {self.sharding} and --zero-stage {self.zero_stage} disagree: give one")
            self.zero_stage = stage
        if self.sharding is None:
            self.sharding = SHARDINGS[self.zero_stage] if self.zero_stage in ZERO_STAGES else None
        if self.activation_checkpointing is None:
            self.activation_checkpointing = self.gpus_per_worker > 0
        # Workers run in Ray's own working directories: a relative path must mean what it meant to the user.
        self.model = absolute_path(self.model)
        self.out = absolute_path(self.out)
        self.data = ",".join(absolute_path(p) for p in self.data.split(","))
        if self.eval_data is not None:
            self.eval_data = ",".join(absolute_path(p) for p in self.eval_data.split(","))

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        for name in ("workers", "ep", "steps", "seq_len", "micro_batch", "grad_accum"):
            need(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        need(self.workers % self.ep == 0, f"--ep {self.ep} must divide --workers {self.workers}")
        need(self.lr > 0 and 0 <= self.min_lr_ratio <= 1, "--lr must be positive and --min-lr-ratio in [0, 1]")
        need(self.warmup >= 0 and self.checkpoint_every >= 0, "--warmup and --checkpoint-every must be >= 0")
        need(self.eval_every >= 0, f"--eval-every must be >= 0, got {self.eval_every}")
        need(not self.eval_every or self.eval_data is not None, "--eval-every needs --eval-data")
        zero_msg = f"--zero-stage must be one of {ZERO_STAGES}, got {self.zero_stage}"
        need(self.sharding is not None or self.zero_stage in ZERO_STAGES, zero_msg)  # None: from a bad zero_stage
        need(self.sharding in SHARDINGS, f"--sharding must be one of {', '.join(SHARDINGS)}, got {self.sharding}")
        need(self.zero_stage in ZERO_STAGES, zero_msg)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["aux_loss"] = self.aux_loss.value
        return out


EMBEDDED = "embedded"  # --data value for the built-in corpus


def absolute_path(path: str) -> str:
    """A local path (or glob) made absolute; URIs (s3://...) and the built-in corpus name pass unchanged."""
    path = path.strip()
    if "://" in path or path == EMBEDDED or path.startswith(EMBEDDED + ":") or not path:
        return path
    return str(Path(path).expanduser().absolute())


# The Qwen2 report's second pretraining stage: context 4096 -> 32768 with rope_theta 1e4 -> 1e6.
PRESETS: dict[str, dict[str, Any]] = {
    "long-context": {"seq_len": 32768, "rope_theta": 1e6, "max_position_embeddings": 32768},
}


def load_train_config(
    yaml_path: str | Path | None, overrides: dict[str, Any], preset: str | None = None
) -> TrainConfig:
    """Preset values, then YAML values, then every override that is not None."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown training preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    values: dict[str, Any] = dict(PRESETS[preset]) if preset else {}
    if yaml_path is not None:
        loaded = yaml.safe_load(Path(yaml_path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{yaml_path}: expected a mapping of option names to values")
        values.update({k.replace("-", "_"): v for k, v in loaded.items() if k != "preset"})
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown training option(s): {', '.join(unknown)}")
    missing = [k for k in ("model", "data", "out") if k not in values]
    if missing:
        raise ValueError(f"missing required option(s): {', '.join('--' + m for m in missing)}")
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg


def model_config_for(cfg: TrainConfig) -> Any:
    """The model's config with this run's overrides applied (what workers train and export writes)."""
    from moe_core.config import read_model_config

    model_cfg = read_model_config(cfg.model)
    changes = {k: getattr(cfg, k) for k in ("rope_theta", "max_position_embeddings") if getattr(cfg, k) is not None}
    return model_cfg.replace(**changes) if changes else model_cfg
