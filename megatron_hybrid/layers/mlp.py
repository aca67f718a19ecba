"""The feed-forward block: squared ReLU (the hybrid models' default), SwiGLU or GeLU."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatron_hybrid.config import HybridConfig
from megatron_hybrid.layers.init import normal_init, scaled_normal_init
from megatron_hybrid.parallel.state import ParallelGroups
from megatron_hybrid.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron_hybrid.spec import build_module


class _SquaredReLU(torch.autograd.Function):
    """``relu(x)^2`` keeping only ``relu(x)`` for the backward (``d/dx = 2 relu(x)``, zero where x <= 0).

    Autograd of ``square(relu(x))`` saves both x and relu(x) and spends five passes over the [tokens, ffn] activation
    in its backward (the MLP's largest tensor); this takes two.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        positive = F.relu(x)
        ctx.save_for_backward(positive)
        return positive * positive

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        (positive,) = ctx.saved_tensors
        return (grad_out * positive).mul_(2.0)


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """``relu(x)^2``, the Primer / Nemotron-H MLP activation."""
    return _SquaredReLU.apply(x)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """``x`` holds [gate, up] along the last dim (this rank's slice of each)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


ACTIVATION_FUNCTIONS = {"squared_relu": squared_relu, "swiglu": swiglu, "gelu": F.gelu}


@dataclass(frozen=True)
class MLPSubmodules:
    linear_fc1: object = ColumnParallelLinear
    linear_fc2: object = RowParallelLinear


class MLP(nn.Module):
    def __init__(
        self,
        config: HybridConfig,
        groups: ParallelGroups,
        submodules: MLPSubmodules = MLPSubmodules(),
        layer_number: int = 0,
    ) -> None:
        super().__init__()
        self.layer_number = layer_number
        ffn = config.ffn_hidden_size
        if ffn % groups.tp_size:
            raise ValueError(f"tensor parallel size {groups.tp_size} must divide ffn_hidden_size ({ffn})")
        gated = config.activation == "swiglu"
        self.activation = ACTIVATION_FUNCTIONS[config.activation]
        self.linear_fc1 = build_module(
            submodules.linear_fc1,
            config.hidden_size,
            2 * ffn if gated else ffn,
            groups=groups,
            bias=config.add_bias_linear,
            sequence_parallel=config.sequence_parallel,
            init_method=normal_init(config.init_method_std),
            dtype=config.params_dtype,
            tp_components=[ffn, ffn] if gated else None,
        )
        self.linear_fc2 = build_module(
            submodules.linear_fc2,
            ffn,
            config.hidden_size,
            groups=groups,
            bias=config.add_bias_linear,
            input_is_parallel=True,
            sequence_parallel=config.sequence_parallel,
            init_method=scaled_normal_init(config.init_method_std, config.num_layers),
            dtype=config.params_dtype,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.activation(self.linear_fc1(hidden_states)))
