"""The single-node squared-ReLU MLP (CPU, tensor-parallel size 1) equals fc1 -> squared ReLU -> fc2 bit for bit."""

from __future__ import annotations

import pytest
import torch

from megatron_hybrid.config import HybridConfig
from megatron_hybrid.layers.mlp import MLP, squared_relu
from megatron_hybrid.parallel.state import ParallelGroups


def _mlp(dtype: torch.dtype, **overrides: object) -> MLP:
    fields = dict(
        num_layers=1, hybrid_override_pattern="-", hidden_size=32, vocab_size=64, num_attention_heads=4,
        ffn_hidden_size=48, activation="squared_relu", params_dtype=dtype, mamba_num_heads=8, mamba_head_dim=8,
    )
    fields.update(overrides)
    torch.manual_seed(0)
    return MLP(HybridConfig(**fields), ParallelGroups.single())


def _run(mlp: MLP, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_()
    y = mlp(x)
    y.backward(grad)
    out = (y.detach(), x.grad, mlp.linear_fc1.weight.grad.clone(), mlp.linear_fc2.weight.grad.clone())
    mlp.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_squared_relu_mlp_equals_separate_ops(dtype: torch.dtype) -> None:
    mlp = _mlp(dtype)
    x = torch.randn(7, 3, 32, dtype=dtype)
    grad = torch.randn(7, 3, 32, dtype=dtype)
    assert mlp._fused_squared_relu(x)
    fused = _run(mlp, x, grad)
    mlp._fused_squared_relu = lambda hidden_states: False  # the instance falls back to the three modules
    separate = _run(mlp, x, grad)
    reference_y = mlp.linear_fc2(squared_relu(mlp.linear_fc1(x)))
    for got, want in zip(fused, separate):
        assert torch.equal(got, want)
    assert torch.equal(fused[0], reference_y.detach())


def test_fused_squared_relu_mlp_gradcheck_and_frozen_weights() -> None:
    mlp = _mlp(torch.float64)
    x = torch.randn(5, 2, 32, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: mlp(inp), (x,))
    mlp.linear_fc1.weight.requires_grad_(False)
    y = mlp(x)
    y.sum().backward()
    assert mlp.linear_fc1.weight.grad is None and mlp.linear_fc2.weight.grad is not None and x.grad is not None


def test_fused_path_not_taken_with_bias_or_other_activation() -> None:
    x = torch.randn(4, 1, 32)
    assert not _mlp(torch.float32, add_bias_linear=True)._fused_squared_relu(x)
    assert not _mlp(torch.float32, activation="swiglu")._fused_squared_relu(x)
    assert not _mlp(torch.float32)._fused_squared_relu(x.double())
