"""One rank's share of a model replica: the model (all of attention, its own experts) and its KV cache.

``ModelShard`` executes the engine's steps. With EP = 1 it is the whole replica (``LocalRunner``); in an
expert-parallel gang every rank holds one and runs the same steps in the same order (``serve.gang``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moe_core import state_dict_adapter
from moe_core.config import ModelConfig, read_model_config
from moe_core.generate import pad_right
from moe_core.kv_cache import KVCache
from moe_core.loading import load_model
from moe_core.model import CausalLM, CausalLMOutput
from moe_core.permute import expert_counts
from moe_core.state_dict_adapter import ExpertSplitError, expert_block
from serve.engine import StepOutput

DEFAULT_MAX_SEQ_LEN = 8192  # without --max-seq-len: the model's context, capped so the cache stays modest


@dataclass(frozen=True)
class ShardSpec:
    model_dir: str
    num_slots: int
    max_seq_len: int
    dtype: torch.dtype
    device: str
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
        self.model: CausalLM = model.eval()
        cfg = model.config
        self.config = cfg
        self.cache = KVCache(cfg, spec.num_slots, spec.max_seq_len, dtype=spec.dtype, device=spec.device)
        self.device = torch.device(spec.device)
        self.num_slots = spec.num_slots
        self.max_seq_len = spec.max_seq_len

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], slots: list[int], all_logits: list[bool] | None = None) -> StepOutput:
        """Start new sequences in ``slots`` (whatever the slots held before is forgotten). ``all_logits[b]``:
        also return row b's logits at every prompt position (for prompt logprobs)."""
        slots_B = torch.tensor(slots, dtype=torch.long, device=self.device)
        self.cache.reset(slots_B)
        ids_BT, lengths_B = pad_right(prompts)
        lengths_B = lengths_B.to(self.device)
        every = any(all_logits or ())
        out = self.model(
            ids_BT.to(self.device), cache=self.cache, slots_B=slots_B, input_lengths_B=lengths_B, last_only=not every
        )
        real_T = (torch.arange(ids_BT.shape[1], device=self.device)[None, :] < lengths_B[:, None]).reshape(-1)
        counts = self._expert_counts(out, real_T)
        if not every:
            return StepOutput(out.logits.float(), counts)
        last_BV = out.logits[torch.arange(len(prompts), device=self.device), lengths_B - 1].float()
        rows = tuple(
            out.logits[b, : len(p)].float() if wanted else None
            for b, (p, wanted) in enumerate(zip(prompts, all_logits or (), strict=True))
        )
        return StepOutput(last_BV, counts, rows)

    @torch.inference_mode()
    def decode(self, tokens: list[int], slots: list[int]) -> StepOutput:
        slots_B = torch.tensor(slots, dtype=torch.long, device=self.device)
        ids_B1 = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        out = self.model(ids_B1, cache=self.cache, slots_B=slots_B, last_only=True)
        return StepOutput(out.logits.float(), self._expert_counts(out, None))

    def _expert_counts(self, out: CausalLMOutput, real_T: torch.Tensor | None) -> torch.Tensor | None:
        """Tokens each expert received per MoE layer, padding excluded: the load this endpoint sees."""
        if not out.routings:
            return None
        counts = [expert_counts(r.experts_TK, self.config.num_experts, real_T) for r in out.routings]
        return torch.stack(counts).cpu()


class LocalRunner:
    """EP = 1: the replica's own process runs the whole model."""

    def __init__(self, spec: ShardSpec) -> None:
        self.shard = ModelShard(spec)
        self.num_slots = spec.num_slots
        self.max_seq_len = spec.max_seq_len

    def prefill(self, prompts: list[list[int]], slots: list[int], all_logits: list[bool] | None = None) -> StepOutput:
        return self.shard.prefill(prompts, slots, all_logits)

    def decode(self, tokens: list[int], slots: list[int]) -> StepOutput:
        return self.shard.decode(tokens, slots)
