"""Gradient fix-ups that tensor parallelism needs before the optimizer step.

Under sequence parallelism every tensor-parallel rank runs the replicated parts of the model (the RMSNorm weights, the
row-parallel biases) on its own slice of the sequence only. Their gradients are therefore per-rank partial sums: the
full gradient is the sum over the tensor-parallel group. Such parameters carry ``param.sequence_parallel = True``
(see ``megatron_hybrid.layers.norm.RMSNorm`` and ``megatron_hybrid.parallel.tensor_parallel.RowParallelLinear``).
Megatron-LM performs this reduction in ``finalize_model_grads``; here it is one explicit call in the training step,
after the backward pass and before any data-parallel reduction, gradient clipping or optimizer step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatron_hybrid.parallel.state import ParallelGroups

__all__ = ["allreduce_sequence_parallel_grads", "sequence_parallel_parameters"]


def sequence_parallel_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of ``model`` marked ``sequence_parallel = True``, in ``model.parameters()`` order.

    The order is the module registration order, identical on every rank of a tensor-parallel group (they build the
    same modules), which is what lets the ranks pack their gradients into matching flat buffers.
    """
    return [p for p in model.parameters() if p.requires_grad and getattr(p, "sequence_parallel", False)]


@torch.no_grad()
def allreduce_sequence_parallel_grads(model: nn.Module, groups: ParallelGroups) -> None:
    """Sum, over the tensor-parallel group, the gradients of the parameters marked ``sequence_parallel``.

    Each rank computed those gradients on its sequence slice only; after this call every rank holds the gradient of
    the whole sequence, as a TP=1 run would. The gradients are packed into one flat buffer per dtype (and device) and
    reduced with a single ``all_reduce`` each, instead of one small collective per norm weight; the results are
    copied back into ``param.grad`` in place.

    Collective over ``groups.tp``: every rank of the group must call it, after its backward pass. A marked parameter
    without a gradient (it took no part in the loss) is skipped; the ranks of a tensor-parallel group run the same
    graph, so they skip the same ones. No-op (no communication) when the tensor-parallel size is 1.
    """
    if groups.tp_size == 1:
        return
    buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for param in sequence_parallel_parameters(model):
        if param.grad is None:
            continue
        buckets.setdefault((param.grad.device, param.grad.dtype), []).append(param.grad)
    for grads in buckets.values():
        flat = torch.cat([grad.reshape(-1) for grad in grads])
        dist.all_reduce(flat, group=groups.tp)
        offset = 0
        for grad in grads:
            count = grad.numel()
            grad.copy_(flat[offset : offset + count].view_as(grad))
            offset += count
