"""Tensor-parallel inference: rank 0 of the tensor-parallel group drives the engine, the other ranks follow.

Every rank holds its shard of the model and of the caches. Before each model call, rank 0's
:class:`~megatron_hybrid.inference.model_runner.ModelRunner` broadcasts a command (what to run and its token ids /
positions) over the tensor-parallel group; the workers, in :func:`run_tp_worker`, receive it and make the same call on
their own runner, so every collective inside the model (the row-parallel all-reduces, the vocab-parallel embedding,
the logits gather) meets its partners. Only rank 0 samples: the tokens it picks reach the workers as the next decode
command's input, so no rank ever needs a sampled token it did not receive.

Usage (every rank builds the same tensor-parallel model, e.g. with ``shard_state_dict``)::

    if groups.tp_rank == 0:
        engine = InferenceEngine(model, tokenizer)      # broadcasts its cache settings to the workers
        ...                                             # serve: add_request / step
        engine.close()                                  # releases the workers
    else:
        run_tp_worker(model)                            # returns when rank 0 closes its engine

Wire format: a header of ``HEADER_SIZE`` int64 (opcode, four arguments, payload length), then, when the length is
non-zero, an int64 payload. Tensors travel on the model's device (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

OP_INIT, OP_PREFILL, OP_DECODE, OP_MOVE, OP_STOP = range(5)
HEADER_SIZE = 6
_STATE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

__all__ = ["TensorParallelChannel", "run_tp_worker"]


class TensorParallelChannel:
    """Broadcast of runner commands from the tensor-parallel group's first rank to the others."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device) -> None:
        self.group = group
        self.device = device
        self.source = dist.get_global_rank(group, 0)
        self.is_source = dist.get_rank(group) == 0

    # ------------------------------------------------------------------------------------------------ rank 0

    def _send(self, op: int, args: tuple[int, ...] = (), payload: torch.Tensor | None = None) -> None:
        length = 0 if payload is None else payload.numel()
        header = torch.tensor([op, *args, *([0] * (4 - len(args))), length], dtype=torch.long, device=self.device)
        dist.broadcast(header, self.source, group=self.group)
        if length:
            dist.broadcast(payload.to(device=self.device, dtype=torch.long).contiguous(), self.source, group=self.group)

    def send_init(
        self, max_batch_size: int, max_sequence_length: int, use_cuda_graphs: bool, ssm_state_dtype: torch.dtype
    ) -> None:
        if ssm_state_dtype not in _STATE_DTYPES:
            raise ValueError(f"ssm_state_dtype must be one of {_STATE_DTYPES}, got {ssm_state_dtype}")
        code = _STATE_DTYPES.index(ssm_state_dtype)
        self._send(OP_INIT, (max_batch_size, max_sequence_length, int(use_cuda_graphs), code))

    def send_prefill(self, slot: int, prompt_ids: torch.Tensor, all_logits: bool) -> None:
        """``prompt_ids`` [k, s]: k prompts of one length into slots ``slot ..``."""
        self._send(OP_PREFILL, (slot, int(all_logits), prompt_ids.shape[0]), prompt_ids.reshape(-1))

    def send_decode(self, token_ids: torch.Tensor, positions: torch.Tensor, attention_length: int) -> None:
        self._send(OP_DECODE, (token_ids.shape[0], attention_length), torch.cat([token_ids, positions]))

    def send_move(self, src: int, dst: int, length: int) -> None:
        self._send(OP_MOVE, (src, dst, length))

    def send_stop(self) -> None:
        self._send(OP_STOP)

    # ------------------------------------------------------------------------------------------------ workers

    def receive(self) -> tuple[int, list[int], torch.Tensor | None]:
        """(opcode, the four arguments, payload or None) of rank 0's next command."""
        header = torch.empty(HEADER_SIZE, dtype=torch.long, device=self.device)
        dist.broadcast(header, self.source, group=self.group)
        op, *args, length = header.tolist()
        payload = None
        if length:
            payload = torch.empty(length, dtype=torch.long, device=self.device)
            dist.broadcast(payload, self.source, group=self.group)
        return op, args, payload


def run_tp_worker(model: nn.Module) -> None:
    """Follow rank 0's engine on a non-zero tensor-parallel rank until it calls ``InferenceEngine.close()``.

    ``model`` is this rank's shard of the same model rank 0 serves (``model.groups`` names the tensor-parallel group).
    """
    from megatron_hybrid.inference.model_runner import ModelRunner

    groups = model.groups
    if groups.tp_size == 1:
        raise ValueError("run_tp_worker needs a tensor-parallel model (tp size > 1)")
    if groups.tp_rank == 0:
        raise ValueError("tensor-parallel rank 0 drives the InferenceEngine; run_tp_worker is for the other ranks")
    model.eval()
    channel = TensorParallelChannel(groups.tp, next(model.parameters()).device)
    runner: ModelRunner | None = None
    while True:
        op, args, payload = channel.receive()
        if op == OP_STOP:
            return
        if op == OP_INIT:
            max_batch_size, max_sequence_length, use_cuda_graphs, code = args
            runner = ModelRunner(
                model, max_batch_size, max_sequence_length, use_cuda_graphs=bool(use_cuda_graphs),
                ssm_state_dtype=_STATE_DTYPES[code],
            )
            continue
        if runner is None:
            raise RuntimeError(f"tensor-parallel worker got command {op} before the engine's init")
        if op == OP_PREFILL:
            runner.prefill(args[0], payload.view(args[2], -1), all_logits=bool(args[1]))
        elif op == OP_DECODE:
            batch, attention_length = args[0], args[1]
            runner.decode(payload[:batch], payload[batch:], attention_length)
        elif op == OP_MOVE:
            runner.move_slot(args[0], args[1], args[2])
        else:
            raise RuntimeError(f"tensor-parallel worker got unknown command {op}")
