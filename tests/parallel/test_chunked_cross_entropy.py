"""The chunked, memory-lean cross entropy of the GPU path (``cross_entropy._ChunkedCrossEntropy``), run on CPU tensors.

On CUDA ``vocab_parallel_cross_entropy`` dispatches to it; here it is applied directly, at TP 1 and (gloo) TP 2,
against ``F.cross_entropy`` on the gathered logits: loss and gradient, float32 and bf16 logits, several chunks, large
logits, weighted per-token upstream gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_hybrid.parallel import cross_entropy
from megatron_hybrid.parallel.state import initialize_parallel_groups
from megatron_hybrid.parallel.testing import run_distributed


def _case(dtype: torch.dtype, vocab: int = 40):
    torch.manual_seed(5)
    s, b = 7, 3
    logits = torch.randn(s, b, vocab) * 4
    logits[0, 0] += 1e4  # large logits stay finite and exact
    target = torch.randint(0, vocab, (s, b))
    target[0, :] = torch.tensor([0, vocab - 1, vocab // 2])
    weights = torch.rand(s, b)
    full = logits.to(dtype).requires_grad_()
    ref = F.cross_entropy(full.float().reshape(-1, vocab), target.reshape(-1), reduction="none").reshape(s, b)
    (ref * weights).sum().backward()
    return full, target, weights, ref.detach(), full.grad


def _compare(dtype, loss, grad, ref_loss, ref_grad):
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    if dtype == torch.float32:
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
    else:  # rounded to bf16 twice (softmax - onehot, then the scaled gradient): a couple of bf16 ulps
        torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=1.6e-2, atol=1e-3 * ref_grad.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_elements", [1 << 26, 50])  # one chunk; chunks of one token
def test_matches_cross_entropy_tp1(dtype, chunk_elements, monkeypatch):
    monkeypatch.setattr(cross_entropy, "_CHUNK_ELEMENTS", chunk_elements)
    full, target, weights, ref_loss, ref_grad = _case(dtype)
    logits = full.detach().clone().requires_grad_()
    before = logits.detach().clone()
    loss = cross_entropy._ChunkedCrossEntropy.apply(logits, target, None)
    (loss * weights).sum().backward()
    assert torch.equal(logits.detach(), before)  # the input is never modified (float32 chunks are copies)
    _compare(dtype, loss, logits.grad, ref_loss, ref_grad)


def test_no_gradient_buffer_without_grad_and_second_backward_raises():
    full, target, *_ = _case(torch.float32)
    with torch.no_grad():
        loss = cross_entropy._ChunkedCrossEntropy.apply(full.detach(), target, None)
    assert loss.shape == target.shape
    logits = full.detach().clone().requires_grad_()
    loss = cross_entropy._ChunkedCrossEntropy.apply(logits, target, None).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError):  # the saved gradient was scaled in place by the first backward
        loss.backward()


def _tp_worker(rank: int, world_size: int) -> dict[str, float]:
    groups = initialize_parallel_groups(tp=world_size)
    errors = {}
    cross_entropy._CHUNK_ELEMENTS = 30  # several chunks, so several pairs of collectives
    for dtype in (torch.float32, torch.bfloat16):
        full, target, weights, ref_loss, ref_grad = _case(dtype)
        vocab = full.shape[-1]
        part = slice(rank * vocab // world_size, (rank + 1) * vocab // world_size)
        local = full.detach()[..., part].clone().requires_grad_()
        loss = cross_entropy._ChunkedCrossEntropy.apply(local, target, groups.tp)
        (loss * weights).sum().backward()
        try:
            _compare(dtype, loss, local.grad, ref_loss, ref_grad[..., part])
            errors[str(dtype)] = 0.0
        except AssertionError as exc:
            errors[str(dtype)] = str(exc)
    return errors


def test_matches_cross_entropy_tp2():
    for rank, errors in enumerate(run_distributed(_tp_worker, 2, timeout=120)):
        for name, err in errors.items():
            assert err == 0.0, f"rank {rank} {name}: {err}"
