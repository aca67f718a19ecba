"""Runs the model's cached forward passes on one rank: prefill of a slot, decode of the leading slots, slot moves.

The engine (tensor-parallel rank 0) and the tensor-parallel workers (``tp_worker``) each own a ``ModelRunner`` over
their shard of the model and call the same methods in the same order; on rank 0 every call is first announced to the
workers through a :class:`~megatron_hybrid.inference.tp_worker.TensorParallelChannel`, so the collectives inside the
model line up.

CUDA graphs (``use_cuda_graphs`` on a CUDA model): the decode step is captured once per batch-size bucket (1, 2, 4,
8, ..., max_batch_size) at construction, while the cache is still empty (warm-up passes write into it). The token ids,
the positions and every cache are static tensors; a step copies its ids and positions into the leading rows, pads the
bucket's remaining rows (free slots, whose states are never read) with position 0, and replays. Captured graphs attend
over the whole cache length (masked per row), since a graph cannot depend on the batch's lengths.

On a CPU model at tensor-parallel size 1 the decode step, and the prefill of prompts of up to
``lean_decode.PREFILL_MAX_TOKENS`` tokens, run through :class:`LeanDecoder` (the same computation as the layers'
paths, flattened: the per-module overhead is most of a small model's CPU decode time) unless ``lean_decode=False``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from megatron_hybrid.inference.context import InferenceContext
from megatron_hybrid.inference.lean_decode import LeanDecoder

if TYPE_CHECKING:
    from megatron_hybrid.inference.tp_worker import TensorParallelChannel


def graph_buckets(max_batch_size: int) -> list[int]:
    """Batch sizes a decode graph is captured for: powers of two below ``max_batch_size``, and it."""
    buckets, size = [], 1
    while size < max_batch_size:
        buckets.append(size)
        size *= 2
    return [*buckets, max_batch_size]


class ModelRunner:
    """The cached forwards of ``model`` on this rank (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        max_batch_size: int,
        max_sequence_length: int,
        *,
        use_cuda_graphs: bool = False,
        ssm_state_dtype: torch.dtype = torch.float32,
        channel: TensorParallelChannel | None = None,
        lean_decode: bool = True,
    ) -> None:
        self.model = model
        self.channel = channel
        if channel is not None:
            channel.send_init(max_batch_size, max_sequence_length, use_cuda_graphs, ssm_state_dtype)
        self.device = next(model.parameters()).device
        self.context = InferenceContext(
            model, max_batch_size, max_sequence_length, device=self.device, ssm_state_dtype=ssm_state_dtype
        )
        self.max_batch_size = max_batch_size
        self.max_sequence_length = max_sequence_length
        self.use_cuda_graphs = use_cuda_graphs and self.device.type == "cuda"
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.lean_decoder = None
        if lean_decode and self.device.type == "cpu" and LeanDecoder.unsupported_reason(model, self.context) is None:
            self.lean_decoder = LeanDecoder(model, self.context)
        if self.use_cuda_graphs:
            self._ids = torch.zeros(max_batch_size, 1, dtype=torch.long, device=self.device)
            self._capture_graphs()

    # ------------------------------------------------------------------------------------------------ forwards

    @torch.inference_mode()
    def prefill(self, slot: int, prompt_ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Run prompts ``prompt_ids`` [k, s] (one length) into the empty slots ``slot .. slot + k - 1``.

        Returns logits [k, s, vocab] if ``all_logits`` else [k, 1, vocab]; a 1-D ``prompt_ids`` [s] is one prompt
        and gives [s or 1, vocab].
        """
        single = prompt_ids.dim() == 1
        if single:
            prompt_ids = prompt_ids[None]
        if self.channel is not None:
            self.channel.send_prefill(slot, prompt_ids, all_logits)
        self.context.set_prefill(slot, prompt_ids.shape[0], last_token_logits_only=not all_logits)
        if self.lean_decoder is not None and self.lean_decoder.can_prefill(prompt_ids.shape[1]):
            logits = self.lean_decoder.prefill(slot, prompt_ids, all_logits)
        else:
            logits = self.model(prompt_ids, inference_context=self.context)
        return logits[0] if single else logits

    @torch.inference_mode()
    def decode(self, token_ids: torch.Tensor, positions: torch.Tensor, attention_length: int) -> torch.Tensor:
        """One step for slots ``0 .. n - 1``: token ``token_ids[i]`` [n] at ``positions[i]`` [n]; logits [n, vocab].

        ``attention_length`` = ``max(positions) + 1`` (eager mode reads only that much of the KV cache).
        """
        if self.channel is not None:
            self.channel.send_decode(token_ids, positions, attention_length)
        batch = token_ids.shape[0]
        context = self.context
        if self._graphs:
            bucket = next(size for size in sorted(self._graphs) if size >= batch)
            graph, logits = self._graphs[bucket]
            self._ids[:batch, 0].copy_(token_ids)
            context.positions[:batch].copy_(positions)
            if bucket > batch:
                self._ids[batch:bucket].zero_()
                context.positions[batch:bucket].zero_()
            graph.replay()
            return logits[:batch, 0]
        context.set_decode(batch, attention_length)
        context.positions[:batch].copy_(positions)
        if self.lean_decoder is not None:
            return self.lean_decoder(token_ids)
        return self.model(token_ids[:, None], inference_context=context)[:, 0]

    @torch.inference_mode()
    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Move the caches of slot ``src`` (``length`` cached tokens) into slot ``dst``."""
        if self.channel is not None:
            self.channel.send_move(src, dst, length)
        self.context.move_slot(src, dst, length)

    def close(self) -> None:
        """Release the tensor-parallel workers (their loop returns)."""
        if self.channel is not None:
            self.channel.send_stop()
            self.channel = None

    # ------------------------------------------------------------------------------------------------ CUDA graphs

    @torch.inference_mode()
    def _capture_graphs(self) -> None:
        context = self.context
        pool = torch.cuda.graph_pool_handle()
        # Largest first: the smaller graphs then reuse the memory pool the largest one reserved.
        for bucket in sorted(graph_buckets(self.max_batch_size), reverse=True):
            context.set_decode(bucket)  # attention over the whole cache: static across steps
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: lazy initialisation, kernel autotuning, allocator growth
                    self.model(self._ids[:bucket], inference_context=context)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.model(self._ids[:bucket], inference_context=context)
            self._graphs[bucket] = (graph, logits)
        torch.cuda.synchronize()
        context.reset()  # the warm-ups wrote into the cache
