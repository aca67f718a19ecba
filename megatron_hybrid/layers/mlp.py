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


class _SquaredReLUMLP(torch.autograd.Function):
    """``fc2(relu(fc1(x))^2)`` for a tensor-parallel size 1 MLP without biases, as one autograd node (CPU path).

    Same GEMMs and the same values as the three separate ops (bit for bit), with fewer passes over the [tokens, ffn]
    activations, which are 4x the width of the layer's input and bound the non-GEMM time: fc1's output belongs to
    this node alone, so the ReLU runs in place on it (no fresh 8 MB tensor per layer in the benchmark); the backward
    forms ``d fc1 = 2 relu(x) * (g W2)`` in one in-place pass over the ``g W2`` product and folds the exact factor 2
    into the two GEMMs that read it (their outputs are a quarter of the size), instead of a multiply into a new tensor
    and a second pass for the 2.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        positive = torch.mm(flat, weight1.t()).relu_()
        act = positive * positive
        ctx.save_for_backward(flat, weight1, weight2, positive, act)
        return torch.mm(act, weight2.t()).view(*x.shape[:-1], weight2.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        flat, weight1, weight2, positive, act = ctx.saved_tensors
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        grad_weight2 = torch.mm(grad.t(), act) if ctx.needs_input_grad[2] else None
        half_grad_fc1 = torch.mm(grad, weight2).mul_(positive)  # d fc1 / 2; doubling (exact) is done by alpha below
        scalar = grad.new_zeros(())  # addmm's ignored `input` (beta=0): its alpha scales the product instead
        grad_weight1 = None
        if ctx.needs_input_grad[1]:
            grad_weight1 = torch.addmm(scalar, half_grad_fc1.t(), flat, beta=0, alpha=2)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.addmm(scalar, half_grad_fc1, weight1, beta=0, alpha=2).view(grad_out.shape[:-1] + (-1,))
        return grad_x, grad_weight1, grad_weight2


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
        self.tp_size = groups.tp_size
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

    def _fused_squared_relu(self, hidden_states: torch.Tensor) -> bool:
        """Whether the forward can be the single ``_SquaredReLUMLP`` node: squared ReLU, tensor-parallel size 1 (no
        communication between the ops), the stock linears without biases, a CPU tensor of the weights' dtype outside
        autocast. CPU only like the fused output layer: on a GPU the separate ops keep autocast and the Triton paths.
        Forward hooks registered on ``linear_fc1`` / ``linear_fc2`` themselves are not run on this path."""
        fc1, fc2 = self.linear_fc1, self.linear_fc2
        return (
            self.activation is squared_relu
            and self.tp_size == 1
            and type(fc1) is ColumnParallelLinear
            and type(fc2) is RowParallelLinear
            and fc1.bias is None
            and fc2.bias is None
            and hidden_states.device.type == "cpu"
            and hidden_states.dtype == fc1.weight.dtype == fc2.weight.dtype
            and not torch.is_autocast_enabled("cpu")
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self._fused_squared_relu(hidden_states):
            return _SquaredReLUMLP.apply(hidden_states, self.linear_fc1.weight, self.linear_fc2.weight)
        return self.linear_fc2(self.activation(self.linear_fc1(hidden_states)))
