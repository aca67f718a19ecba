"""Rotary position embedding (RoPE) over the first ``rotary_percent`` of each head, Megatron's non-interleaved form."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, rotary_percent: float = 1.0, base: float = 10000.0) -> None:
        super().__init__()
        rotary_dim = int(head_dim * rotary_percent)
        if rotary_dim % 2:
            raise ValueError(
                f"rotary dimension {rotary_dim} (head_dim {head_dim} x rotary_percent {rotary_percent}) must be even"
            )
        self.rotary_dim = rotary_dim
        self.base = base

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        # Computed on demand rather than registered as a buffer so meta-device construction and checkpoints stay clean.
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device=device) / self.rotary_dim
        return 1.0 / (self.base**exponents)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``position_ids`` [b, s] -> (cos, sin), each [b, s, rotary_dim] in float32."""
        angles = position_ids.float()[..., None] * self.inv_freq(position_ids.device)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of ``x`` [b, heads, s, d]; the rest pass through unchanged."""
    rotary_dim = cos.shape[-1]
    rotated, passthrough = x[..., :rotary_dim], x[..., rotary_dim:]
    first, second = rotated.float().chunk(2, dim=-1)
    cos, sin = cos[:, None], sin[:, None]
    rotated = rotated.float() * cos + torch.cat([-second, first], dim=-1) * sin
    return torch.cat([rotated.to(x.dtype), passthrough], dim=-1)
