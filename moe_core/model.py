"""Qwen2 dense and Qwen2-MoE causal language models, written as single-device PyTorch.

Module and parameter names follow the HF checkpoint keys (``model.layers.{i}.self_attn.q_proj`` ...), so the
key map in ``state_dict_adapter`` only has to translate the stacked expert weights. Parallelism (expert parallel
dispatch, DeepSpeed) is applied from outside.

Shape legend: B batch, T new tokens, S visible key positions, D hidden, H q heads, H_kv kv heads, d head dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint, noop_context_fn

from moe_core.config import ModelConfig
from moe_core.experts import ExpertBackend
from moe_core.kv_cache import PagedStep, paged_attention
from moe_core.layers import MLP, RMSNorm
from moe_core.moe import MoE, Routing
from moe_core.rope import apply_rope, rope_cos_sin, rope_frequencies


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B, T, V]; [R, V] for a paged step (R: its logit rows)
    routings: list[Routing] = field(default_factory=list)  # one per MoE layer, in layer order

    @property
    def router_logits(self) -> list[torch.Tensor]:
        return [r.logits_TE for r in self.routings]


@dataclass(frozen=True)
class ExpertPlacement:
    """Which routed experts every MoE layer owns, and how it computes them."""

    first: int = 0
    count: int | None = None  # None: all experts from ``first`` on
    backend: ExpertBackend | str | None = None


@dataclass
class AttentionContext:
    """What every layer needs to attend: rotary tables, and the step over the paged KV cache when serving."""

    cos: torch.Tensor
    sin: torch.Tensor
    step: PagedStep | None = None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        d, hd = cfg.hidden_size, cfg.attn_head_dim
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            hd,
        )
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=False)

    def forward(self, x_BTD: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        b, t, _ = x_BTD.shape
        q = self.q_proj(x_BTD).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x_BTD).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_BTD).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if ctx.step is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # one packed row of the step's tokens: [1, H, N, d] -> [N, H, d] and back
            packed = [t[0].transpose(0, 1) for t in (q, k, v)]
            out = paged_attention(self.layer_idx, *packed, ctx.step).transpose(0, 1)[None]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, experts: ExpertPlacement) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp: nn.Module
        if self.is_moe:
            self.mlp = MoE(
                cfg,
                first_expert=experts.first,
                num_local_experts=experts.count,
                backend=experts.backend,
            )
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x_BTD: torch.Tensor, ctx: AttentionContext) -> tuple[torch.Tensor, Routing | None]:
        h = x_BTD + self.self_attn(self.input_layernorm(x_BTD), ctx)
        mlp_in = self.post_attention_layernorm(h)
        if self.is_moe:
            mlp_out, routing = self.mlp(mlp_in)
            return h + mlp_out, routing
        return h + self.mlp(mlp_in), None


class Backbone(nn.Module):
    """Embeddings, decoder layers and final norm (HF's ``model.*`` prefix)."""

    def __init__(self, cfg: ModelConfig, experts: ExpertPlacement) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, experts) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """Qwen2ForCausalLM / Qwen2MoeForCausalLM, by ``cfg.model_type``.

    ``first_expert``/``num_local_experts`` build every MoE layer owning only that contiguous block of
    routed experts (expert parallelism); by default it owns all of them.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        expert_backend: ExpertBackend | str | None = None,
        first_expert: int = 0,
        num_local_experts: int | None = None,
    ) -> None:
        super().__init__()
        self.config = cfg
        self.expert_placement = ExpertPlacement(first_expert, num_local_experts, expert_backend)
        self.model = Backbone(cfg, self.expert_placement)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        inv_freq, scale = rope_frequencies(cfg)
        self.register_buffer("rope_inv_freq", inv_freq, persistent=False)
        self.rope_scale = scale
        self.activation_checkpointing = False
        # torch.utils.checkpoint's context_fn: the contexts of the forward and of its recomputation in backward.
        # torch re-enters a real autocast itself; an emulated one (moe_core.fake_devices) must be re-entered here.
        self.checkpoint_contexts: Callable[[], tuple[Any, Any]] = noop_context_fn

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (after materialising a model built on the meta device)."""
        self.rope_inv_freq.copy_(rope_frequencies(self.config)[0])
        for moe in self.moe_layers():
            moe.gate.selection_bias.zero_()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> CausalLM:
        # Module.to(dtype) casts buffers too. Rotary frequencies in bf16 are off by up to 4.7 rad at position
        # 4095, and a bf16 selection bias cannot take small steps: both stay fp32 whatever the weights' dtype.
        super()._apply(fn, recurse)
        if self.rope_inv_freq.dtype != torch.float32:
            self.rope_inv_freq = rope_frequencies(self.config)[0].to(self.rope_inv_freq.device)
        for moe in self.moe_layers():
            if moe.gate.selection_bias.dtype != torch.float32:
                moe.gate.selection_bias = moe.gate.selection_bias.float()
        return self

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.model.layers if layer.is_moe]

    def set_expert_backend(self, backend: ExpertBackend | str) -> None:
        for moe in self.moe_layers():
            moe.experts.backend = ExpertBackend(backend)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random init as transformers does: N(0, initializer_range) matrices, zero biases, unit norms."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=generator)

    def forward(self, input_ids_BT: torch.Tensor, *, step: PagedStep | None = None) -> CausalLMOutput:
        """Logits for ``input_ids``.

        Without a step: a plain causal forward over whole sequences (training, evaluation), logits [B, T, V].
        With a ``step`` over the paged KV cache (serving):
        ``input_ids`` [1, N] are the step's packed tokens, and the logits are [R, V] at ``step.logit_rows``.
        """
        b, t = input_ids_BT.shape
        device = input_ids_BT.device
        if step is None:
            positions_BT = torch.arange(t, device=device).expand(b, t)
        else:
            positions_BT = step.positions_N[None]
        x = self.model.embed_tokens(input_ids_BT)
        cos, sin = rope_cos_sin(self.rope_inv_freq, self.rope_scale, positions_BT, x.dtype)
        ctx = AttentionContext(cos=cos, sin=sin, step=step)
        routings: list[Routing] = []
        for layer in self.model.layers:
            if self.activation_checkpointing and self.training:
                x, routing = checkpoint(layer, x, ctx, use_reentrant=False, context_fn=self.checkpoint_contexts)
            else:
                x, routing = layer(x, ctx)
            if routing is not None:
                routings.append(routing)
        if step is not None:
            x = x[0].index_select(0, step.logit_rows)
        logits = self.lm_head(self.model.norm(x))
        return CausalLMOutput(logits=logits, routings=routings)


def next_token_loss(logits_BTV: torch.Tensor, input_ids_BT: torch.Tensor, *, per_row: bool = False) -> torch.Tensor:
    """Mean cross-entropy of predicting tokens 2..T from their prefixes (fp32); ``per_row``: one mean per row."""
    b, t, v = logits_BTV.shape
    losses = F.cross_entropy(
        logits_BTV[:, :-1].reshape(-1, v).float(),
        input_ids_BT[:, 1:].reshape(-1),
        reduction="none" if per_row else "mean",
    )
    return losses.view(b, t - 1).mean(dim=1) if per_row else losses
