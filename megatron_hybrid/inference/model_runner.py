"""Runs the model's cached forward passes on one rank: prefill of a slot, decode of the leading slots, slot moves.

The engine (tensor-parallel rank 0) and the tensor-parallel workers (``tp_worker``) each own a ``ModelRunner`` over
their shard of the model and call the same methods in the same order; on rank 0 every call is first announced to the
workers through a :class:`~megatron_hybrid.inference.tp_worker.TensorParallelChannel`, so the collectives inside the
model line up.

CUDA graphs (``use_cuda_graphs`` on a CUDA model): the decode step is captured once per batch-size bucket (1, 2, 4,
8, ..., max_batch_size) at construction, while the cache is still empty (warm-up passes write into it). The token ids,
the positions (``InferenceContext.decode_inputs``) and every cache are static tensors; a step copies its ids and
positions into the leading rows, pads the bucket's remaining rows (free slots, whose states are never read) with
position 0, and replays. Captured graphs attend over the whole cache length (masked per row), since a graph cannot
depend on the batch's lengths. Each graph also computes the greedy tokens (argmax) of its logits, so a greedy step
(``decode_greedy``) is one replay and one device-to-host copy of the token ids.

Step inputs given as Python lists (what the engine has) reach a CUDA device through a pinned staging buffer in one
asynchronous copy: no host synchronisation before the replay, the step's only one is reading its tokens back. Each
graph also writes its greedy tokens and the positions + 1 into the step inputs, so the next greedy step can be
replayed before the host has read this one's tokens (``decode_greedy_async`` / ``decode_greedy_next``: the engine
keeps the GPU busy while it does its bookkeeping).

On a CPU model at tensor-parallel size 1 the decode step, and the prefill of prompts of up to
``lean_decode.PREFILL_MAX_TOKENS`` tokens, run through :class:`LeanDecoder` (the same computation as the layers'
paths, flattened: the per-module overhead is most of a small model's CPU decode time) unless ``lean_decode=False``.
On a CUDA model at tensor-parallel size 1, batch-1 decode steps (eager, and the batch-1 graph) run through
:class:`~megatron_hybrid.inference.fused_decode.FusedDecoder` (norms inside the linears, one kernel per Mamba step)
unless ``fused_decode_step=False``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from megatron_hybrid.inference.context import InferenceContext
from megatron_hybrid.inference.fused_decode import MAX_BATCH as FUSED_MAX_BATCH
from megatron_hybrid.inference.fused_decode import FusedDecoder
from megatron_hybrid.inference.lean_decode import LeanDecoder
from megatron_hybrid.inference.sampling import greedy_tokens
from megatron_hybrid.layers.attention import SelfAttention
from megatron_hybrid.layers.mamba_mixer import MambaMixer
from megatron_hybrid.models.mamba_stack import MambaStack
from megatron_hybrid.ops import greedy_tokens_and_feed

if TYPE_CHECKING:
    from megatron_hybrid.inference.tp_worker import TensorParallelChannel


def set_decode_fusions(model: nn.Module, *, mamba: bool = True, attention: bool = True, residual: bool = True) -> None:
    """Switch the CUDA decode-step fusions of ``model`` (all on by default; benchmarks and tests compare them): the
    fused Triton Mamba step (``MambaMixer.fused_decode``), the Triton decode attention (``SelfAttention.fused_decode``)
    and the residual carried into the next norm (``MambaStack.fused_residual_decode``). Takes effect at the next
    forward; graphs already captured keep what they captured."""
    for module in model.modules():
        if isinstance(module, MambaMixer):
            module.fused_decode = mamba
        elif isinstance(module, SelfAttention):
            module.fused_decode = attention
        elif isinstance(module, MambaStack):
            module.fused_residual_decode = residual


class PendingTokens:
    """Greedy tokens on their way to the host (``ModelRunner.decode_greedy_async``): ``tolist()`` waits for them."""

    def __init__(self, host: torch.Tensor, event: torch.cuda.Event) -> None:
        self._host = host
        self._event = event

    def tolist(self) -> list[int]:
        self._event.synchronize()
        return self._host.tolist()


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
        fused_decode_step: bool = True,
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
        # bucket -> (graph, its logits [bucket, 1, vocab], its greedy tokens [bucket]), all static outputs
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._buckets: list[int] = []  # sorted keys of _graphs
        self.lean_decoder = None
        if lean_decode and self.device.type == "cpu" and LeanDecoder.unsupported_reason(model, self.context) is None:
            self.lean_decoder = LeanDecoder(model, self.context)
        self.fused_decoder = None
        if fused_decode_step and FusedDecoder.unsupported_reason(model) is None:
            self.fused_decoder = FusedDecoder(model, self.context)
        self._ids = self.context.decode_inputs[0].view(max_batch_size, 1)  # the model's [b, 1] input ids
        self._staging = self._staged = None
        if self.device.type == "cuda":
            # Host side of the step-input upload: pinned, so the copy is asynchronous; the event says when the last
            # upload has read it (a step writes it only after that, normally long done by then).
            self._staging = torch.zeros(2, max_batch_size, dtype=torch.long, pin_memory=True)
            self._staged = torch.cuda.Event()
            self._staged.record()
        self._host_slot = 0
        self._host_tokens: list[tuple[torch.Tensor, torch.cuda.Event]] = []
        if self.use_cuda_graphs:
            self._host_tokens = [(torch.zeros(max_batch_size, dtype=torch.long, pin_memory=True), torch.cuda.Event())
                                 for _ in range(2)]
            for _, event in self._host_tokens:
                event.record()
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
    def decode(
        self,
        token_ids: torch.Tensor | Sequence[int],
        positions: torch.Tensor | Sequence[int],
        attention_length: int,
    ) -> torch.Tensor:
        """One step for slots ``0 .. n - 1``: token ``token_ids[i]`` [n] at ``positions[i]`` [n]; logits [n, vocab].

        ``attention_length`` = ``max(positions) + 1`` (eager mode reads only that much of the KV cache). Ids and
        positions may be tensors or lists of ints (lists are uploaded without a host synchronisation on CUDA).
        With CUDA graphs the logits are a view of the graph's static output: valid until the next step (clone them
        to keep them).
        """
        return self._decode(token_ids, positions, attention_length, greedy=False)

    @torch.inference_mode()
    def decode_greedy(
        self,
        token_ids: torch.Tensor | Sequence[int],
        positions: torch.Tensor | Sequence[int],
        attention_length: int,
    ) -> torch.Tensor:
        """Like :meth:`decode`, but returns the greedy next tokens [n] (``sampling.greedy_tokens`` of the logits, on
        the model's device) instead of the logits: computed inside the captured graph when graphs are used."""
        return self._decode(token_ids, positions, attention_length, greedy=True)

    @torch.inference_mode()
    def decode_greedy_async(
        self, token_ids: Sequence[int], positions: Sequence[int], attention_length: int
    ) -> PendingTokens:
        """:meth:`decode_greedy` with CUDA graphs, returned as a pending host copy of the tokens: the step and the copy
        are queued and nothing waits for them, so :meth:`decode_greedy_next` can be queued behind before the host
        reads these tokens (``PendingTokens.tolist``)."""
        if not self._graphs or self.channel is not None:
            raise RuntimeError("decode_greedy_async needs CUDA graphs at tensor-parallel size 1")
        return self._pending(self._decode(token_ids, positions, attention_length, greedy=True))

    @torch.inference_mode()
    def decode_greedy_next(self, batch: int) -> PendingTokens:
        """The greedy step after the last greedy graph step of the same leading ``batch`` rows, on the inputs that step
        fed on the device (its tokens, positions + 1): queued without any host data or synchronisation."""
        if not self._graphs or self.channel is not None:
            raise RuntimeError("decode_greedy_next needs CUDA graphs at tensor-parallel size 1")
        graph, _, tokens = self._graphs[next(size for size in self._buckets if size >= batch)]
        graph.replay()
        return self._pending(tokens[:batch])

    def _pending(self, tokens: torch.Tensor) -> PendingTokens:
        """An asynchronous copy of ``tokens`` into the next of two pinned host buffers (two steps may be pending)."""
        self._host_slot = 1 - self._host_slot
        buffer, event = self._host_tokens[self._host_slot]
        event.synchronize()  # the copy that last used this buffer has been read (normally long ago)
        target = buffer[: tokens.shape[0]]
        target.copy_(tokens, non_blocking=True)
        event.record()
        return PendingTokens(target, event)

    def _decode(
        self,
        token_ids: torch.Tensor | Sequence[int],
        positions: torch.Tensor | Sequence[int],
        attention_length: int,
        greedy: bool,
    ) -> torch.Tensor:
        batch = len(token_ids)
        if self.channel is not None:
            self.channel.send_decode(
                torch.as_tensor(token_ids, dtype=torch.long, device=self.device),
                torch.as_tensor(positions, dtype=torch.long, device=self.device),
                attention_length,
            )
        context = self.context
        if self._graphs:
            bucket = next(size for size in self._buckets if size >= batch)
            graph, logits, tokens = self._graphs[bucket]
            self._stage_inputs(token_ids, positions, bucket)
            graph.replay()
            return tokens[:batch] if greedy else logits[:batch, 0]
        context.set_decode(batch, attention_length)
        self._stage_inputs(token_ids, positions, batch)
        logits = self._step(batch)[:, 0]
        return greedy_tokens(logits) if greedy else logits

    def _step(self, batch: int) -> torch.Tensor:
        """Logits [batch, 1, vocab] of a decode step of the leading ``batch`` rows of the context's inputs, through
        the fused batch-1 step, the lean CPU step or the layers, whichever applies."""
        if self.fused_decoder is not None and batch <= FUSED_MAX_BATCH:
            return self.fused_decoder(self._ids[:batch, 0])
        if self.lean_decoder is not None:
            return self.lean_decoder(self._ids[:batch, 0])[:, None]
        return self.model(self._ids[:batch], inference_context=self.context)

    def _stage_inputs(
        self, token_ids: torch.Tensor | Sequence[int], positions: torch.Tensor | Sequence[int], rows: int
    ) -> None:
        """Write the step's ids and positions into the leading rows of ``context.decode_inputs``; rows ``n .. rows -
        1`` (a graph bucket's padding: free slots, never read) get id 0 at position 0."""
        inputs = self.context.decode_inputs
        batch = len(token_ids)
        if self._staging is not None and not isinstance(token_ids, torch.Tensor) and not isinstance(
            positions, torch.Tensor
        ):
            # One asynchronous copy of the whole (tiny) pinned buffer: contiguous, so it stays asynchronous. Rows past
            # ``rows`` are zeroed too, which is harmless: positions are rewritten for every live slot at every step.
            self._staged.synchronize()  # the previous upload has finished reading the staging buffer
            staging = self._staging.numpy()  # a view: numpy writes a list into it without a temporary tensor
            staging[0, :batch] = token_ids
            staging[1, :batch] = positions
            staging[:, batch:] = 0
            inputs.copy_(self._staging, non_blocking=True)
            self._staged.record()
            return
        inputs[0, :batch].copy_(torch.as_tensor(token_ids))
        inputs[1, :batch].copy_(torch.as_tensor(positions))
        if rows > batch:
            inputs[:, batch:rows].zero_()

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
                for _ in range(2):  # warm-up: lazy initialisation, kernel compilation and autotuning, allocator
                    inputs = context.decode_inputs
                    greedy_tokens_and_feed(self._step(bucket)[:, 0], inputs[0, :bucket], inputs[1, :bucket])
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._step(bucket)
                # The greedy tokens (saves greedy steps a launch), also fed to the next greedy step on the device (its
                # ids, and the positions + 1), so ``decode_greedy_next`` can replay without the host; a host-staged
                # step overwrites both rows.
                inputs = context.decode_inputs
                tokens = greedy_tokens_and_feed(logits[:, 0], inputs[0, :bucket], inputs[1, :bucket])
            self._graphs[bucket] = (graph, logits, tokens)
        self._buckets = sorted(self._graphs)
        torch.cuda.synchronize()
        context.reset()  # the warm-ups wrote into the cache
