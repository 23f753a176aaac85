"""Training telemetry: FLOPs and MFU, expert-load metrics and heatmaps, and a rank-0 W&B + JSONL tracker.

The tracker is the one place that talks to Weights & Biases, so the training loop can call it on every rank
without ``if rank == 0`` guards and without caring whether W&B is installed, logged in, or reachable:
``metrics.jsonl`` is always written (on rank 0) and is the record the driver and the tests read back, while
W&B is a best-effort mirror. Functions here take values and return values; only ``Tracker`` has state.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import string
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from moe_core.config import ModelConfig
from moe_core.losses import load_stats
from moe_core.moe import Routing
from moe_core.params import count_parameters
from moe_core.permute import expert_counts

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- FLOPs and MFU

# Peak dense FLOP/s per device, used as the MFU denominator. They are conventions, not measurements: MFU is
# only comparable between runs that use the same figure. Edit the dict or pass ``peak_flops`` to override;
# ``UPMOE_PEAK_FLOPS`` in the environment overrides ``default_peak_flops`` everywhere (e.g. on a Ray cluster).
DEFAULT_PEAK_FLOPS: dict[str, float] = {
    # A rough figure for a 2-core AVX-512 machine in fp32: theory is ~2 cores x ~3 GHz x 32 FLOP/cycle
    # (one 512-bit FMA pipe) ~ 2e11, and a well-tuned sgemm sustains about half of it. CPU MFU is a
    # relative number for comparing changes on the same box, not an efficiency claim.
    "cpu": 1e11,
    # NVIDIA H100 SXM dense tensor-core peaks (the sparsity figures are 2x these); H200 has the same compute.
    "cuda-h100-bf16": 989e12,
    "cuda-h100-fp16": 989e12,
    "cuda-h100-tf32": 494.7e12,
    "cuda-h100-fp32": 66.9e12,  # plain fp32 without TF32 (CUDA cores)
}

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of a sequence of ``seq_len`` tokens.

    ``6 * N + 6 * L * s * d_attn`` with
    - N: activated parameters that take part in a matmul, i.e. ``count_parameters(cfg).activated`` minus
      the input embedding table (vocab * hidden), which is a lookup. With tied embeddings that one matrix
      is also the lm_head matmul, so nothing is subtracted. Norms and biases are counted too (negligible).
      6 = 2 FLOPs per multiply-add x (1 forward + 2 backward).
    - the attention scores and weighted sum, which have no parameters: QK^T and AV cost 2 * 2 * s * d_attn
      per token and layer forward, half of it under the causal mask, times 3 for forward + backward:
      ``12 * L * s * d_attn / 2`` with L = num_hidden_layers and d_attn = num_attention_heads * head_dim.
    This is the PaLM / Megatron MFU convention (no recomputation counted), so numbers compare with papers.
    """
    embedding_lookup = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    matmul_params = count_parameters(cfg).activated - embedding_lookup
    d_attn = cfg.num_attention_heads * cfg.attn_head_dim
    return 6.0 * matmul_params + 6.0 * cfg.num_hidden_layers * seq_len * d_attn


