"""The upcycling plan: target Qwen2-MoE config, how dense neurons map to experts, and exact parameter counts.

Everything here reads only config.json, so ``upmoe upcycle --plan`` can size a 57B conversion in a second.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from moe_core.config import ModelConfig, ModelType
from moe_core.params import count_parameters
from moe_core.registry import get_preset
from upcycle.recipe import InitMethod, UpcycleSpec, copies_needed
from upcycle.source import Source


def _moe_shape_of(preset: str) -> dict[str, Any]:
    """The MoE shape flags of a registry preset, so the numbers live in one place (moe_core.registry)."""
    cfg = get_preset(preset)
    return dict(
        num_experts=cfg.num_experts,
        num_shared=cfg.num_shared_experts,
        top_k=cfg.num_experts_per_tok,
        expert_size=cfg.moe_intermediate_size,
        norm_topk_prob=cfg.norm_topk_prob,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        vocab_size=cfg.vocab_size,
    )


# The Qwen2 report's Qwen2-57B-A14B, upcycled from Qwen2-7B (its vocabulary slices the 7B's 152064 rows).
PRESETS: dict[str, dict[str, Any]] = {"qwen2-57b-a14b": _moe_shape_of("qwen2-57b-a14b")}


@dataclass(frozen=True, kw_only=True)
class MoEShape:
    num_experts: int = 64
    num_shared: int = 8
    top_k: int = 8
    expert_size: int | None = None  # None: derived from the dense width
    norm_topk_prob: bool = False
    router_aux_loss_coef: float = 0.001
    vocab_size: int | None = None  # None: the source's


def default_expert_size(dense_width: int) -> int:
    """An eighth of the dense FFN, rounded down to a multiple of 64 when that large (Qwen2-7B: 2368)."""
    size = max(dense_width // 8, 1)
    return size // 64 * 64 if size >= 128 else size


def resolve_shape(preset: str | None, **flags: Any) -> MoEShape:
    """Preset values, then explicit flags (None means 'not given') on top."""
    values: dict[str, Any] = dict(PRESETS[preset]) if preset else {}
    values.update({k: v for k, v in flags.items() if v is not None})
    return MoEShape(**values)


def target_config(source: Source, shape: MoEShape) -> ModelConfig:
    src = source.config
    expert_size = shape.expert_size or default_expert_size(src.intermediate_size)
    return ModelConfig(
        model_type=ModelType.MOE,
        vocab_size=shape.vocab_size or src.vocab_size,
        hidden_size=src.hidden_size,
        intermediate_size=src.intermediate_size,
        num_hidden_layers=src.num_hidden_layers,
        num_attention_heads=src.num_attention_heads,
        num_key_value_heads=src.num_key_value_heads,
        head_dim=src.head_dim,
        max_position_embeddings=src.max_position_embeddings,
        rms_norm_eps=src.rms_norm_eps,
        rope_theta=src.rope_theta,
        rope_scaling=src.rope_scaling,
        tie_word_embeddings=src.tie_word_embeddings,
        initializer_range=src.initializer_range,
        sliding_window=src.sliding_window,
        max_window_layers=src.max_window_layers,
        bos_token_id=src.bos_token_id,
        eos_token_id=src.eos_token_id,
        pad_token_id=src.pad_token_id,
        num_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k,
        moe_intermediate_size=expert_size,
        shared_expert_intermediate_size=shape.num_shared * expert_size,
        norm_topk_prob=shape.norm_topk_prob,
        router_aux_loss_coef=shape.router_aux_loss_coef,
        decoder_sparse_step=1,
    )


@dataclass
class Plan:
    source: Source
    target: ModelConfig
    spec: UpcycleSpec

    @property
    def dense_width(self) -> int:
        return self.source.config.intermediate_size

    @property
    def num_chunks(self) -> int:
        return self.spec.num_experts + self.spec.num_shared

    @property
    def copies(self) -> int:
        return copies_needed(self.num_chunks, self.spec.expert_size, self.dense_width)

    def neuron_map(self) -> list[str]:
        """How dense neurons become experts, in words (the per-layer permutations depend on the seed)."""
        h, f, s = self.spec.expert_size, self.dense_width, self.spec.num_shared
        used, total = self.num_chunks * h, self.copies * f
        if self.spec.init in (InitMethod.QWEN2, InitMethod.PRESERVE, InitMethod.RANDOM):
            lines = [
                f"replicate the FFN {self.copies}x ({self.copies} x {f} = {total:,} neurons), shuffle each copy "
                f"with its own permutation (gate/up rows and down columns together)",
                f"cut {self.num_chunks} chunks of {h}: chunks 0-{s - 1} -> shared expert (fused width {s * h})"
                if s
                else f"cut {self.num_chunks} chunks of {h}",
                f"chunks {s}-{self.num_chunks - 1} -> routed experts 0-{self.spec.num_experts - 1}; "
                f"{total - used:,} neurons of the last copy discarded",
            ]
        elif self.spec.init is InitMethod.DROP_UPCYCLING:
            lines = [f"each of the {self.num_chunks} experts draws its own {h} distinct neurons of the {f}"]
        else:
            lines = [f"{f // h} shards of {h}; routed expert i holds shard i mod {f // h}; router rows shared per copy"]
        if self.spec.init in (InitMethod.QWEN2, InitMethod.DROP_UPCYCLING) and self.spec.reinit_ratio > 0:
            lines.append(
                f"re-initialise {self.spec.reinit_ratio:.0%} of every expert "
                f"({self.spec.reinit_granularity.value}-wise) from N(mean, std) of the dense matrix it replaces"
            )
        if self.spec.init is InitMethod.PRESERVE:
            lines.append("preserve: shared expert = whole FFN (down x2), routed experts' down = 0: dense at step 0")
        if self.spec.init is InitMethod.RANDOM:
            lines = ["random: every tensor drawn fresh (from-scratch baseline with the same shapes)"]
        return lines

    def as_dict(self) -> dict[str, Any]:
        counts = count_parameters(self.target)
        dense = count_parameters(self.source.config)
        return {
            "source_architecture": self.source.architecture,
            "dense_parameters": dense.total,
            "target_config": self.target.to_hf_dict(),
            "recipe": {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(self.spec).items()},
            "copies": self.copies,
            "chunks": self.num_chunks,
            "neuron_map": self.neuron_map(),
            "params_total": counts.total,
            "params_activated": counts.activated,
        }

    def describe(self) -> str:
        d, t = self.as_dict(), self.target
        lines = [
            f"source: {self.source.architecture}, {d['dense_parameters']:,} parameters, FFN width {self.dense_width}",
            f"target: qwen2_moe, {t.num_experts} routed + {self.spec.num_shared} shared experts of "
            f"{t.moe_intermediate_size} (shared fused to {t.shared_expert_intermediate_size}), "
            f"top-{t.num_experts_per_tok}, norm_topk_prob {t.norm_topk_prob}, vocab {t.vocab_size}",
            f"init: {self.spec.init.value}, seed {self.spec.seed}",
            *[f"  {line}" for line in self.neuron_map()],
            f"parameters: {d['params_total']:,} total, {d['params_activated']:,} activated",
        ]
        return "\n".join(lines)
