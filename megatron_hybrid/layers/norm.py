"""RMSNorm, the only normalisation the hybrid models use."""

from __future__ import annotations

import torch
from torch import nn

from megatron_hybrid.config import HybridConfig
from megatron_hybrid.ops import rms_norm
from megatron_hybrid.spec import build_module


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension with a learned scale (initialised to one).

    ``sequence_parallel`` marks the weight so its gradient, computed on a slice of the sequence, is summed over the
    tensor-parallel group before the optimizer step.
    """

    def __init__(
        self, hidden_size: int, eps: float = 1e-5, sequence_parallel: bool = False, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.weight.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_and_norm(
        self, update: torch.Tensor, residual: torch.Tensor, residual_in_fp32: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(stream), stream)`` with ``stream = residual + update`` (float32 with ``residual_in_fp32``), the
        norm reading the stream in ``update``'s dtype: the previous layer's residual add and this norm, one kernel on
        CUDA (``ops.rms_norm`` with ``residual=``), the same arithmetic as the separate add and norm."""
        return rms_norm(
            update, self.weight, self.eps, residual=residual, prenorm=True, residual_in_fp32=residual_in_fp32
        )

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def build_norm(spec: object, config: HybridConfig) -> nn.Module:
    """Build the norm named by ``spec`` over the hidden size, with the config's epsilon, precision and SP marking."""
    return build_module(
        spec,
        config.hidden_size,
        eps=config.norm_epsilon,
        sequence_parallel=config.sequence_parallel,
        dtype=config.params_dtype,
    )
