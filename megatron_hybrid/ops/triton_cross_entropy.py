"""Per-token cross entropy of [tokens, vocab] logits in two Triton kernels (tensor-parallel size 1, GPU training).

Why it exists: at the 800M model's shape (16384 tokens x 256000 vocabulary per step) the logits are 8.4 GB in bf16.
The torch path (``parallel.cross_entropy._ChunkedCrossEntropy``) upcasts them a chunk of rows at a time and runs max,
subtract, gather, exp, sum, divide, scatter and a copy back over each chunk, then scales the saved gradient in the
backward: ~10 passes over the logits' size, 60-70 ms of a 280 ms training step on an H100
(``benchmarks/gpu_model.py --parts train_breakdown``). Here:

* ``_forward_kernel``, one program per row: one read of the row, an online max and sum of exponentials in float32
  per lane, combined at the end; stores ``lse = max + log(sum)`` and ``loss = lse - logit[target]``.
* ``_backward_kernel``, one program per row: one read and one write, ``grad = (exp(logit - lse) - onehot(target)) *
  grad_loss`` in float32, rounded once to the logits' dtype. The forward saves the logits and ``lse`` only; the
  gradient goes into a new tensor, or with ``reuse_logits`` into the logits' own buffer (for callers that own the
  logits and do not read them after the loss, such as ``MambaModel``: one [tokens, vocab] tensor less at the peak).

Same value as ``F.cross_entropy(logits.float(), target, reduction="none")``. Importing this module never fails:
without triton ``UNAVAILABLE_REASON`` says why. Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (tests).
"""

from __future__ import annotations

import torch

from megatron_hybrid.ops._triton_common import ROUND_KIND, UNAVAILABLE_REASON, tl, triton

__all__ = ["UNAVAILABLE_REASON", "cross_entropy_triton"]

BLOCK_V = 4096  # vocabulary entries per step of a row's loop
WARPS = 8

if triton is not None:
    from megatron_hybrid.ops._triton_common import round_to_storage

    @triton.jit
    def _forward_kernel(LOGITS, TARGET, LSE, LOSS, vocab, stride_row, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = LOGITS + row * stride_row
        offs = tl.arange(0, BLOCK)
        # Each lane keeps a running max and the sum of exp(logit - that max). The max starts at the lowest finite
        # float32, not -inf: a lane that has seen only masked (-inf) entries then never computes -inf - (-inf).
        lane_max = tl.full((BLOCK,), -3.4028234663852886e38, tl.float32)
        lane_sum = tl.zeros((BLOCK,), dtype=tl.float32)
        for v0 in range(0, vocab, BLOCK):
            x = tl.load(base + v0 + offs, mask=v0 + offs < vocab, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(lane_max, x)
            lane_sum = lane_sum * tl.exp(lane_max - new_max) + tl.exp(x - new_max)
            lane_max = new_max
        row_max = tl.max(lane_max, 0)
        lse = row_max + tl.log(tl.sum(lane_sum * tl.exp(lane_max - row_max), 0))
        target = tl.load(TARGET + row)
        valid = (target >= 0) & (target < vocab)  # an id outside the vocabulary gives a NaN loss, not a wild read
        picked = tl.load(base + tl.where(valid, target, 0)).to(tl.float32)
        tl.store(LSE + row, lse)
        tl.store(LOSS + row, tl.where(valid, lse - picked, float("nan")))

    @triton.jit
    def _backward_kernel(LOGITS, TARGET, LSE, GRAD_LOSS, GRAD, vocab, stride_row, stride_grad_row, grad_loss_stride,
                         BLOCK: tl.constexpr, KIND: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        lse = tl.load(LSE + row)
        scale = tl.load(GRAD_LOSS + row * grad_loss_stride).to(tl.float32)
        target = tl.load(TARGET + row)
        for v0 in range(0, vocab, BLOCK):
            cols = v0 + offs
            ok = cols < vocab
            x = tl.load(LOGITS + row * stride_row + cols, mask=ok, other=0.0).to(tl.float32)
            grad = (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * scale
            tl.store(GRAD + row * stride_grad_row + cols, round_to_storage(grad, KIND).to(GRAD.dtype.element_ty),
                     mask=ok)


class _TritonCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, reuse_logits: bool) -> torch.Tensor:
        rows, vocab = logits.shape
        lse = torch.empty(rows, device=logits.device, dtype=torch.float32)
        loss = torch.empty(rows, device=logits.device, dtype=torch.float32)
        if rows:
            _forward_kernel[(rows,)](logits, target, lse, loss, vocab, logits.stride(0), BLOCK=BLOCK_V,
                                     num_warps=WARPS)
        ctx.save_for_backward(logits, target, lse)
        ctx.reuse_logits = reuse_logits
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, target, lse = ctx.saved_tensors
        rows, vocab = logits.shape
        # Reusing the buffer: each program reads its row's logits before writing the gradient over them.
        grad = logits if ctx.reuse_logits else torch.empty_like(logits)
        if rows:
            _backward_kernel[(rows,)](logits, target, lse, grad_loss, grad, vocab, logits.stride(0), grad.stride(0),
                                      grad_loss.stride(0), BLOCK=BLOCK_V, KIND=ROUND_KIND[logits.dtype],
                                      num_warps=WARPS)
        if ctx.reuse_logits:
            # The kernel's write is invisible to autograd: mark the logits modified, so that a second backward
            # through this graph is refused (its saved logits are gone) instead of reading the gradient as logits.
            torch.autograd.graph.increment_version(logits)
        return grad, None, None


def cross_entropy_triton(logits: torch.Tensor, target: torch.Tensor, reuse_logits: bool = False) -> torch.Tensor:
    """Per-token cross entropy (float32, shaped like ``target``) of ``logits`` [..., vocab] (float32 / bf16 / fp16,
    contiguous last dim) against ``target`` [...] (ids in ``[0, vocab)``; another id gives that token a NaN loss:
    checking on the host would stall the GPU every step); differentiable in ``logits``. ``reuse_logits``: the gradient
    is written over the logits (see the module docstring)."""
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target {tuple(target.shape)} must be logits {tuple(logits.shape)} without the last dim")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device}, logits on {logits.device}: they must share a device")
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    flat_target = target.reshape(-1).to(torch.int64).contiguous()
    loss = _TritonCrossEntropy.apply(flat, flat_target, bool(reuse_logits))
    return loss.view(target.shape)
