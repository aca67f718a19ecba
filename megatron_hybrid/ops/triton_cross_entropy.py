"""Per-token cross entropy of [tokens, vocab] logits in two Triton kernels (GPU training; vocab-parallel too).

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

Under tensor parallelism each rank holds a slice ``[vocab_start, vocab_start + vocab_local)`` of the vocabulary
(Megatron's vocab-parallel output layer): the forward kernel then keeps the slice's own ``logsumexp`` and the target
logit where the slice owns the target (0 elsewhere); two all-reduces of per-token numbers (the max of the slices'
``logsumexp``, then the sums of their exponentials and of the target logits) give every rank the row's ``logsumexp``
and target logit, and the backward kernel is the same with the slice's offset (no communication). Megatron's path
makes the same two all-reduces but ~10 passes over the slice.

Same value as ``F.cross_entropy(full_logits.float(), target, reduction="none")``. Importing this module never fails:
without triton ``UNAVAILABLE_REASON`` says why. Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (tests).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from megatron_hybrid.ops._triton_common import ROUND_KIND, UNAVAILABLE_REASON, tl, triton
from megatron_hybrid.parallel.state import group_rank, group_size

__all__ = ["UNAVAILABLE_REASON", "cross_entropy_triton"]

BLOCK_V = 4096  # vocabulary entries per step of a row's loop
WARPS = 8

if triton is not None:
    from megatron_hybrid.ops._triton_common import round_to_storage

    @triton.jit
    def _forward_kernel(LOGITS, TARGET, LSE, OUT, vocab, vocab_start, stride_row, BLOCK: tl.constexpr,
                        WHOLE_VOCAB: tl.constexpr):
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
        local = tl.load(TARGET + row) - vocab_start
        owned = (local >= 0) & (local < vocab)  # never a read outside the row
        picked = tl.load(base + tl.where(owned, local, 0)).to(tl.float32)
        tl.store(LSE + row, lse)
        if WHOLE_VOCAB:  # the loss itself; an id outside the vocabulary gives a NaN loss
            tl.store(OUT + row, tl.where(owned, lse - picked, float("nan")))
        else:  # a slice of it: the target logit where this slice owns the target, else 0 (summed over the slices)
            tl.store(OUT + row, tl.where(owned, picked, 0.0))

    @triton.jit
    def _backward_kernel(LOGITS, TARGET, LSE, GRAD_LOSS, GRAD, vocab, vocab_start, stride_row, stride_grad_row,
                         grad_loss_stride, BLOCK: tl.constexpr, KIND: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        lse = tl.load(LSE + row)
        scale = tl.load(GRAD_LOSS + row * grad_loss_stride).to(tl.float32)
        target = tl.load(TARGET + row) - vocab_start  # outside [0, vocab) when another slice owns it
        for v0 in range(0, vocab, BLOCK):
            cols = v0 + offs
            ok = cols < vocab
            x = tl.load(LOGITS + row * stride_row + cols, mask=ok, other=0.0).to(tl.float32)
            grad = (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * scale
            tl.store(GRAD + row * stride_grad_row + cols, round_to_storage(grad, KIND).to(GRAD.dtype.element_ty),
                     mask=ok)


class _TritonCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, reuse_logits: bool,
                group: ProcessGroup | None) -> torch.Tensor:
        rows, vocab_local = logits.shape
        slices = group_size(group)
        vocab_start = group_rank(group) * vocab_local
        lse = torch.empty(rows, device=logits.device, dtype=torch.float32)
        out = torch.empty(rows, device=logits.device, dtype=torch.float32)
        if rows:
            _forward_kernel[(rows,)](logits, target, lse, out, vocab_local, vocab_start, logits.stride(0),
                                     BLOCK=BLOCK_V, WHOLE_VOCAB=slices == 1, num_warps=WARPS)
        if slices == 1:
            loss = out
        else:
            # The row's logsumexp from the slices' (shifted by their max, so no exp overflows) and its target logit
            # (one slice's value, zeros elsewhere). All-reduces only: gloo has them for CUDA tensors too.
            row_max = lse.clone()
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
            stats = torch.stack([torch.exp(lse - row_max), out])
            dist.all_reduce(stats, group=group)
            lse = row_max + torch.log(stats[0])
            valid = (target >= 0) & (target < vocab_local * slices)
            loss = torch.where(valid, lse - stats[1], float("nan"))
        ctx.save_for_backward(logits, target, lse)
        ctx.reuse_logits = reuse_logits
        ctx.vocab_start = vocab_start
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        logits, target, lse = ctx.saved_tensors
        rows, vocab = logits.shape
        # Reusing the buffer: each program reads its row's logits before writing the gradient over them.
        grad = logits if ctx.reuse_logits else torch.empty_like(logits)
        if rows:
            _backward_kernel[(rows,)](logits, target, lse, grad_loss, grad, vocab, ctx.vocab_start, logits.stride(0),
                                      grad.stride(0), grad_loss.stride(0), BLOCK=BLOCK_V,
                                      KIND=ROUND_KIND[logits.dtype], num_warps=WARPS)
        if ctx.reuse_logits:
            # The kernel's write is invisible to autograd: mark the logits modified, so that a second backward
            # through this graph is refused (its saved logits are gone) instead of reading the gradient as logits.
            torch.autograd.graph.increment_version(logits)
        return grad, None, None, None


def cross_entropy_triton(logits: torch.Tensor, target: torch.Tensor, reuse_logits: bool = False,
                         group: ProcessGroup | None = None) -> torch.Tensor:
    """Per-token cross entropy (float32, shaped like ``target``) of ``logits`` [..., vocab] (float32 / bf16 / fp16,
    contiguous last dim) against ``target`` [...] (ids in ``[0, vocab)``; another id gives that token a NaN loss:
    checking on the host would stall the GPU every step); differentiable in ``logits``. ``reuse_logits``: the gradient
    is written over the logits (see the module docstring). ``group``: the tensor-parallel group over which the
    vocabulary is split, rank ``r`` holding ids ``[r * vocab_local, (r + 1) * vocab_local)`` (collective over it; None
    or a group of one: the whole vocabulary is here)."""
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target {tuple(target.shape)} must be logits {tuple(logits.shape)} without the last dim")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device}, logits on {logits.device}: they must share a device")
    if group_size(group) == 1:
        group = None
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    flat_target = target.reshape(-1).to(torch.int64).contiguous()
    loss = _TritonCrossEntropy.apply(flat, flat_target, bool(reuse_logits), group)
    return loss.view(target.shape)
