"""Cross entropy over logits whose vocabulary dim is split across tensor-parallel ranks.

Gathering ``[s, b, vocab]`` logits on every rank would cost ``tp`` times the memory of the largest activation of the
model; instead each rank keeps its ``[s, b, vocab/tp]`` slice and only ``[s, b]``-sized statistics travel:

1. all-reduce(MAX) of the per-token maximum logit (numerical stability: exponents are <= 0);
2. one all-reduce(SUM) of the stacked per-token sum of ``exp(logit - max)`` and target logit (only the rank owning
   the target contributes a non-zero target logit). Two statistics, one collective.

``loss = log(sum_exp) - (target_logit - max)``. The backward is ``softmax - onehot(target)`` restricted to the local
slice, which needs no communication. Computation is in float32 whatever the logits' dtype; the gradient comes back
in the logits' dtype.
"""

from __future__ import annotations

import threading

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from megatron_hybrid.ops.backend import cross_entropy as fused_cross_entropy
from megatron_hybrid.parallel.state import ParallelGroups, group_rank, group_size

__all__ = ["LogitsWorkspace", "linear_cross_entropy", "vocab_parallel_cross_entropy"]

# Working-set size (elements) of one slice of the [tokens, vocab] matrices in linear_cross_entropy: 4 MB of float32,
# so that each slice is produced and consumed while it sits in the core's L2 cache.
_SLICE_ELEMENTS = 1 << 20


class LogitsWorkspace:
    """The [tokens, vocab] buffer of ``linear_cross_entropy``, kept from one call to the next (one per model).

    Why: that buffer is the step's largest allocation (64 MB in the CPU benchmark, 4 x 512 tokens x 8192 vocab).
    glibc serves every allocation above 32 MB with a fresh ``mmap``, so each training step paid ~16K page faults and
    the kernel's zeroing of the pages (about 4% of the benchmark's step; more with two threads faulting at once).

    A buffer is handed out only while nothing else holds it: ``claim`` returns a view, which keeps the buffer's use
    count above one for as long as the view lives, i.e. until the graph that saved it has run its backward (without
    ``retain_graph``) or has been dropped. A claim while an earlier graph still holds the buffer (several forwards
    before their backwards, a retained graph, another thread) gets a fresh tensor, exactly as without a workspace.
    Holds at most one buffer, the size of the largest claim seen; not part of the state dict, not copied or pickled.
    """

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None
        self._lock = threading.Lock()  # makes "is it free" + "take a view" one step

    def __reduce__(self) -> tuple:
        return (type(self), ())  # deepcopy / pickle of a model: a new, empty workspace (a Lock cannot be copied)

    def claim(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised ``[rows, cols]`` tensor: a view of the kept buffer when free, else a new tensor."""
        numel = rows * cols
        # Tensor._use_count (the TensorImpl's reference count; torch.utils.swap_tensors relies on it) is the only
        # way to see the references held by autograd's saved tensors; without it the workspace never reuses.
        if hasattr(torch.Tensor, "_use_count"):
            with self._lock:
                buffer = self._buffer
                if buffer is None or buffer._use_count() == 1:
                    if buffer is None or buffer.numel() < numel or buffer.dtype != dtype or buffer.device != device:
                        self._buffer = buffer = None  # free the old one before allocating its replacement
                        self._buffer = buffer = torch.empty(numel, dtype=dtype, device=device)
                    return buffer[:numel].view(rows, cols)
        return torch.empty(rows, cols, dtype=dtype, device=device)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        communicate = group_size(group) > 1
        vocab_local = logits.shape[-1]
        vocab_start = group_rank(group) * vocab_local

        logits_max = logits.max(dim=-1).values
        if communicate:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)  # a new tensor: the in-place ops below never touch `logits`

        outside = (target < vocab_start) | (target >= vocab_start + vocab_local)
        local_target = (target - vocab_start).masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)

        exp = shifted.exp_()
        sum_exp = exp.sum(dim=-1)
        if communicate:
            stats = torch.stack([sum_exp, target_logit])
            dist.all_reduce(stats, group=group)
            sum_exp, target_logit = stats[0], stats[1]

        loss = torch.log(sum_exp) - target_logit
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        softmax, local_target, outside = ctx.saved_tensors
        grad_loss = grad_loss.to(softmax.dtype)
        grad = softmax * grad_loss.unsqueeze(-1)
        # Subtract the one-hot target, only on the rank that owns it.
        onehot_scale = grad_loss.masked_fill(outside, 0.0)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -onehot_scale.unsqueeze(-1))
        return grad, None, None


class _LocalCrossEntropy(torch.autograd.Function):
    """tensor-parallel size 1: ``log_softmax`` (one fused kernel) and a gather; the backward is
    ``(exp(log_probs) - onehot) * grad`` with the one-hot part scattered. About a quarter cheaper than the general
    path on CPU (no max / shift / exp / sum / divide chain of separate full-size passes)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(logits, dim=-1)
        index = target.unsqueeze(-1)
        ctx.save_for_backward(log_probs, index)
        return log_probs.gather(-1, index).squeeze(-1).neg_()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None]:
        log_probs, index = ctx.saved_tensors
        grad_loss = grad_loss.to(log_probs.dtype).unsqueeze(-1)
        grad = log_probs.exp().mul_(grad_loss)
        grad.scatter_add_(-1, index, -grad_loss)
        return grad, None


