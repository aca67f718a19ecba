"""Autograd-aware communication between tensor-parallel ranks.

Each public function is a pair of collectives, one for the forward pass and its adjoint for the backward pass, so that
tensor-parallel layers compose with ordinary autograd. Activations are ``[seq, batch, hidden]``: sequence parallelism
splits dim 0, tensor parallelism splits the last dim. Every function is the identity (no copy, no communication) when
``group`` is ``None`` or has a single rank, so single-process code runs the same layers unchanged.

| function                              | forward                        | backward                       |
| ------------------------------------- | ------------------------------ | ------------------------------ |
| ``copy_to_tp``                        | identity                       | all-reduce                     |
| ``reduce_from_tp``                    | all-reduce                     | identity                       |
| ``scatter_to_tp``                     | keep own chunk of last dim     | all-gather last dim            |
| ``gather_from_tp``                    | all-gather last dim            | keep own chunk of last dim     |
| ``scatter_to_sequence_parallel``      | keep own chunk of dim 0        | all-gather dim 0               |
| ``gather_from_sequence_parallel``     | all-gather dim 0               | reduce-scatter dim 0 (*)       |
| ``reduce_scatter_to_sequence_parallel`` | reduce-scatter dim 0         | all-gather dim 0               |

(*) or just keep the own chunk when ``tensor_parallel_output_grad=False``: use that when the gathered tensor is
consumed identically on every rank (its gradient is then already complete, not a per-rank partial sum).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

__all__ = [
    "all_gather_along_dim",
    "copy_to_tp",
    "gather_from_sequence_parallel",
    "gather_from_tp",
    "reduce_from_tp",
    "reduce_scatter_along_first_dim",
    "reduce_scatter_to_sequence_parallel",
    "scatter_to_sequence_parallel",
    "scatter_to_tp",
    "split_along_dim",
]

# torch >= 2.13 renamed the tensor-in/tensor-out collectives; keep working on both spellings.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _is_trivial(group: ProcessGroup | None) -> bool:
    return group is None or dist.get_world_size(group) == 1


# --------------------------------------------------------------------------------------------------------------------
# Plain (non-autograd) collectives. They never modify their input.
# --------------------------------------------------------------------------------------------------------------------


def _all_reduce(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    if _is_trivial(group):
        return x
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def split_along_dim(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    """This rank's contiguous chunk of ``x`` along ``dim`` (which must divide evenly by the group size)."""
    if _is_trivial(group):
        return x
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[dim] % size != 0:
        raise ValueError(f"dim {dim} of size {x.shape[dim]} is not divisible by the group size {size}")
    return x.chunk(size, dim=dim)[rank].contiguous()


def all_gather_along_dim(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim``, rank order."""
    if _is_trivial(group):
        return x
    size = dist.get_world_size(group)
    x = x.contiguous()
    out = torch.empty((size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x, group=group)
    if dim % x.dim() == 0:
        return out
    return torch.cat(out.chunk(size, dim=0), dim=dim)


def reduce_scatter_along_first_dim(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Sum ``x`` over the group and keep this rank's chunk of dim 0."""
    if _is_trivial(group):
        return x
    size = dist.get_world_size(group)
    if x.shape[0] % size != 0:
        raise ValueError(f"dim 0 of size {x.shape[0]} is not divisible by the group size {size}")
    x = x.contiguous()
    out = torch.empty((x.shape[0] // size, *x.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter_single(out, x, group=group)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Autograd functions.
# --------------------------------------------------------------------------------------------------------------------


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return split_along_dim(x, -1, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return all_gather_along_dim(grad, -1, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return all_gather_along_dim(x, -1, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return split_along_dim(grad, -1, ctx.group), None


class _ScatterToSequenceParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return split_along_dim(x, 0, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return all_gather_along_dim(grad, 0, ctx.group), None


class _GatherFromSequenceParallel(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: torch.Tensor, group: ProcessGroup | None, tensor_parallel_output_grad: bool
    ) -> torch.Tensor:
        ctx.group = group
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return all_gather_along_dim(x, 0, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        if ctx.tensor_parallel_output_grad:
            return reduce_scatter_along_first_dim(grad, ctx.group), None, None
        return split_along_dim(grad, 0, ctx.group), None, None


class _ReduceScatterToSequenceParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return reduce_scatter_along_first_dim(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return all_gather_along_dim(grad, 0, ctx.group), None


def copy_to_tp(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Enter a tensor-parallel region: every rank uses the same ``x``, so its gradients are summed over ranks."""
    return x if _is_trivial(group) else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Leave a tensor-parallel region by summing the per-rank partial results (e.g. a row-parallel matmul)."""
    return x if _is_trivial(group) else _ReduceFromTP.apply(x, group)


def scatter_to_tp(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Keep this rank's chunk of the last dim of a replicated tensor."""
    return x if _is_trivial(group) else _ScatterToTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Concatenate the per-rank chunks of the last dim (e.g. column-parallel outputs) into the full tensor."""
    return x if _is_trivial(group) else _GatherFromTP.apply(x, group)


def scatter_to_sequence_parallel(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Enter sequence parallelism: keep this rank's chunk of the sequence (dim 0) of a replicated tensor."""
    return x if _is_trivial(group) else _ScatterToSequenceParallel.apply(x, group)


def gather_from_sequence_parallel(
    x: torch.Tensor, group: ProcessGroup | None, tensor_parallel_output_grad: bool = True
) -> torch.Tensor:
    """All-gather the sequence (dim 0). Backward reduce-scatters, since the consumers are usually tensor-parallel
    layers whose input gradients are partial sums; pass ``tensor_parallel_output_grad=False`` when they are not."""
    if _is_trivial(group):
        return x
    return _GatherFromSequenceParallel.apply(x, group, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Sum per-rank partial results and keep this rank's sequence chunk (dim 0): the sequence-parallel
    replacement of :func:`reduce_from_tp`, with half the traffic."""
    return x if _is_trivial(group) else _ReduceScatterToSequenceParallel.apply(x, group)
