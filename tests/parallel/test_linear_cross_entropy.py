"""The fused output layer + cross entropy (tensor-parallel size 1) and the local cross-entropy fast path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import megatron_hybrid.parallel.cross_entropy as ce_module
from megatron_hybrid.parallel.cross_entropy import linear_cross_entropy, vocab_parallel_cross_entropy
from megatron_hybrid.parallel.state import ParallelGroups


def _reference(hidden, weight, target):
    logits = F.linear(hidden, weight)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits.flatten(0, -2), target.flatten(), reduction="none").view(target.shape)


@pytest.mark.parametrize("slice_elements", [7, 40, 1 << 20])  # many / a few / one slice(s) of rows and columns
def test_linear_cross_entropy_matches_unfused(monkeypatch, slice_elements):
    monkeypatch.setattr(ce_module, "_SLICE_ELEMENTS", slice_elements)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 3, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 13, (5, 3), generator=gen)
    target[0, 0], target[1, 2] = 0, 12  # first and last vocabulary entries
    grad = torch.randn(5, 3, generator=gen, dtype=torch.float64)

    loss = linear_cross_entropy(hidden, weight, target)
    loss.backward(grad)
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    reference = _reference(hidden, weight, target)
    reference.backward(grad)
    assert loss.shape == target.shape
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda h, w: linear_cross_entropy(h, w, target), (hidden, weight))


def test_linear_cross_entropy_float32_and_low_precision_fallback():
    gen = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(64, 16, generator=gen) * 3, torch.randn(100, 16, generator=gen)
    target = torch.randint(0, 100, (64,), generator=gen)
    torch.testing.assert_close(linear_cross_entropy(hidden, weight, target), _reference(hidden, weight, target))
    loss16 = linear_cross_entropy(hidden.bfloat16(), weight.bfloat16(), target)
    assert loss16.dtype == torch.float32
    torch.testing.assert_close(loss16, _reference(hidden.bfloat16(), weight.bfloat16(), target))
    with pytest.raises(ValueError, match="disagree"):
        linear_cross_entropy(hidden, weight, target[:-1])


def test_local_cross_entropy_fast_path():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 3, 11, generator=gen, requires_grad=True)
    target = torch.randint(0, 11, (4, 3), generator=gen)
    grad = torch.randn(4, 3, generator=gen)
    loss = vocab_parallel_cross_entropy(logits, target, ParallelGroups.single())
    loss.backward(grad)
    ours = logits.grad.clone()
    logits.grad = None
    reference = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(4, 3)
    reference.backward(grad)
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(ours, logits.grad)
