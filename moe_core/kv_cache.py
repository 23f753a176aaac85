"""A preallocated KV cache for batched incremental decoding of sequences of different lengths.

Shape legend: L layers, N slots (sequences the cache can hold), H_kv kv heads, M max tokens per slot,
d head dim. A sequence lives in one slot; ``lengths[slot]`` counts its cached tokens. A forward pass over
rows (slot_b, new tokens) writes each row's keys/values at positions lengths[slot_b] + 0..T-1 and attends
to positions ≤ its own, so rows of different lengths share one batch without padding the cache.
Right-padding tokens of a row (beyond its input length) write to one extra scratch column M that no real
token ever attends to, so padding neither overflows a nearly full slot nor overwrites real entries.
"""

from __future__ import annotations

import torch

from moe_core.config import ModelConfig
from moe_core.host_reads import any_true, max_value


class CacheFullError(RuntimeError):
    """A write would run past the slot's capacity."""


class KVCache:
    def __init__(
        self,
        cfg: ModelConfig,
        num_slots: int,
        max_tokens: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (cfg.num_hidden_layers, num_slots, cfg.num_key_value_heads, max_tokens + 1, cfg.attn_head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.max_tokens = max_tokens

    @property
    def num_slots(self) -> int:
        return self.lengths.shape[0]

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def positions(self, slots_B: torch.Tensor, num_new: int, input_lengths_B: torch.Tensor) -> torch.Tensor:
        """Positions [B, T] of the next tokens of each row; padding (t >= input length) maps to the scratch column."""
        start_B = self.lengths[slots_B]
        end_B = start_B + input_lengths_B.to(start_B.device)
        if any_true(end_B > self.max_tokens):
            row = int(torch.argmax((end_B > self.max_tokens).int()))
            raise CacheFullError(
                f"KV cache slot {int(slots_B[row])} holds {self.max_tokens} tokens; writing "
                f"{int(input_lengths_B[row])} more after {int(start_B[row])} would overflow"
            )
        steps_T = torch.arange(num_new, device=start_B.device)
        positions_BT = start_B[:, None] + steps_T
        is_padding = steps_T[None, :] >= input_lengths_B.to(start_B.device)[:, None]
        return positions_BT.masked_fill(is_padding, self.max_tokens)

    def write_and_read(
        self, layer: int, slots_B: torch.Tensor, positions_BT: torch.Tensor, k_BHTd: torch.Tensor, v_BHTd
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values; return this layer's keys/values for the rows up to their last position."""
        rows = slots_B[:, None]
        self.k[layer][rows, :, positions_BT] = k_BHTd.transpose(1, 2).to(self.k.dtype)
        self.v[layer][rows, :, positions_BT] = v_BHTd.transpose(1, 2).to(self.v.dtype)
        # Real tokens see keys up to their own position; padding rows (scratch position) see all, harmlessly.
        visible = max_value(positions_BT, assumed=self.max_tokens) + 1
        return self.k[layer][slots_B, :, :visible], self.v[layer][slots_B, :, :visible]

    def advance(self, slots_B: torch.Tensor, num_new_B: torch.Tensor) -> None:
        self.lengths[slots_B] += num_new_B.to(self.lengths.device)

    def reset(self, slots: torch.Tensor | list[int] | None = None) -> None:
        """Free slots (all when None) for new sequences; their old contents are simply overwritten later."""
        if slots is None:
            self.lengths.zero_()
        else:
            self.lengths[torch.as_tensor(slots, dtype=torch.long, device=self.lengths.device)] = 0
