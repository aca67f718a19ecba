"""Pipeline parallelism: activations between adjacent stages and the non-interleaved 1F1B schedule.

A pipeline stage is a :class:`megatron_hybrid.models.mamba_model.MambaModel` built for one rank of the
pipeline-parallel group (see :mod:`megatron_hybrid.models.pipeline_stage`). One global step runs ``M`` micro-batches
through the ``P`` stages with Megatron's "one forward, one backward" schedule (PipeDream-Flush):

* warm-up: stage ``r`` runs ``min(P - r - 1, M)`` forwards, so that the last stage can start backward at once;
* steady state: each further micro-batch is one forward then the backward of the oldest micro-batch in flight, so a
  stage holds at most ``P - r`` micro-batches of activations (not ``M``, as all-forward-then-all-backward would);
* cool-down: the backwards of the warm-up micro-batches.

Point-to-point traffic: hidden states ``[s, b, h]`` (``[s/tp, b, h]`` under sequence parallelism) go to the next
stage, their gradients come back. Shapes and dtype are the same for every micro-batch, so both sides allocate the
buffers from a :class:`StageIO` and no shape is exchanged. Every exchange is one ``batch_isend_irecv`` of all its
sends and receives, then a wait: adjacent stages that send to each other at the same time (``send forward + receive
backward`` against ``send backward + receive forward`` in the steady state) therefore never block each other,
whatever the backend (NCCL runs a batch as one group, so a send and a receive with the same peer cannot wait on each
other in a stream; gloo posts them independently). The ops of one exchange go to distinct peers or directions, and
every exchange completes before the next starts, so messages between two ranks are matched in order. NCCL wants a
collective over the group before its first batched point-to-point call that not every rank joins:
:func:`initialize_pipeline_communication` is that call.

With a pipeline size of 1 the schedule degenerates to forward + backward per micro-batch with no communication,
which is exactly the plain gradient-accumulation loop; the training loop uses this one code path for every layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_hybrid.parallel.state import ParallelGroups

__all__ = [
    "StageIO",
    "broadcast_from_last_stage",
    "exchange",
    "forward_backward_pipelining",
    "forward_only_pipelining",
    "initialize_pipeline_communication",
    "recv_backward",
    "recv_forward",
    "send_backward",
    "send_backward_recv_forward",
    "send_forward",
    "send_forward_recv_backward",
]

# The step function of a stage: (micro-batch index, hidden states from the previous stage or None on the first stage)
# -> hidden states for the next stage, or on the last stage the micro-batch's loss (a scalar to backpropagate).
StageForward = Callable[[int, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class StageIO:
    """Shape, dtype and device of the tensors passed between stages (identical for every micro-batch).

    ``dtype`` must be what a stage's output holds in the whole model, so the next stage computes exactly what the
    unsplit model would: float32 with ``residual_in_fp32``, else the parameters' dtype (under bf16 autocast the
    residual stream stays in the parameters' dtype because the embedding output is not autocast).
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def empty(self, requires_grad: bool = False) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=self.device, requires_grad=requires_grad)


def initialize_pipeline_communication(groups: ParallelGroups, device: torch.device) -> None:
    """One collective over the pipeline group before any point-to-point traffic (NCCL's condition for batched
    sends and receives between a subset of the group's ranks). Every rank of the pipeline calls it once."""
    if groups.pp is not None:
        dist.all_reduce(torch.zeros(1, device=device), group=groups.pp)


def exchange(groups: ParallelGroups, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]],
             tag: int = 0) -> None:
    """Send and receive tensors between pipeline ranks (peers are ranks in the pipeline group) as one batch, then
    wait for all of them (see the module docstring)."""
    ops = [dist.P2POp(dist.irecv, buffer, group=groups.pp, group_peer=peer, tag=tag) for buffer, peer in recvs]
    ops += [dist.P2POp(dist.isend, tensor, group=groups.pp, group_peer=peer, tag=tag) for tensor, peer in sends]
    if not ops:
        return
    for work in dist.batch_isend_irecv(ops):
        work.wait()


def _outgoing(tensor: torch.Tensor, io: StageIO, what: str) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(io.shape):
        # The receiver allocated io.shape: sending anything else would corrupt or hang the pipeline.
        raise RuntimeError(f"pipeline {what} has shape {tuple(tensor.shape)}, the stages agreed on {io.shape}")
    return tensor.detach().to(io.dtype).contiguous()


def recv_forward(io: StageIO, groups: ParallelGroups, requires_grad: bool = True) -> torch.Tensor | None:
    """The previous stage's output for this stage (None on the first stage)."""
    if groups.is_pipeline_first:
        return None
    buffer = io.empty()
    exchange(groups, [], [(buffer, groups.pp_rank - 1)])
    return buffer.requires_grad_(requires_grad)


def send_forward(output: torch.Tensor, io: StageIO, groups: ParallelGroups) -> None:
    """Hand this stage's output to the next stage (no-op on the last stage)."""
    if not groups.is_pipeline_last:
        exchange(groups, [(_outgoing(output, io, "activation"), groups.pp_rank + 1)], [])


def recv_backward(io: StageIO, groups: ParallelGroups) -> torch.Tensor | None:
    """The gradient of this stage's output, from the next stage (None on the last stage)."""
    if groups.is_pipeline_last:
        return None
    buffer = io.empty()
    exchange(groups, [], [(buffer, groups.pp_rank + 1)])
    return buffer