class _LinearCrossEntropy(torch.autograd.Function):
    """``cross_entropy(hidden @ weight^T, target)`` per token without a separate [tokens, vocab] logits tensor.

    The forward goes through the tokens in slices of ``_SLICE_ELEMENTS``: each slice's logits are computed straight into
    a row block of one [tokens, vocab] buffer and turned into ``exp(logit - max)`` there while still in cache (the
    row sums give the loss, their inverses are kept); that buffer is the only full-size tensor and is what the
    backward reads. The backward goes through the vocabulary in column slices: ``softmax * grad`` for the slice (in a
    cache-sized scratch), then ``dweight[slice] = (softmax * grad)^T hidden`` (complete: no accumulation) and
    ``dhidden += (softmax * grad) weight[slice]`` (a [tokens, hidden] accumulator that stays in cache); the one-hot
    part of ``dlogits = (softmax - onehot) * grad`` is one row per token, applied at the end as ``dweight[target] -=
    grad * hidden`` and ``dhidden -= grad * weight[target]``. Compared with linear + cross entropy as separate ops
    this makes 2 instead of ~10 passes over the [tokens, vocab] matrix and allocates it once instead of three times.
    """

    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, workspace: LogitsWorkspace | None
    ) -> torch.Tensor:
        tokens, vocab = hidden.shape[0], weight.shape[0]
        if workspace is not None:
            probs = workspace.claim(tokens, vocab, hidden.dtype, hidden.device)
        else:
            probs = torch.empty(tokens, vocab, dtype=hidden.dtype, device=hidden.device)
        loss = torch.empty(tokens, dtype=hidden.dtype, device=hidden.device)
        inv_sum = torch.empty(tokens, dtype=hidden.dtype, device=hidden.device)
        rows = max(1, _SLICE_ELEMENTS // vocab)
        for start in range(0, tokens, rows):
            end = min(start + rows, tokens)
            block = probs[start:end]
            torch.mm(hidden[start:end], weight.t(), out=block)
            target_logit = block.gather(1, target[start:end, None]).squeeze(1)
            row_max = block.amax(dim=1, keepdim=True)
            block.sub_(row_max).exp_()  # unnormalised: the backward folds 1 / sum_exp into its scaling by grad
            sum_exp = block.sum(dim=1)
            torch.reciprocal(sum_exp, out=inv_sum[start:end])
            torch.sub(sum_exp.log_().add_(row_max.squeeze(1)), target_logit, out=loss[start:end])
        ctx.save_for_backward(hidden, weight, target, probs, inv_sum)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        hidden, weight, target, probs, inv_sum = ctx.saved_tensors
        tokens, vocab = probs.shape
        grad_loss = grad_loss.to(probs.dtype).unsqueeze(1)  # [tokens, 1]
        scale = grad_loss * inv_sum.unsqueeze(1)  # softmax = probs * inv_sum
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        cols = max(1, _SLICE_ELEMENTS // tokens)
        scratch = torch.empty(tokens, min(cols, vocab), dtype=probs.dtype, device=probs.device)
        for start in range(0, vocab, cols):
            end = min(start + cols, vocab)
            grad_softmax = torch.mul(probs[:, start:end], scale, out=scratch[:, : end - start])
            if grad_weight is not None:
                torch.mm(grad_softmax.t(), hidden, out=grad_weight[start:end])
            if grad_hidden is not None:
                grad_hidden.addmm_(grad_softmax, weight[start:end])
        # The -onehot * grad part of dlogits, applied to the products directly (one row per token).
        if grad_weight is not None:
            grad_weight.index_add_(0, target, hidden * grad_loss, alpha=-1)
        if grad_hidden is not None:
            grad_hidden.addcmul_(weight.index_select(0, target), grad_loss, value=-1)
        return grad_hidden, grad_weight, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, workspace: LogitsWorkspace | None = None
) -> torch.Tensor:
    """Per-token ``cross_entropy(hidden @ weight^T, target)`` of a tensor-parallel size 1 output layer.

    ``hidden`` [..., h], ``weight`` [vocab, h], ``target`` [...] -> loss [...] in float32 (float64 for float64 inputs).
    Same value and gradients as ``F.linear`` followed by :func:`vocab_parallel_cross_entropy`, computed slice by
    slice (see ``_LinearCrossEntropy``). Inputs of other dtypes (bf16 / fp16) take exactly that unfused path.
    ``workspace`` (optional, one per model) keeps the [tokens, vocab] buffer between calls (see ``LogitsWorkspace``).
    """
    if hidden.shape[:-1] != target.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and target {tuple(target.shape)} disagree on the leading dims")
    if hidden.dtype not in (torch.float32, torch.float64) or weight.dtype != hidden.dtype:
        logits = torch.nn.functional.linear(hidden, weight).float()
        return _LocalCrossEntropy.apply(logits, target)
    flat = hidden.reshape(-1, hidden.shape[-1])
    return _LinearCrossEntropy.apply(flat, weight, target.reshape(-1), workspace).view(target.shape)


# Rows of one float32 working chunk of _ChunkedCrossEntropy: 2^26 elements (256 MB), whatever the vocabulary slice.
_CHUNK_ELEMENTS = 1 << 26


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Vocab-parallel cross entropy that keeps only the unscaled gradient, in the logits' dtype (the GPU path without
    triton; with it ``ops.cross_entropy``'s kernels run instead).

    The logits (bf16 under autocast) are upcast to float32 a chunk of tokens at a time, so neither a float32 copy of
    the [tokens, vocab] logits nor a float32 softmax is ever materialised. The forward already computes
    ``softmax - onehot`` (the backward is that times the per-token upstream gradient) into one buffer of the logits'
    dtype, which is all it saves: 2 bytes per logit under bf16 instead of the 4 (float32 softmax) + 4 (float32 logits
    alive in the forward) + 4 (float32 gradient) + 2 (its bf16 cast) of the unfused path. The backward scales that
    buffer in place (float32 math, one rounding) and returns it, so a second backward through the same graph raises.
    Under tensor parallelism the per-token max and the (sum_exp, target_logit) statistics are all-reduced per chunk.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        communicate = group_size(group) > 1
        vocab_local = logits.shape[-1]
        vocab_start = group_rank(group) * vocab_local
        flat = logits.reshape(-1, vocab_local)
        flat_target = target.reshape(-1)
        outside = (flat_target < vocab_start) | (flat_target >= vocab_start + vocab_local)
        local_target = (flat_target - vocab_start).masked_fill(outside, 0).unsqueeze(-1)
        owned = (~outside).to(torch.float32).unsqueeze(-1)
        tokens = flat.shape[0]
        loss = torch.empty(tokens, dtype=torch.float32, device=logits.device)
        grad = torch.empty_like(flat) if ctx.needs_input_grad[0] else None
        rows = max(1, _CHUNK_ELEMENTS // max(1, vocab_local))
        for start in range(0, tokens, rows):
            end = min(start + rows, tokens)
            block = flat[start:end].to(torch.float32, copy=True)
            row_max = block.amax(dim=-1)
            if communicate:
                dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
            block.sub_(row_max.unsqueeze(-1))
            target_logit = block.gather(-1, local_target[start:end]).squeeze(-1).mul_(owned[start:end, 0])
            sum_exp = block.exp_().sum(dim=-1)
            if communicate:
                stats = torch.stack([sum_exp, target_logit])
                dist.all_reduce(stats, group=group)
                sum_exp, target_logit = stats[0], stats[1]
            torch.sub(torch.log(sum_exp), target_logit, out=loss[start:end])
            if grad is not None:
                block.div_(sum_exp.unsqueeze(-1)).scatter_add_(-1, local_target[start:end], owned[start:end].neg())
                grad[start:end].copy_(block)
        if grad is not None:
            ctx.save_for_backward(grad)
        ctx.logits_shape = logits.shape
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (grad,) = ctx.saved_tensors
        scale = grad_loss.reshape(-1, 1).to(torch.float32)
        torch.mul(grad, scale, out=grad)  # in the saved buffer: no second [tokens, vocab] tensor
        return grad.view(ctx.logits_shape), None, None


def vocab_parallel_cross_entropy(
    logits_local: torch.Tensor,
    target: torch.Tensor,
    groups: ParallelGroups,
    *,
    label_smoothing: float = 0.0,
    reuse_logits: bool = False,
) -> torch.Tensor:
    """Per-token cross entropy ``[...]`` of vocab-sharded logits ``[..., vocab/tp]`` (usually ``[s, b, v/tp]``).

    Equals ``F.cross_entropy(gathered_logits.flatten(0, -2), target.flatten(), reduction="none")`` reshaped like
    ``target``, in value and gradient. Every target must be a valid id in ``[0, vocab)``; positions to ignore are
    handled by the caller's loss mask (there is no ``ignore_index``). The loss is float32 whatever the logits'
    dtype. Collective over ``groups.tp``. Pass bf16 logits as they are: the upcast happens here (chunk-wise on CUDA,
    see ``_ChunkedCrossEntropy``), so the caller never needs a float32 copy of the logits. On CUDA it is our Triton
    cross entropy (``ops.cross_entropy``; 2 passes over the logits instead of ~10, two small all-reduces per
    call under tensor parallelism), where ``reuse_logits`` lets its backward write the gradient over the logits:
    pass it only if nothing reads them after the loss (the model's own logits).
    """
    if label_smoothing != 0.0:
        raise NotImplementedError("vocab_parallel_cross_entropy supports label_smoothing=0.0 only")
    if logits_local.shape[:-1] != target.shape:
        raise ValueError(
            f"logits {tuple(logits_local.shape)} and target {tuple(target.shape)} disagree on the leading dims"
        )
    if logits_local.is_cuda:
        loss = fused_cross_entropy(logits_local, target, reuse_logits=reuse_logits, group=groups.tp)
        if loss is not None:
            return loss
        # Without triton. Memory first on the GPU: float32 math chunk by chunk, only a logits-dtype gradient saved.
        return _ChunkedCrossEntropy.apply(logits_local, target, groups.tp)
    if groups.tp_size == 1:
        return _LocalCrossEntropy.apply(logits_local.float(), target)
    return _VocabParallelCrossEntropy.apply(logits_local.float(), target, groups.tp)
