"""One rank's share of a model replica: the model (all of attention, its own experts) and its paged KV cache.

``ModelShard`` executes the engine's steps. With EP = 1 it is the whole replica (``LocalRunner``); in an
expert-parallel gang every rank holds one and runs the same steps in the same order (``serve.gang``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moe_core import onednn, state_dict_adapter
from moe_core.config import ModelConfig, read_model_config
from moe_core.generate import run_step
from moe_core.kv_cache import DEFAULT_BLOCK_SIZE, PagedKVCache, StepRow
from moe_core.loading import load_model
from moe_core.model import CausalLM, CausalLMOutput
from moe_core.permute import expert_counts
from moe_core.state_dict_adapter import ExpertSplitError, expert_block
from serve.engine import StepOutput

DEFAULT_MAX_SEQ_LEN = 8192  # without --max-seq-len: the model's context, capped so the cache stays modest


@dataclass(frozen=True)
class ShardSpec:
    model_dir: str
    num_blocks: int
    max_seq_len: int
    dtype: torch.dtype
    device: str
    block_size: int = DEFAULT_BLOCK_SIZE
    ep_rank: int = 0
    ep_size: int = 1


def serving_context(cfg: ModelConfig, requested: int | None) -> int:
    if requested is None:
        return min(cfg.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
    if requested > cfg.max_position_embeddings:
        raise ValueError(
            f"--max-seq-len {requested} exceeds the model's context ({cfg.max_position_embeddings} tokens)"
        )
    return requested


def check_expert_split(model_dir: str | Path, ep_size: int) -> ModelConfig:
    cfg = read_model_config(model_dir)
    if ep_size > 1 and not cfg.is_moe:
        raise ValueError(f"--ep {ep_size} needs a MoE model; {model_dir} is dense")
    if cfg.is_moe:
        try:
            state_dict_adapter.check_expert_split(cfg.num_experts, ep_size)
        except ExpertSplitError:
            raise ValueError(f"--ep {ep_size} must divide the routed expert count {cfg.num_experts}") from None
    return cfg


class ModelShard:
    def __init__(self, spec: ShardSpec, model: CausalLM | None = None) -> None:
        """Load this rank's part of ``spec.model_dir``, or take ``model`` built already (the fake-device
        harness builds one with no weights to read)."""
        if model is None:
            cfg = check_expert_split(spec.model_dir, spec.ep_size)
            first, count = expert_block(cfg.num_experts, spec.ep_size, spec.ep_rank) if cfg.is_moe else (0, None)
            model = load_model(
                spec.model_dir,
                dtype=spec.dtype,
                device=spec.device,
                first_expert=first,
                num_local_experts=count,
            )
            if onednn.available(spec.device, spec.dtype):
                # Decode is bound by reading weights: oneDNN's layout reads them ~2x faster on a CPU.
                onednn.pack_for_cpu_inference(model)
        self.model: CausalLM = model.eval()
        self.config = model.config
        self.cache = PagedKVCache(self.config, spec.num_blocks, spec.block_size, dtype=spec.dtype, device=spec.device)

    @torch.inference_mode()
    def step(self, rows: list[StepRow]) -> StepOutput:
        out = run_step(self.model, self.cache, rows)
        return StepOutput(out.logits.float(), self._expert_counts(out))

    def _expert_counts(self, out: CausalLMOutput) -> torch.Tensor | None:
        """Tokens each expert received per MoE layer: the load this endpoint sees."""
        if not out.routings:
            return None
        counts = [expert_counts(r.experts_TK, self.config.num_experts) for r in out.routings]
        return torch.stack(counts).cpu()


class LocalRunner:
    """EP = 1: the replica's own process runs the whole model."""

    def __init__(self, spec: ShardSpec) -> None:
        self.shard = ModelShard(spec)
        self.num_blocks, self.block_size, self.max_seq_len = spec.num_blocks, spec.block_size, spec.max_seq_len

    def step(self, rows: list[StepRow]) -> StepOutput:
        return self.shard.step(rows)