def send_backward(input_grad: torch.Tensor | None, io: StageIO, groups: ParallelGroups) -> None:
    """Hand the gradient of this stage's input back to the previous stage (no-op on the first stage)."""
    if not groups.is_pipeline_first:
        assert input_grad is not None, "a stage that received hidden states must send their gradient back"
        exchange(groups, [(_outgoing(input_grad, io, "gradient"), groups.pp_rank - 1)], [])


def send_forward_recv_backward(output: torch.Tensor, io: StageIO, groups: ParallelGroups) -> torch.Tensor | None:
    """Send this micro-batch's output on and receive the output gradient of the oldest micro-batch in flight."""
    if groups.is_pipeline_last:
        return None
    grad = io.empty()
    exchange(groups, [(_outgoing(output, io, "activation"), groups.pp_rank + 1)], [(grad, groups.pp_rank + 1)])
    return grad


def send_backward_recv_forward(input_grad: torch.Tensor | None, io: StageIO, groups: ParallelGroups
                               ) -> torch.Tensor | None:
    """Send an input gradient back and receive the next micro-batch's input from the previous stage."""
    if groups.is_pipeline_first:
        return None
    assert input_grad is not None, "a stage that received hidden states must send their gradient back"
    buffer = io.empty()
    exchange(groups, [(_outgoing(input_grad, io, "gradient"), groups.pp_rank - 1)], [(buffer, groups.pp_rank - 1)])
    return buffer.requires_grad_()


def _backward(stage_input: torch.Tensor | None, output: torch.Tensor, output_grad: torch.Tensor | None,
              loss_scale: float) -> torch.Tensor | None:
    """Backward of one micro-batch through this stage; returns the gradient of its input (None on the first stage)."""
    if output_grad is None:  # last stage: output is the loss
        torch.autograd.backward(output * loss_scale)
    else:
        torch.autograd.backward(output, grad_tensors=output_grad.to(output.dtype))
    if stage_input is None:
        return None
    if stage_input.grad is None:  # the stage's output did not depend on its input (cannot happen for MambaModel)
        return torch.zeros_like(stage_input)
    return stage_input.grad


def forward_backward_pipelining(
    forward_step: StageForward,
    num_microbatches: int,
    groups: ParallelGroups,
    io: StageIO,
    *,
    loss_scale: float = 1.0,
) -> list[torch.Tensor]:
    """Forward and backward of ``num_microbatches`` micro-batches through this stage, 1F1B order.

    ``forward_step(i, hidden_states)`` runs micro-batch ``i`` through this rank's stage; on the last stage it returns
    the micro-batch's loss, whose gradient is scaled by ``loss_scale`` (the training loop passes 1 / tokens of the
    global batch). Gradients accumulate into ``param.grad``. Collective over the pipeline group: every stage calls it
    with the same ``num_microbatches``. Returns the detached losses on the last stage, in micro-batch order, and an
    empty list on the other stages (see :func:`broadcast_from_last_stage`).
    """
    rank, size = groups.pp_rank, groups.pp_size
    num_warmup = min(size - rank - 1, num_microbatches)
    num_steady = num_microbatches - num_warmup
    is_last = groups.is_pipeline_last
    losses: list[torch.Tensor] = []
    in_flight: list[tuple[torch.Tensor | None, torch.Tensor]] = []  # (input, output) of forwards awaiting backward

    def run_forward(index: int, stage_input: torch.Tensor | None) -> torch.Tensor:
        output = forward_step(index, stage_input)
        if is_last:
            losses.append(output.detach())
        in_flight.append((stage_input, output))
        return output

    for index in range(num_warmup):
        output = run_forward(index, recv_forward(io, groups))
        send_forward(output, io, groups)

    stage_input = recv_forward(io, groups) if num_steady > 0 else None
    for step in range(num_steady):
        output = run_forward(num_warmup + step, stage_input)
        output_grad = send_forward_recv_backward(output, io, groups)
        oldest_input, oldest_output = in_flight.pop(0)
        input_grad = _backward(oldest_input, oldest_output, output_grad, loss_scale)
        if step == num_steady - 1:
            stage_input = None
            send_backward(input_grad, io, groups)
        else:
            stage_input = send_backward_recv_forward(input_grad, io, groups)

    for _ in range(num_warmup):
        oldest_input, oldest_output = in_flight.pop(0)
        output_grad = recv_backward(io, groups)
        send_backward(_backward(oldest_input, oldest_output, output_grad, loss_scale), io, groups)
    assert not in_flight
    return losses


@torch.no_grad()
def forward_only_pipelining(forward_step: StageForward, num_microbatches: int, groups: ParallelGroups, io: StageIO
                            ) -> list[torch.Tensor]:
    """Forward of every micro-batch through the pipeline, no backward (evaluation).

    Returns the last stage's outputs (``forward_step``'s results: losses, or logits), an empty list elsewhere.
    Nothing is kept between micro-batches, so each stage simply receives, computes and sends in micro-batch order.
    """
    outputs = []
    for index in range(num_microbatches):
        output = forward_step(index, recv_forward(io, groups, requires_grad=False))
        if groups.is_pipeline_last:
            outputs.append(output)
        else:
            send_forward(output, io, groups)
    return outputs


def broadcast_from_last_stage(value: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """Copy ``value`` of the last pipeline stage to every stage, in place (losses exist only on the last stage;
    every rank needs them to take the same NaN-skip decision and rank 0 logs them)."""
    if groups.pp is not None:
        dist.broadcast(value, group=groups.pp, group_src=groups.pp_size - 1)
    return value
