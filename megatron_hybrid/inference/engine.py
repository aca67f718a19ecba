"""The inference engine: continuous batching of generation requests over a fixed set of cache slots.

Each ``step()``:

1. admits waiting requests while slots are free (first come, first served): prompts are prefilled at their exact
   length into the next free slots, several at once only when they have the same length, so no padding ever enters a
   state; each request's first token is sampled from its prompt's last logits;
2. runs ONE decode step for every active request together (the new ones included), samples, and emits a
   :class:`TokenEvent` per generated token.

Live requests always occupy the leading slots ``0 .. n - 1``: when one finishes, the last one's caches move into its
slot. A decode step is then one batched forward over contiguous leading views of every cache (CUDA-graph friendly).

With CUDA graphs (tensor-parallel size 1) all-greedy steps are pipelined: each ``step()`` queues the NEXT decode step
(its inputs fed on the device by the current one) before reading the current one's tokens, so the GPU never waits for
the host's bookkeeping. Whenever the batch changes (a request ends, an abort, an admission) the step queued ahead is
read first and its tokens accepted for the requests still generating, so every request gets exactly the tokens of
unpipelined decoding; a ``step()`` may then report two tokens of a request.

The engine is not thread-safe: call it from one thread (the server's scheduler thread). Under tensor parallelism it
runs on tensor-parallel rank 0 while the other ranks run :func:`megatron_hybrid.inference.tp_worker.run_tp_worker`.
"""

from __future__ import annotations

import uuid
import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_hybrid.inference.model_runner import ModelRunner, PendingTokens
from megatron_hybrid.inference.sampling import IncrementalDetokenizer, SamplingParams, make_generator, sample_tokens
from megatron_hybrid.inference.tp_worker import TensorParallelChannel
from megatron_hybrid.models.mamba_model import MambaModel

__all__ = ["GenerationOutput", "InferenceEngine", "TokenEvent"]

NO_TOKEN = -1  # token_id of an event that finishes a request without a new token (abort, max_new_tokens == 0)


@dataclass
class TokenEvent:
    """One generated token of a request, or (``token_id == -1``) the end of a request that produced no new token.

    ``text`` (only with a tokenizer): the piece of generated text this event releases, for streaming. It may be empty
    (a multi-byte character still incomplete, or a tail held back because it could begin a stop string) and never
    includes a stop string or a stop token's text. Concatenating a request's ``text`` pieces gives its final text.

    ``prompt_logprobs`` (only on a request's first event, and only when its ``SamplingParams.prompt_logprobs`` asked):
    the log-probabilities of prompt tokens 1..n-1, known from the prefill. They come with the first event, not only
    with the finished :class:`GenerationOutput`, so that a streaming client can show the echoed prompt's
    log-probabilities before the generation that follows it.
    """

    request_id: str
    token_id: int
    logprob: float | None
    finished: bool
    finish_reason: str | None  # "length" | "stop" | "abort"
    text: str | None = None
    prompt_logprobs: list[float] | None = None


@dataclass
class GenerationOutput:
    """A finished request. ``token_ids`` are the generated tokens (a stop token included, as the last one);
    ``logprobs`` their raw-model log-probs; ``prompt_logprobs`` those of prompt tokens 1..n-1; ``text`` the generated
    text (with a tokenizer) without the stop token's text and cut before a stop string."""

    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float] | None
    prompt_logprobs: list[float] | None
    finish_reason: str
    text: str | None


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    prompt_logprobs: list[float] | None = None
    cache_length: int = 0  # tokens whose states are in the cache
    finish_reason: str | None = None


def _detokenize_fn(tokenizer: Any):
    for name in ("detokenize", "decode"):
        function = getattr(tokenizer, name, None)
        if callable(function):
            return function
    raise TypeError(f"tokenizer {tokenizer!r} has neither detokenize(ids) nor decode(ids)")