def mfu(tokens_per_s: float, cfg: ModelConfig, seq_len: int, peak_flops: float, *, num_devices: int = 1) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the peak of the devices that achieved it.

    ``tokens_per_s`` and the devices must match: the global throughput with ``num_devices = world size``,
    or one rank's throughput with ``num_devices = 1``.
    """
    if peak_flops <= 0 or num_devices <= 0:
        raise ValueError(f"peak_flops and num_devices must be positive, got {peak_flops} and {num_devices}")
    return tokens_per_s * flops_per_token(cfg, seq_len) / (peak_flops * num_devices)


def default_peak_flops(device_type: str, dtype: torch.dtype) -> float:
    """The peak FLOP/s of one device of this type for matmuls in ``dtype`` (NaN if unknown, with a warning).

    NaN rather than an exception or a guess, so an unknown GPU gives an obviously missing MFU instead of a
    crashed run or a wrong number. ``UPMOE_PEAK_FLOPS`` (a float) overrides the table.
    """
    override = os.environ.get("UPMOE_PEAK_FLOPS")
    if override:
        return float(override)
    if device_type == "cpu":
        return DEFAULT_PEAK_FLOPS["cpu"]
    key = f"{device_type}-{_gpu_family(device_type)}-{_DTYPE_NAMES.get(dtype, str(dtype))}"
    if key in DEFAULT_PEAK_FLOPS:
        return DEFAULT_PEAK_FLOPS[key]
    warnings.warn(f"no peak FLOP/s known for {key!r}; MFU will be NaN (set UPMOE_PEAK_FLOPS)", stacklevel=2)
    return math.nan


def _gpu_family(device_type: str) -> str:
    """'h100' for H100 and H200 (same compute, more memory), else the lower-cased device name."""
    if device_type != "cuda" or not torch.cuda.is_available():
        return "unknown"
    name = torch.cuda.get_device_name().lower()
    return "h100" if ("h100" in name or "h200" in name) else name.replace(" ", "-")


# ---------------------------------------------------------------------------------------------- expert load


def routing_counts(routings: Sequence[Routing], num_experts: int) -> torch.Tensor:
    """[L, E] top-k assignments per expert for each MoE layer of one forward (int64, on the routings' device).

    Local to this rank: all-reduce (sum) over the data-parallel group before ``expert_load_metrics``.
    """
    if not routings:
        return torch.zeros(0, num_experts, dtype=torch.long)
    return torch.stack([expert_counts(r.experts_TK.detach(), num_experts) for r in routings])


def expert_load_metrics(counts_LE: torch.Tensor) -> dict[str, float]:
    """Per-layer and averaged load-balance metrics from global expert counts [num_moe_layers, num_experts].

    ``layer{i}`` is the i-th MoE layer (the i-th row), not necessarily decoder layer i when some layers are
    dense. max/mean is 1 and cv 0 at perfect balance; a dead expert got no token in the counted window.
    """
    out: dict[str, float] = {}
    per_layer = [load_stats(counts_LE[i]) for i in range(counts_LE.shape[0])]
    for i, stats in enumerate(per_layer):
        out[f"load/layer{i}/max_over_mean"] = stats["max_over_mean"]
        out[f"load/layer{i}/cv"] = stats["cv"]
        out[f"load/layer{i}/dead_experts"] = float(stats["dead_experts"])
    if per_layer:
        out["load/cv_mean"] = sum(s["cv"] for s in per_layer) / len(per_layer)
        out["load/max_over_mean_mean"] = sum(s["max_over_mean"] for s in per_layer) / len(per_layer)
        out["load/dead_experts_total"] = float(sum(s["dead_experts"] for s in per_layer))
    return out


def _pyplot() -> Any:
    """pyplot on the Agg backend: workers have no display, and the import is slow, so only when plotting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# No "Software: matplotlib x.y" chunk, so the same counts give byte-identical files.
_PNG_METADATA: dict[str, Any] = {"Software": None}


def load_heatmap_png(counts_LE: torch.Tensor, path: Path) -> Path:
    """Heatmap of each layer's expert load over that layer's mean (white = balanced, blue = idle, red = hot).

    The colour scale is centred on 1 so that imbalance reads the same whatever the token count.
    """
    from matplotlib.colors import TwoSlopeNorm

    plt = _pyplot()
    counts = counts_LE.detach().double().cpu()
    mean = counts.mean(dim=1, keepdim=True)
    load = torch.where(mean > 0, counts / mean.clamp_min(1e-12), torch.zeros_like(counts)).numpy()
    num_layers, num_experts = load.shape
    fig, ax = plt.subplots(figsize=(min(2 + 0.12 * num_experts, 20), min(1.5 + 0.25 * num_layers, 16)))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(load.max(initial=0.0))))
    image = ax.imshow(load, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title("expert load / layer mean")
    fig.colorbar(image, ax=ax, label="load / mean")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata=_PNG_METADATA)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- loss curve


