"""Rotary position embeddings: plain RoPE with rope_theta, linear scaling, and YaRN as transformers defines it.

YaRN (Peng et al. 2023) blends, per frequency, the original ("extrapolated") and the position-interpolated
frequency with a linear ramp between two correction dimensions, and scales cos/sin by an attention factor
0.1·ln(factor)+1. The ramp bounds come from beta_fast/beta_slow rotations over the original context.
"""

from __future__ import annotations

import math

import torch

from moe_core.config import ModelConfig


def _plain_inv_freq(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(dim: int, theta: float, scaling: dict, max_positions: int) -> tuple[torch.Tensor, float]:
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or max_positions / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # The dimension whose wavelength fits `rotations` full turns in the original context.
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp

    extrapolated = _plain_inv_freq(dim, theta)
    interpolated = extrapolated / factor
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep_original = 1 - ramp
    inv_freq = interpolated * (1 - keep_original) + extrapolated * keep_original
    return inv_freq, float(attention_factor)


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2] fp32, cos/sin scale) for this config."""
    dim, theta, scaling = cfg.attn_head_dim, cfg.rope_theta, cfg.rope_scaling
    if scaling is None or scaling["rope_type"] == "default":
        return _plain_inv_freq(dim, theta), 1.0
    if scaling["rope_type"] == "linear":
        return _plain_inv_freq(dim, theta) / scaling["factor"], 1.0
    return _yarn(dim, theta, scaling, cfg.max_position_embeddings)


def rope_cos_sin(
    inv_freq: torch.Tensor, scale: float, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape positions.shape + [head_dim], computed in fp32 then cast like transformers does."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    angles = torch.cat((freqs, freqs), dim=-1)
    return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, hd] with cos/sin [B, T, hd] (rotate-half convention of Qwen2/Llama)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