class InferenceEngine:
    """Generation with caches, sampling and continuous batching over ``model`` (see the module docstring).

    ``tokenizer`` (anything with ``detokenize(ids) -> str`` or ``decode``) is needed for stop strings and text.
    ``max_sequence_length`` (prompt + generated tokens; default ``config.max_position_embeddings``) sizes the KV cache.
    ``use_cuda_graphs`` captures the decode step per batch-size bucket on a CUDA model (ignored, with a warning, on
    CPU). ``ssm_state_dtype`` is the Mamba state's precision (float32 by default). ``lean_decode`` lets a float32 CPU
    model at TP=1 decode through the flattened :class:`~megatron_hybrid.inference.lean_decode.LeanDecoder` (same
    results, a fraction of the per-layer overhead); ``fused_decode_step`` lets a CUDA model at TP=1 take its batch-1
    steps through :class:`~megatron_hybrid.inference.fused_decode.FusedDecoder` (norms inside the linears, fewer
    kernels). The model is put in eval mode.
    """

    def __init__(
        self,
        model: MambaModel,
        tokenizer: Any = None,
        *,
        max_batch_size: int = 16,
        max_sequence_length: int | None = None,
        use_cuda_graphs: bool = False,
        ssm_state_dtype: torch.dtype = torch.float32,
        lean_decode: bool = True,
        fused_decode_step: bool = True,
    ) -> None:
        config = model.config
        groups = model.groups
        if not (model.pre_process and model.post_process):
            raise ValueError("InferenceEngine needs the whole model (pipeline-parallel inference is not supported)")
        if config.sequence_parallel and groups.tp_size > 1:
            raise ValueError("build the inference model with sequence_parallel=False (one-token steps cannot be split)")
        if groups.tp_size > 1 and groups.tp_rank != 0:
            raise ValueError("the InferenceEngine runs on tensor-parallel rank 0; the other ranks run run_tp_worker()")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        max_sequence_length = max_sequence_length or config.max_position_embeddings
        if max_sequence_length < 2:
            raise ValueError(f"max_sequence_length must be >= 2, got {max_sequence_length}")
        device = next(model.parameters()).device
        if use_cuda_graphs and device.type != "cuda":
            warnings.warn("use_cuda_graphs needs a CUDA model; decoding eagerly on " + str(device), stacklevel=2)
            use_cuda_graphs = False
        model.eval()
        self.model = model
        self.tokenizer = tokenizer
        self._detokenize = _detokenize_fn(tokenizer) if tokenizer is not None else None
        self.vocab_size = config.vocab_size
        self.max_batch_size = max_batch_size
        self.max_sequence_length = max_sequence_length
        self.device = device
        channel = TensorParallelChannel(groups.tp, device) if groups.tp_size > 1 else None
        self.runner = ModelRunner(
            model, max_batch_size, max_sequence_length, use_cuda_graphs=use_cuda_graphs,
            ssm_state_dtype=ssm_state_dtype, channel=channel, lean_decode=lean_decode,
            fused_decode_step=fused_decode_step,
        )
        self.use_cuda_graphs = self.runner.use_cuda_graphs
        # Greedy steps are pipelined with CUDA graphs at TP=1: the next step is queued (fed on the device) before the
        # host reads this one's tokens, so the GPU does not idle while the host does its bookkeeping.
        self._pipelined = self.use_cuda_graphs and channel is None
        self._inflight: tuple[list[_Request], PendingTokens] | None = None  # queued ahead, tokens not yet read
        self._waiting: deque[_Request] = deque()
        self._active: list[_Request] = []  # index = cache slot
        self._finished: dict[str, GenerationOutput] = {}
        self._pending_events: list[TokenEvent] = []

    # ------------------------------------------------------------------------------------------------ requests

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; it is prefilled by the next ``step()`` that has a free slot.

        Raises ValueError (clear message) for a duplicate id, an empty prompt, ids outside the vocabulary, bad
        sampling parameters, stop strings without a tokenizer, or prompt + max_new_tokens beyond the context.
        """
        if not isinstance(request_id, str):
            raise ValueError(f"request_id must be a string, got {request_id!r}")
        if self._known(request_id):
            raise ValueError(f"request id {request_id!r} is already in use")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        params.validate()
        prompt = list(prompt_ids)
        if not prompt:
            raise ValueError("the prompt is empty: a prompt needs at least one token (e.g. BOS)")
        for token in prompt:
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < self.vocab_size:
                raise ValueError(f"prompt token {token!r} is not an id in [0, {self.vocab_size})")
        total = len(prompt) + params.max_new_tokens
        if total > self.max_sequence_length:
            raise ValueError(
                f"prompt of {len(prompt)} tokens + max_new_tokens {params.max_new_tokens} = {total} exceeds the "
                f"context of {self.max_sequence_length} tokens"
            )
        if params.stop_strings and self._detokenize is None:
            raise ValueError("stop_strings need an engine created with a tokenizer")
        generator = None if params.greedy else make_generator(params.seed, self.device)
        detokenizer = None
        if self._detokenize is not None:
            detokenizer = IncrementalDetokenizer(self._detokenize, prompt, params.stop_strings)
        self._waiting.append(
            _Request(
                request_id, prompt, params, generator, detokenizer,
                logprobs=[] if params.logprobs else None,
            )
        )

    def abort(self, request_id: str) -> None:
        """Drop a request (e.g. its client disconnected): its slot is freed now, the next ``step()`` reports an
        ``"abort"`` event, and no output is kept. Unknown or already finished ids only drop a kept output."""
        # Slots move below: the step queued ahead is read first (not its token for this request: it is dropped).
        self._settle(self._pending_events, dropping=request_id)
        for request in self._waiting:
            if request.request_id == request_id:
                self._waiting.remove(request)
                break
        else:
            for slot, request in enumerate(self._active):
                if request.request_id == request_id:
                    self._release_slots([slot])
                    break
            else:
                self._finished.pop(request_id, None)
                return
        text = "" if self._detokenize is not None else None
        self._pending_events.append(TokenEvent(request_id, NO_TOKEN, None, True, "abort", text))

    def has_unfinished(self) -> bool:
        """Whether any request is waiting or generating."""
        return bool(self._waiting or self._active)

    def pop_output(self, request_id: str) -> GenerationOutput:
        """The output of a finished request, removed from the engine (outputs are kept until popped or aborted)."""
        try:
            return self._finished.pop(request_id)
        except KeyError:
            raise KeyError(f"request {request_id!r} has no finished output (unknown, unfinished, or popped)") from None

    def num_active(self) -> int:
        return len(self._active)

    def num_waiting(self) -> int:
        return len(self._waiting)

    def cache_memory_bytes(self) -> dict[str, int]:
        """Cache memory on this rank per layer type: ``mamba_conv_state``, ``mamba_ssm_state``, ``attention_kv``,
        ``total``, and ``per_sequence`` (total / max_batch_size)."""
        return self.runner.context.memory_bytes()

    def close(self) -> None:
        """Release tensor-parallel workers (no-op at TP=1). The engine must not be used afterwards."""
        self.runner.close()

    def __enter__(self) -> InferenceEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------ stepping

    def step(self) -> list[TokenEvent]:
        """Admit (prefill) waiting requests into free slots, then one decode step for all active requests."""
        events, self._pending_events = self._pending_events, []
        with torch.inference_mode():
            free = self.max_batch_size - len(self._active)
            if self._waiting and free:
                self._settle(events)  # the batch changes: the step queued ahead is read first
                free = self.max_batch_size - len(self._active)
                admitted = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
                by_length: dict[int, list[_Request]] = {}
                for request in admitted:
                    by_length.setdefault(len(request.prompt_ids), []).append(request)
                for group in by_length.values():
                    self._prefill(group, events)
            if self._active:
                self._decode(events)
        return events

    def generate(
        self, prompts: Sequence[list[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[GenerationOutput]:
        """Generate for every prompt (one shared ``params`` or one per prompt); outputs in prompt order.

        Offline convenience: it steps the engine until its own requests finish, so events of other requests that
        run meanwhile are not returned to anyone (their outputs still wait in ``pop_output``).
        """
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        prefix = f"generate-{uuid.uuid4().hex}"
        ids = [f"{prefix}-{index}" for index in range(len(prompts))]
        added = []
        try:
            for request_id, prompt, request_params in zip(ids, prompts, params):
                self.add_request(request_id, prompt, request_params)
                added.append(request_id)
        except ValueError:
            for request_id in added:
                self.abort(request_id)
            self._pending_events = [e for e in self._pending_events if e.request_id not in added]
            raise
        while not all(request_id in self._finished for request_id in ids):
            self.step()
        return [self._finished.pop(request_id) for request_id in ids]

    # ------------------------------------------------------------------------------------------------ internals

    def _known(self, request_id: str) -> bool:
        return (
            request_id in self._finished
            or any(r.request_id == request_id for r in self._active)
            or any(r.request_id == request_id for r in self._waiting)
        )

    def _prefill(self, group: list[_Request], events: list[TokenEvent]) -> None:
        """Prefill equally long prompts together into the next free slots and sample their first tokens."""
        first_slot = len(self._active)
        length = len(group[0].prompt_ids)
        want_prompt_logprobs = length > 1 and any(r.params.prompt_logprobs for r in group)
        prompts = torch.tensor([r.prompt_ids for r in group], dtype=torch.long, device=self.device)
        logits = self.runner.prefill(first_slot, prompts, all_logits=want_prompt_logprobs)  # [k, s or 1, vocab]
        self._active.extend(group)
        if want_prompt_logprobs:
            log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            prompt_logprobs = log_probs.gather(-1, prompts[:, 1:, None])[..., 0].tolist()
        generating = [i for i, r in enumerate(group) if r.params.max_new_tokens > 0]
        tokens, logprobs = sample_tokens(
            logits[generating, -1],
            [group[i].params for i in generating],
            [group[i].generator for i in generating],
            want_logprobs=any(group[i].params.logprobs for i in generating),
        ) if generating else ([], None)
        sampled = {row: n for n, row in enumerate(generating)}
        finished = []
        for row, request in enumerate(group):
            request.cache_length = length
            if request.params.prompt_logprobs:
                request.prompt_logprobs = prompt_logprobs[row] if want_prompt_logprobs else []
            if row in sampled:
                n = sampled[row]
                self._accept(request, tokens[n], logprobs[n] if logprobs else None, events,
                             prompt_logprobs=request.prompt_logprobs)
            else:  # max_new_tokens == 0: scoring only (prompt log-probs)
                self._finish(request, "length")
                text = "" if request.detokenizer is not None else None
                events.append(TokenEvent(request.request_id, NO_TOKEN, None, True, "length", text,
                                         request.prompt_logprobs))
            if request.finish_reason is not None:
                finished.append(first_slot + row)
        if finished:
            self._release_slots(finished)

    def _decode(self, events: list[TokenEvent]) -> None:
        greedy = all(r.params.greedy and not r.params.logprobs for r in self._active)
        pipelined = greedy and self._pipelined
        if self._inflight is not None and not (pipelined and self._inflight_matches()):
            self._settle(events)  # a step queued ahead for another batch (cannot happen today): read it first
            if not self._active:
                return
        active = self._active
        # Plain lists: the runner uploads them in one asynchronous copy (no host synchronisation before the step).
        token_ids = [r.token_ids[-1] for r in active]
        lengths = [r.cache_length for r in active]
        attention_length = max(lengths) + 1
        if pipelined:
            # This step was queued by the previous one (device-fed), or is queued now from the host's inputs. The step
            # after it is queued before this one's tokens are read, unless a length limit ends a request here (a stop
            # token may still end one: ``_settle`` then reads the queued step before any slot moves).
            if self._inflight is not None:
                pending, self._inflight = self._inflight[1], None
            else:
                pending = self.runner.decode_greedy_async(token_ids, lengths, attention_length)
            if all(len(r.token_ids) + 1 < r.params.max_new_tokens
                   and r.cache_length + 2 < self.max_sequence_length for r in active):
                self._inflight = (list(active), self.runner.decode_greedy_next(len(active)))
            tokens = pending.tolist()
            logprobs = None
        elif greedy:
            # The common case: argmax on the device (inside the CUDA graph when there is one), then one copy of the
            # n token ids back; the step's only host synchronisation.
            tokens = self.runner.decode_greedy(token_ids, lengths, attention_length).tolist()
            logprobs = None
        else:
            logits = self.runner.decode(token_ids, lengths, attention_length)
            tokens, logprobs = sample_tokens(
                logits,
                [r.params for r in active],
                [r.generator for r in active],
                want_logprobs=any(r.params.logprobs for r in active),
            )
        ended = False
        for slot, request in enumerate(active):
            request.cache_length += 1
            self._accept(request, tokens[slot], logprobs[slot] if logprobs else None, events)
            ended = ended or request.finish_reason is not None
        if ended:
            self._settle(events)

    def _inflight_matches(self) -> bool:
        """Whether the step queued ahead was queued for exactly the active requests, in their slots."""
        rows = self._inflight[0]
        return len(rows) == len(self._active) and all(a is b for a, b in zip(rows, self._active))

    def _settle(self, events: list[TokenEvent], dropping: str | None = None) -> None:
        """Before the active batch changes: read the step queued ahead (if any) and accept its tokens for the requests
        still generating (a request that ended at the step before, or the one ``dropping`` names, ignores its token:
        its slot is freed anyway); then free the slots of every request that has ended."""
        if self._inflight is not None:
            (rows, pending), self._inflight = self._inflight, None
            tokens = pending.tolist()
            for slot, request in enumerate(rows):
                if request.finish_reason is not None or request.request_id == dropping:
                    continue
                if slot < len(self._active) and self._active[slot] is request:
                    request.cache_length += 1
                    self._accept(request, tokens[slot], None, events)
        ended = [slot for slot, request in enumerate(self._active) if request.finish_reason is not None]
        if ended:
            self._release_slots(ended)

    def _accept(self, request: _Request, token: int, logprob: float | None, events: list[TokenEvent],
                prompt_logprobs: list[float] | None = None) -> None:
        """Record a sampled token, decide whether the request is done, emit its event (``prompt_logprobs``: given by
        the prefill only, so they ride on the request's first event)."""
        params = request.params
        request.token_ids.append(token)
        if request.logprobs is not None:
            request.logprobs.append(logprob)
        reason = None
        detokenizer = request.detokenizer
        if token in params.stop_token_ids:
            reason = "stop"
        elif detokenizer is not None:
            detokenizer.add(token)
            if detokenizer.stopped:
                reason = "stop"
        if reason is None and (
            len(request.token_ids) >= params.max_new_tokens or request.cache_length + 1 >= self.max_sequence_length
        ):
            reason = "length"
        text = None
        if detokenizer is not None:
            if reason is not None:
                detokenizer.finish()
            text = detokenizer.pop_delta(final=reason is not None)
        logprob = logprob if params.logprobs else None
        events.append(TokenEvent(request.request_id, token, logprob, reason is not None, reason, text,
                                 prompt_logprobs))
        if reason is not None:
            self._finish(request, reason)

    def _finish(self, request: _Request, reason: str) -> None:
        request.finish_reason = reason
        self._finished[request.request_id] = GenerationOutput(
            request_id=request.request_id,
            prompt_ids=request.prompt_ids,
            token_ids=request.token_ids,
            logprobs=request.logprobs,
            prompt_logprobs=request.prompt_logprobs,
            finish_reason=reason,
            text=request.detokenizer.text if request.detokenizer is not None else None,
        )

    def _release_slots(self, slots: list[int]) -> None:
        """Free ``slots`` of the active list, keeping live requests in the leading slots (the last moves in)."""
        for slot in sorted(slots, reverse=True):
            last = len(self._active) - 1
            if slot != last:
                self.runner.move_slot(last, slot, self._active[last].cache_length)
                self._active[slot] = self._active[last]
            self._active.pop()