def read_metrics(metrics_jsonl: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl, last row winning per step (a restart redoes steps), in step order.

    A torn last line (a worker killed mid-write) is skipped rather than failing the whole read.
    """
    by_step: dict[int, dict[str, Any]] = {}
    if not Path(metrics_jsonl).exists():
        return []
    for line in Path(metrics_jsonl).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


def write_loss_curve(metrics_jsonl: Path, out_png: Path) -> Path | None:
    """Plot lm_loss (the total ``loss`` and the held-out ``eval_loss`` when logged) against step; None if there is
    nothing to plot."""
    rows = read_metrics(metrics_jsonl)
    series = {
        label: [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        for key, label in (("lm_loss", "LM loss"), ("loss", "total loss"), ("eval_loss", "held-out LM loss"))
    }
    series = {label: points for label, points in series.items() if points}
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, points in series.items():
        ax.plot([s for s, _ in points], [v for _, v in points], label=label, marker="o" if len(points) < 3 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100, metadata=_PNG_METADATA)
    plt.close(fig)
    return out_png


# ---------------------------------------------------------------------------------------------- tracker

MODES = ("online", "offline", "disabled")
_LEGACY_MODES = {"dryrun": "offline", "run": "online"}
RUN_ID_FILE = "wandb_run_id"
METRICS_FILE = "metrics.jsonl"


def resolve_mode(mode: str | None) -> str:
    """An explicit mode wins; else ``WANDB_MODE``; else online iff ``WANDB_API_KEY`` is set, offline otherwise.

    Offline by default because a training job must not stall on a login prompt or a missing network.
    """
    if mode is not None:
        mode = _LEGACY_MODES.get(mode, mode)
        if mode not in MODES:
            raise ValueError(f"W&B mode must be one of {MODES} or None, got {mode!r}")
        return mode
    env = _LEGACY_MODES.get(os.environ.get("WANDB_MODE", ""), os.environ.get("WANDB_MODE", ""))
    if env in MODES:
        return env
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def stable_run_id(run_dir: Path) -> str:
    """The run's W&B id, created once in ``run_dir/wandb_run_id`` so restarts resume the same W&B run."""
    path = Path(run_dir) / RUN_ID_FILE
    if path.exists() and path.read_text().strip():
        return path.read_text().strip()
    alphabet = string.ascii_lowercase + string.digits
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(run_id + "\n")
    tmp.replace(path)  # atomic: a crash never leaves an empty id that a restart would replace
    return run_id


_OFFLINE_RUN = re.compile(r"offline-run-(\d{8}_\d{6})-[^-]+(?:-(\d+))?$")


def offline_run_dirs(run_dir: Path) -> list[Path]:
    """The W&B offline run directories under ``run_dir``, oldest first (one per (re)start).

    Names are ``offline-run-<YYYYmmdd_HHMMSS>-<id>``, with ``-1``, ``-2``... added when a restart falls in the
    same second, so they sort by (time, suffix) rather than as strings.
    """

    def order(path: Path) -> tuple[str, int]:
        match = _OFFLINE_RUN.match(path.name)
        return (match.group(1), int(match.group(2) or 0)) if match else (path.name, 0)

    return sorted((Path(run_dir) / "wandb").glob("offline-run-*"), key=order)


def sync_hint(run_dir: Path) -> str | None:
    """The shell command that uploads the offline runs, or None if there are none.

    Each restart writes its own offline directory under the same run id; plain ``wandb sync`` of a later one
    replaces the history of an earlier one, so later directories are appended (metrics.jsonl stays complete).
    """
    dirs = offline_run_dirs(run_dir)
    if not dirs:
        return None
    commands = [f"wandb sync {dirs[0]}", *(f"wandb sync --append {d}" for d in dirs[1:])]
    return " && ".join(commands)


def _jsonable(value: Any) -> Any:
    """Tensors and numpy scalars as Python numbers, anything else as its string (a log line must not fail)."""
    if hasattr(value, "item"):
        try:
            return value.item()
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(value)


class Tracker:
    """Metrics for one training run: constructed and called on every rank, acts on rank 0 only.

    Rank 0 appends ``{"step": step, **metrics}`` to ``run_dir/metrics.jsonl`` and mirrors it to W&B
    (``run_dir/wandb``), under a run id kept in ``run_dir/wandb_run_id`` so restarts resume one W&B run.
    W&B plots use ``step`` as their x axis rather than W&B's own ``_step``, so steps redone after a restart
    are kept (W&B drops rows whose ``step=`` goes backwards). Any W&B failure (not installed, no network,
    init timeout) is warned about once, and the run goes on with metrics.jsonl alone.
    """

    def __init__(
        self,
        run_dir: Path,
        rank: int,
        config: Mapping[str, Any],
        project: str | None = None,
        mode: str | None = None,
        *,
        name: str | None = None,
        resume_step: int | None = None,
        init_timeout_s: float = 90.0,
    ) -> None:
        """``resume_step``: on a restart from a checkpoint at that step, forget metrics.jsonl rows after it."""
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.mode = resolve_mode(mode)  # validated on every rank, so a bad mode fails everywhere alike
        self.project = project or "upmoe"
        self.run_id: str | None = None
        self.metrics_path = self.run_dir / METRICS_FILE
        self._run: Any = None
        self._warned = False
        if rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step)
        if self.mode != "disabled":
            self.run_id = stable_run_id(self.run_dir)
            self._run = self._init_wandb(dict(config), name, init_timeout_s)

    @property
    def active(self) -> bool:
        """Whether this process is the one that records (rank 0)."""
        return self.rank == 0

    @property
    def wandb_enabled(self) -> bool:
        """Whether metrics are mirrored to W&B (False on other ranks, when disabled, or after a failure)."""
        return self._run is not None

    def _truncate_after(self, step: int) -> None:
        if not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a torn line from a killed worker
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def _init_wandb(self, config: dict[str, Any], name: str | None, init_timeout_s: float) -> Any:
        try:
            import wandb

            settings = wandb.Settings(console="off", silent=True, init_timeout=init_timeout_s)
            run = wandb.init(
                project=self.project,
                name=name,
                id=self.run_id,
                resume="allow",
                dir=str(self.run_dir),
                mode=self.mode,
                config=config,
                allow_val_change=True,  # a resumed run may extend steps or change the lr schedule
                reinit="create_new",  # this run only: never finish or reuse another run of the process
                settings=settings,
            )
            run.define_metric("step")
            run.define_metric("*", step_metric="step")
        except Exception as e:  # W&B must never take the training run down
            self._warn(f"W&B init failed ({type(e).__name__}: {e}); logging to {self.metrics_path} only")
            return None
        if self.mode == "offline":
            print(f"W&B offline run in {self.run_dir / 'wandb'}; upload later with: wandb sync <offline-run dir>")
        return run

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            logger.warning(message)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Record one step's metrics (scalars): a metrics.jsonl line and a W&B history row."""
        if self.rank != 0:
            return
        row = {"step": step, **{k: v for k, v in metrics.items() if k != "step"}}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row, default=_jsonable) + "\n")
        self._wandb_log(row)

    def log_image(self, key: str, png_path: Path, step: int) -> None:
        """Attach an image (e.g. the expert-load heatmap) to W&B at this step; not written to metrics.jsonl."""
        if self.rank != 0 or self._run is None:
            return
        try:
            import wandb

            image = wandb.Image(str(png_path))
        except Exception as e:
            self._warn(f"W&B image {png_path} not logged ({type(e).__name__}: {e})")
            return
        self._wandb_log({"step": step, key: image})

    def _wandb_log(self, row: dict[str, Any]) -> None:
        if self._run is None:
            return
        try:
            self._run.log(row)
        except Exception as e:
            self._warn(f"W&B log failed ({type(e).__name__}: {e}); W&B logging stopped, metrics.jsonl goes on")
            self._run = None

    def finish(self) -> None:
        """Close the W&B run and draw ``run_dir/loss.png`` from metrics.jsonl. Safe to call twice."""
        if self.rank != 0:
            return
        run, self._run = self._run, None
        if run is not None:
            try:
                run.finish()
            except Exception as e:
                self._warn(f"W&B finish failed ({type(e).__name__}: {e})")
            hint = sync_hint(self.run_dir) if self.mode == "offline" else None
            if hint:
                print(f"W&B offline run saved; upload with: {hint}")
        write_loss_curve(self.metrics_path, self.run_dir / "loss.png")

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()
