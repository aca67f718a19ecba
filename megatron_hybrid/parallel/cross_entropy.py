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

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from megatron_hybrid.parallel.state import ParallelGroups, group_rank, group_size

__all__ = ["vocab_parallel_cross_entropy"]


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


def vocab_parallel_cross_entropy(
    logits_local: torch.Tensor,
    target: torch.Tensor,
    groups: ParallelGroups,
    *,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-token cross entropy ``[...]`` of vocab-sharded logits ``[..., vocab/tp]`` (usually ``[s, b, v/tp]``).

    Equals ``F.cross_entropy(gathered_logits.flatten(0, -2), target.flatten(), reduction="none")`` reshaped like
    ``target``, in value and gradient. Every target must be a valid id in ``[0, vocab)``; positions to ignore are
    handled by the caller's loss mask (there is no ``ignore_index``). The loss is float32 whatever the logits'
    dtype. Collective over ``groups.tp``.
    """
    if label_smoothing != 0.0:
        raise NotImplementedError("vocab_parallel_cross_entropy supports label_smoothing=0.0 only")
    if logits_local.shape[:-1] != target.shape:
        raise ValueError(
            f"logits {tuple(logits_local.shape)} and target {tuple(target.shape)} disagree on the leading dims"
        )
    return _VocabParallelCrossEntropy.apply(logits_local.float(), target, groups.tp)
