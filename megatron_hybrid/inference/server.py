"""HTTP text-generation server: Megatron-LM's ``PUT /api`` and OpenAI's ``POST /v1/completions`` over one engine.

Why this shape:

- The :class:`~megatron_hybrid.inference.engine.InferenceEngine` is not thread-safe, so exactly one thread (the
  :class:`GenerationScheduler`) owns it: it admits queued requests, calls ``engine.step()`` while anything is active and
  hands every :class:`TokenEvent` to the request it belongs to. HTTP handlers run on the asyncio loop of uvicorn and
  talk to the scheduler only through a thread-safe command queue (submit / abort) and per-request asyncio queues fed
  with ``loop.call_soon_threadsafe``. Requests that arrive together join the same engine step (continuous batching);
  a request that arrives later joins at the next step.
- Every request is validated before it reaches the engine (types, ranges, prompt + generation within the context) so
  bad input gets a 4xx JSON error and never disturbs the requests already running. A client that disconnects (while
  streaming or while waiting for a non-streamed answer) has its engine requests aborted, which frees their slots.
- Text is produced from token ids here, incrementally (no partial UTF-8 character is ever emitted), and stop strings
  are matched on that text, so the OpenAI rule "the returned text does not contain the stop sequence" holds whatever
  the engine's own stop-string handling does (the engine also gets the stop strings so that it stops promptly).

Megatron compatibility (``PUT /api``): the request fields, defaults and validation rules of Megatron-LM's
``MegatronGenerate`` resource in its order, with its error messages (one declarative table, :data:`MEGATRON_API_FIELDS`;
returned as ``{"message": ...}`` with status 400, which is what Megatron's ``tools/text_generation_cli.py`` reads;
Megatron itself answers most of them with status 200). The response has ``text`` (prompt + generation), ``segments``
(one string per token), ``logprobs`` (log-probability of every token after the first, prompt included; ``null`` when
not asked) and ``tokens`` (prompt + generated ids). Differences, all deliberate: ``temperature`` must be in (0, 100]
as in Megatron (greedy decoding is ``top_k=1``); ``stop_on_eol`` / ``stop_on_double_eol`` stop on the text "\\n" /
"\\n\\n" instead of GPT-2 token ids 198 / 628 (and the end-of-document token still stops generation); ``add_BOS``
prepends the tokenizer's BOS token, or its end-of-document token when it has none (Megatron always uses EOD);
``random_seed`` seeds each prompt's own generator (prompt ``i`` gets ``random_seed + i``) instead of the global RNG,
and must be below 2**63 - 128; ``beam_width``, ``prevent_newline_after_colon=true`` and ``top_p_decay > 0`` are
rejected as unsupported; types are JSON's (``true`` is not an integer; ``1`` is a number where Megatron wants a float)
and every prompt must be a string (Megatron fails later on others).

OpenAI compatibility (``POST /v1/completions``, also ``POST /completions`` like Megatron's server): ``prompt`` (string,
list of strings, list of token ids, list of lists of token ids), ``max_tokens`` (default 16), ``temperature`` in
[0, 2] (0 = greedy), ``top_p`` in (0, 1], ``top_k`` (extension; 0 or -1 = off), ``stop`` (string or up to 4
strings), ``seed``, ``logprobs`` (0..5: the chosen token's log-probability; ``top_logprobs`` lists the chosen token
only, the engine does not expose alternatives), ``echo``, ``stream`` (server-sent events ``data: {...}`` ending with
``data: [DONE]``; ``stream_options.include_usage``), ``n`` = ``best_of`` = 1 only, ``usage`` counts. ``max_tokens=0``
needs ``echo=true`` (scoring a prompt). An empty prompt string stands for the end-of-document token, as in OpenAI's
API. Errors are OpenAI error objects ``{"error": {"message", "type", "param", "code"}}``. With ``echo`` and
``logprobs``, the prompt's tokens come first in ``logprobs`` (the first one's ``token_logprobs`` / ``top_logprobs``
entry is ``null``, nothing predicts it), then the generated ones; a stream sends the prompt's text and its
log-probabilities in its first chunk (the engine reports them with the prefill), so the chunks' ``tokens``,
``token_logprobs``, ``top_logprobs`` and ``text_offset`` concatenate to the plain answer's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import queue
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the text generation server needs FastAPI and uvicorn: pip install 'megatron_hybrid[serve]'"
    ) from e

from megatron_hybrid.inference.sampling import SamplingParams

__all__ = [
    "MEGATRON_API_FIELDS",
    "ApiCheck",
    "ApiField",
    "ApiRule",
    "BackgroundServer",
    "GenerationScheduler",
    "RequestError",
    "ServerConfig",
    "TextGenerationService",
    "create_app",
    "parse_completions_request",
    "parse_megatron_request",
    "run_server",
]

log = logging.getLogger(__name__)

MEGATRON_MAX_PROMPTS = 128  # Megatron's MegatronGenerate limit
OPENAI_MAX_STOP = 4
OPENAI_MAX_LOGPROBS = 5
_DRAIN_CAP = 32 * 1024 * 1024  # read and discard at most this much of an oversized body before answering 413
_DETOK_CONTEXT = 6  # prompt tokens decoded with the generation so that leading spaces / merged bytes come out right


# ----------------------------------------------------------------------------------------------------------- config


@dataclass
class ServerConfig:
    """Settings of one server; ``context_length`` bounds prompt + generated tokens of every request."""

    context_length: int
    model_name: str = "megatron_hybrid"
    max_body_bytes: int = 1024 * 1024
    max_pending_requests: int = 1024
    max_prompts: int = MEGATRON_MAX_PROMPTS
    default_tokens_to_generate: int = 64  # Megatron's /api default
    default_max_tokens: int = 16  # OpenAI's default
    coalesce_s: float = 0.005

    def __post_init__(self) -> None:
        if self.context_length < 1:
            raise ValueError(f"context_length must be positive, got {self.context_length}")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be positive, got {self.max_body_bytes}")


class RequestError(Exception):
    """A client error: HTTP ``status`` with a message meant for the client (and the offending field)."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


# -------------------------------------------------------------------------------------------------------- scheduler


@dataclass
class SchedulerFailure:
    """Delivered instead of TokenEvents when the engine rejected a request or failed while running it."""

    status: int
    message: str


class GenerationScheduler:
    """The one thread that owns the engine (which is not thread-safe).

    ``submit`` and ``abort`` may be called from any thread; they only enqueue commands. The scheduler thread applies
    them, runs ``engine.step()`` while any request is unfinished and calls each request's ``sink`` with
    ``(TokenEvent, GenerationOutput | None)`` pairs (the output, popped from the engine, comes with the finishing event)
    or one :class:`SchedulerFailure`. A sink is dropped after its finishing event or an
    abort; it must not block (the server's sinks only schedule work on the asyncio loop).
    """

    def __init__(self, engine: Any, *, coalesce_s: float = 0.005, idle_poll_s: float = 0.25) -> None:
        self.engine = engine
        self.coalesce_s = coalesce_s
        self.idle_poll_s = idle_poll_s
        self._commands: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._sinks: dict[str, Callable[[Any], None]] = {}
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pending = 0  # submitted, not yet finished / aborted / failed (counted on the caller's side)
        self.stats = {"submitted": 0, "finished": 0, "aborted": 0, "failed": 0, "steps": 0}
        self.engine_busy = False
        self.engine_active = 0
        self.engine_waiting = 0
        self.last_error: str | None = None

    # -- called from any thread
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="generation-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort everything and end the thread (it finishes the step it is in first)."""
        if self._thread is None:
            return
        self._stop.set()
        self._commands.put(("wake",))
        self._thread.join(timeout)
        self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def pending(self) -> int:
        """Engine requests submitted and not yet finished, aborted or failed."""
        with self._lock:
            return self._pending

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Any], None]) -> str:
        request_id = f"{self._prefix}-{next(self._ids)}"
        with self._lock:
            self._pending += 1
        self._commands.put(("add", request_id, prompt_ids, params, sink))
        return request_id

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    # -- scheduler thread
    def _release(self, request_id: str) -> bool:
        sink = self._sinks.pop(request_id, None)
        if sink is None:
            return False
        with self._lock:
            self._pending -= 1
        return True

    def _apply(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, prompt_ids, params, sink = command
            self.stats["submitted"] += 1
            try:
                self.engine.add_request(request_id, prompt_ids, params)
            except ValueError as e:
                self.stats["failed"] += 1
                with self._lock:
                    self._pending -= 1
                _deliver(sink, SchedulerFailure(400, str(e)))
                return
            except Exception as e:  # an engine bug must not kill the scheduler
                log.exception("engine.add_request failed")
                self.stats["failed"] += 1
                with self._lock:
                    self._pending -= 1
                _deliver(sink, SchedulerFailure(500, f"internal error while admitting the request: {e}"))
                return
            self._sinks[request_id] = sink
        elif kind == "abort":
            request_id = command[1]
            if self._release(request_id):
                self.stats["aborted"] += 1
                try:
                    self.engine.abort(request_id)
                except Exception:
                    log.exception("engine.abort(%s) failed", request_id)

    def _drain(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=self.idle_poll_s) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        self._apply(command)
        if block and self.coalesce_s > 0:
            # Idle engine woken by a request: give the requests sent together a moment to join the same first step.
            deadline = time.monotonic() + self.coalesce_s
            while (left := deadline - time.monotonic()) > 0:
                try:
                    self._apply(self._commands.get(timeout=left))
                except queue.Empty:
                    break
        while True:
            try:
                self._apply(self._commands.get_nowait())
            except queue.Empty:
                return

    def _fail_all(self, message: str) -> None:
        for request_id in list(self._sinks):
            sink = self._sinks[request_id]
            self._release(request_id)
            self.stats["failed"] += 1
            with contextlib.suppress(Exception):
                self.engine.abort(request_id)
            _deliver(sink, SchedulerFailure(500, message))

    def _run(self) -> None:
        import torch

        device = getattr(self.engine, "device", None)
        if isinstance(device, torch.device) and device.type == "cuda":
            torch.cuda.set_device(device)  # the current device is per thread; CUDA graphs replay on the engine's
        with torch.inference_mode():
            while not self._stop.is_set():
                self._drain(block=not self.engine_busy)
                if self._stop.is_set():
                    break
                try:
                    self.engine_busy = bool(self.engine.has_unfinished())
                    if not self.engine_busy:
                        self.engine_active = _call_int(self.engine, "num_active")
                        self.engine_waiting = _call_int(self.engine, "num_waiting")
                        continue
                    events = self.engine.step()
                    self.stats["steps"] += 1
                except Exception as e:
                    log.exception("engine.step failed; failing the active requests")
                    self.last_error = f"{type(e).__name__}: {e}"
                    self._fail_all(f"internal error during generation: {type(e).__name__}: {e}")
                    self.engine_busy = self._safe_has_unfinished()
                    continue
                self.engine_active = _call_int(self.engine, "num_active")
                self.engine_waiting = _call_int(self.engine, "num_waiting")
                for event in events:
                    output = None
                    if event.finished and event.finish_reason != "abort":
                        # The engine keeps finished outputs until popped: always pop (prompt log-probs live there).
                        with contextlib.suppress(KeyError):
                            output = self.engine.pop_output(event.request_id)
                    sink = self._sinks.get(event.request_id)
                    if sink is None:
                        continue  # aborted meanwhile
                    if event.finished:
                        self._release(event.request_id)
                        self.stats["finished"] += 1
                    _deliver(sink, (event, output))
            self._fail_all("the server is shutting down")

    def _safe_has_unfinished(self) -> bool:
        try:
            return bool(self.engine.has_unfinished())
        except Exception:
            return False


def _call_int(obj: Any, name: str) -> int:
    method = getattr(obj, name, None)
    return int(method()) if method is not None else 0


def _deliver(sink: Callable[[Any], None], item: Any) -> None:
    try:
        sink(item)
    except Exception:  # a closed event loop (server shutting down) must not stop the scheduler
        log.debug("dropping an event for a gone client", exc_info=True)


# ------------------------------------------------------------------------------------------- text of one request


class _IncrementalText:
    """Turns generated token ids into text as it becomes final (never half a UTF-8 character).

    Decodes a few prompt tokens together with the generation (so that e.g. a SentencePiece word boundary or a
    byte-level merge at the prompt's end comes out as in the full text) and emits the new suffix once it no longer
    ends in U+FFFD.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-_DETOK_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self.read_offset >= len(self.ids):
            return ""
        prefix = self.tokenizer.detokenize(self.ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.detokenize(self.ids[self.prefix_offset :])
        if not final and (len(full) <= len(prefix) or full.endswith("\ufffd")):
            return ""
        delta = full[len(prefix) :] if full.startswith(prefix) else full[_common_prefix(prefix, full) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return delta


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class _Completion:
    """State of one engine request as seen by a handler: generated ids, logprobs, text and why it ended.

    ``include_stop`` (Megatron): the sequence ends with the token that completed a stop string or the
    end-of-document token, whole. Otherwise (OpenAI): the text ends before the stop string, and tokens that start
    at or after the cut (the end-of-document token included) are not part of the answer.
    """

    prompt_ids: list[int]
    stop_strings: tuple[str, ...]
    stop_token_ids: frozenset[int]
    include_stop: bool
    tokenizer: Any
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # char offset in `text` where each generated token starts
    text: str = ""  # generated text decoded so far
    released: int = 0  # chars of the output text handed out as stream deltas
    final_len: int | None = None  # where a stop string cut the text (OpenAI semantics)
    finish_reason: str | None = None
    prompt_logprobs: list[float] | None = None

    def __post_init__(self) -> None:
        self._detok = _IncrementalText(self.tokenizer, self.prompt_ids)
        self._searched = 0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def output_text(self) -> str:
        return self.text if self.final_len is None else self.text[: self.final_len]

    @property
    def visible_token_count(self) -> int:
        """Generated tokens that belong to the answer."""
        n = len(self.token_ids)
        if self.include_stop:
            return n
        if self.final_len is not None:
            return sum(1 for off in self.offsets if off < self.final_len)
        if n and self.done and self.token_ids[-1] in self.stop_token_ids:
            return n - 1
        return n

    def add(self, token_id: int, logprob: float | None, finished: bool, finish_reason: str | None) -> bool:
        """Record one event; returns True when the request is complete (engine finished or a stop string hit)."""
        if self.done:
            return True
        token_id = int(token_id)
        if token_id < 0:  # the engine's NO_TOKEN: finished without a new token (max_new_tokens == 0, abort)
            self.text += self._detok.flush()
            self.finish_reason = finish_reason or "length"
            return True
        is_stop_token = token_id in self.stop_token_ids
        self.offsets.append(len(self.text))
        self.token_ids.append(token_id)
        self.logprobs.append(logprob)
        shows = self.include_stop or not is_stop_token
        if shows:
            self.text += self._detok.push(token_id)
        if finished or is_stop_token:
            self.text += self._detok.flush()
        if self._check_stop_strings():
            return True
        if is_stop_token:
            self.finish_reason = "stop"
        elif finished:
            self.finish_reason = finish_reason or "length"
        return self.done

    def _check_stop_strings(self) -> bool:
        if not self.stop_strings:
            return False
        longest = max(len(s) for s in self.stop_strings)
        start = max(0, self._searched - longest + 1)  # only text that appeared since the last check can match anew
        self._searched = len(self.text)
        best: tuple[int, int] | None = None
        for s in self.stop_strings:
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, len(s))
        if best is None:
            return False
        begin, length = best
        if self.include_stop:
            # Keep every token up to the one holding the stop string's last character, whole.
            last = max(k for k, off in enumerate(self.offsets) if off < begin + length)
            if last + 1 < len(self.offsets):
                self.text = self.text[: self.offsets[last + 1]]
            del self.token_ids[last + 1 :], self.logprobs[last + 1 :], self.offsets[last + 1 :]
        else:
            self.final_len = begin
        self.finish_reason = "stop"
        return True

    def take_delta(self) -> str:
        """Output text not streamed yet that can no longer turn out to be the start of a stop string."""
        out = self.output_text
        safe = len(out) if self.done else len(out) - _held_back(out, self.stop_strings)
        if safe <= self.released:
            return ""
        delta = out[self.released : safe]
        self.released = safe
        return delta


def _held_back(text: str, stop_strings: Iterable[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stop_strings:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


# --------------------------------------------------------------------------------------------------- validation


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    """A JSON number that is not a boolean: any integer, or a finite float (``1e400`` parses to inf)."""
    if _is_int(v):
        return True  # checked apart: math.isfinite raises OverflowError on a 400-digit integer literal
    return isinstance(v, float) and math.isfinite(v)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _check_text(s: str, what: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(400, f"{what} contains invalid Unicode (a lone surrogate)", "prompt") from None


@dataclass
class MegatronRequest:
    """A validated ``PUT /api`` request (defaults: :data:`MEGATRON_API_FIELDS`)."""

    prompts: list[str]
    tokens_to_generate: int
    logprobs: bool
    temperature: float
    top_k: int
    top_p: float
    add_BOS: bool  # Megatron's field name
    stop_on_eol: bool
    stop_on_double_eol: bool
    random_seed: int
    no_log: bool


@dataclass(frozen=True)
class ApiCheck:
    """One rule on a field's value: ``ok(value, values)``, where ``values`` holds the prompts and every field that comes
    earlier in the table (given or defaulted), so rules across fields read like Megatron's."""

    ok: Callable[[Any, dict[str, Any]], bool]
    message: str


@dataclass(frozen=True)
class ApiField:
    """An optional ``PUT /api`` field. Absent: ``default``, unchecked. Present (``null`` included, as in Megatron):
    its JSON type first (``type_message``), then ``checks`` in order; the first failure is the 400 answer."""

    name: str
    kind: str  # "bool" | "int" | "number" (booleans are neither integers nor numbers here)
    default: Any
    type_message: str
    checks: tuple[ApiCheck, ...] = ()


@dataclass(frozen=True)
class ApiRule:
    """A rule across fields, applied at its place in Megatron's order whether or not the fields were given."""

    param: str
    ok: Callable[[dict[str, Any]], bool]
    message: str


_KINDS: dict[str, Callable[[Any], bool]] = {"bool": _is_bool, "int": _is_int, "number": _is_number}
_SEED_LIMIT = 2**63 - MEGATRON_MAX_PROMPTS  # prompt i is seeded with random_seed + i: keep that a distinct int64 seed
_UNSUPPORTED = "is not supported by this server"


def _never(v: Any, values: dict[str, Any]) -> bool:
    """The last check of a field accepted only to be refused (beam_width: Megatron's own checks first, so a malformed
    value gets Megatron's message, then "not supported")."""
    return False


# Megatron-LM's MegatronGenerate.put, field by field in its order, with its messages and defaults. Our own rules
# (not Megatron's) are the ones whose message says "not supported by this server", and the random_seed upper bound.
MEGATRON_API_FIELDS: tuple[ApiField | ApiRule, ...] = (
    ApiField("tokens_to_generate", "int", 64, "tokens_to_generate must be an integer greater than 0", (
        ApiCheck(lambda v, f: v >= 0, "tokens_to_generate must be an integer greater than or equal to 0"),
    )),
    ApiField("logprobs", "bool", False, "logprobs must be a boolean value"),
    ApiRule("tokens_to_generate", lambda f: f["tokens_to_generate"] > 0 or f["logprobs"],
            "tokens_to_generate=0 implies logprobs should be True"),
    # Megatron's type message says "1000.0", a typo (its check and range message say 100.0): ours states the limit.
    ApiField("temperature", "number", 1.0, "temperature must be a positive number less than or equal to 100.0", (
        ApiCheck(lambda v, f: 0.0 < v <= 100.0, "temperature must be a positive number less than or equal to 100.0"),
    )),
    ApiField("top_k", "int", 0,
             "top_k must be an integer equal to or greater than 0 and less than or equal to 1000", (
        ApiCheck(lambda v, f: 0 <= v <= 1000,
                 "top_k must be equal to or greater than 0 and less than or equal to 1000"),
    )),
    ApiField("top_p", "number", 0.0, "top_p must be a positive float less than or equal to 1.0", (
        ApiCheck(lambda v, f: not (v > 0.0 and f["top_k"] > 0), "cannot set both top-k and top-p samplings."),
        ApiCheck(lambda v, f: 0.0 <= v <= 1.0, "top_p must be less than or equal to 1.0"),
    )),
    ApiField("top_p_decay", "number", 0.0, "top_p_decay must be a positive float less than or equal to 1.0", (
        ApiCheck(lambda v, f: f["top_p"] != 0.0, "top_p_decay cannot be set without top_p"),
        ApiCheck(lambda v, f: 0.0 <= v <= 1.0, "top_p_decay must be less than or equal to 1.0"),
        ApiCheck(lambda v, f: v == 0.0, f"top_p_decay {_UNSUPPORTED} (top_p stays fixed during generation)"),
    )),
    ApiField("top_p_bound", "number", 0.0, "top_p_bound must be a positive float less than or equal to top_p", (
        ApiCheck(lambda v, f: f["top_p"] != 0.0, "top_p_bound cannot be set without top_p"),
        # Without a decay the bound never applies (as in Megatron), so a valid one is accepted and has no effect.
        ApiCheck(lambda v, f: 0.0 < v <= f["top_p"], "top_p_bound must be greater than 0 and less than top_p"),
    )),
    ApiField("add_BOS", "bool", False, "add_BOS must be a boolean value"),
    ApiRule("prompts", lambda f: f["add_BOS"] or all(len(p) > 0 for p in f["prompts"]),
            "Empty prompts require add_BOS=true"),
    ApiField("stop_on_double_eol", "bool", False, "stop_on_double_eol must be a boolean value"),
    ApiField("stop_on_eol", "bool", False, "stop_on_eol must be a boolean value"),
    ApiField("prevent_newline_after_colon", "bool", False, "prevent_newline_after_colon must be a boolean value", (
        ApiCheck(lambda v, f: not v, f"prevent_newline_after_colon {_UNSUPPORTED}"),
    )),
    ApiField("random_seed", "int", -1, "random_seed must be integer", (
        ApiCheck(lambda v, f: v >= 0, "random_seed must be a positive integer"),
        ApiCheck(lambda v, f: v < _SEED_LIMIT, "random_seed must be less than 2**63 - 128"),
    )),
    ApiField("no_log", "bool", False, "no_log must be a boolean value"),
    ApiField("beam_width", "int", None, "beam_width must be integer", (
        ApiCheck(lambda v, f: v >= 1, "beam_width must be an integer > 1"),
        ApiCheck(lambda v, f: len(f["prompts"]) == 1, "When doing beam_search, batch size must be 1"),
        ApiCheck(_never, f"beam search (beam_width) {_UNSUPPORTED}; leave beam_width out to sample"),
    )),
    ApiField("stop_token", "int", None, "stop_token must be an integer"),  # Megatron's beam search only: unused here
    ApiField("length_penalty", "number", 1.0, "length_penalty must be a float"),  # likewise
)
_MEGATRON_REQUEST_FIELDS = tuple(f.name for f in fields(MegatronRequest))


def _megatron_prompts(body: dict[str, Any], max_prompts: int) -> list[str]:
    """The ``prompts`` field and the retired names Megatron points to it from, in Megatron's order."""

    def bad(message: str, param: str = "prompts") -> RequestError:
        return RequestError(400, message, param)

    if "prompts" not in body:
        raise bad("prompts argument required")
    if "max_len" in body:
        raise bad("max_len is no longer used.  Replace with tokens_to_generate", "max_len")
    if "sentences" in body:
        raise bad("sentences is no longer used.  Replace with prompts", "sentences")
    prompts = body["prompts"]
    if not isinstance(prompts, list):
        raise bad("prompts is not a list of strings")
    if len(prompts) == 0:
        raise bad("prompts is empty")
    if len(prompts) > max_prompts:
        raise bad(f"Maximum number of prompts is {max_prompts}")
    # Megatron checks only for a list and fails later (500) on other items; the message says what it expects.
    if not all(isinstance(p, str) for p in prompts):
        raise bad("prompts is not a list of strings")
    for p in prompts:
        _check_text(p, "a prompt")
    return prompts


def parse_megatron_request(body: dict[str, Any], *, max_prompts: int = MEGATRON_MAX_PROMPTS,
                           default_tokens: int = 64) -> MegatronRequest:
    """Megatron-LM's ``MegatronGenerate.put`` validation: ``prompts``, then :data:`MEGATRON_API_FIELDS` in order,
    with Megatron's messages; the first failure raises :class:`RequestError` (status 400).

    Types are JSON's: booleans are not integers or numbers (Megatron's ``isinstance(v, int)`` lets ``true`` pass),
    and number fields take integers as well as floats (JSON does not tell ``1`` from ``1.0``; Megatron's
    ``isinstance(v, float)`` refuses ``"top_p": 1``). Unknown fields are ignored, as in Megatron.
    """
    values: dict[str, Any] = {"prompts": _megatron_prompts(body, max_prompts)}
    for entry in MEGATRON_API_FIELDS:
        if isinstance(entry, ApiRule):
            if not entry.ok(values):
                raise RequestError(400, entry.message, entry.param)
            continue
        if entry.name not in body:
            values[entry.name] = default_tokens if entry.name == "tokens_to_generate" else entry.default
            continue
        v = body[entry.name]
        if not _KINDS[entry.kind](v):
            raise RequestError(400, entry.type_message, entry.name)
        for check in entry.checks:
            if not check.ok(v, values):
                raise RequestError(400, check.message, entry.name)
        if entry.kind == "number" and entry.name in _MEGATRON_REQUEST_FIELDS:
            v = float(v)  # range-checked above, so a huge integer cannot overflow here
        values[entry.name] = v
    return MegatronRequest(**{name: values[name] for name in _MEGATRON_REQUEST_FIELDS})


@dataclass
class CompletionsRequest:
    """A validated ``POST /v1/completions`` request (prompts still as given: strings or token id lists)."""

    prompts: list[str | list[int]]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None
    echo: bool = False
    stream: bool = False
    include_usage: bool = False


def parse_completions_request(body: dict[str, Any], *, vocab_size: int, max_prompts: int = MEGATRON_MAX_PROMPTS,
                              default_max_tokens: int = 16) -> CompletionsRequest:
    """OpenAI ``CreateCompletionRequest`` validation (OpenAI's ranges; unsupported options rejected, not ignored)."""

    def bad(message: str, param: str) -> RequestError:
        return RequestError(400, message, param)

    def opt(name: str) -> Any:
        return body.get(name)

    if "prompt" not in body or body["prompt"] is None:
        raise bad("prompt is required", "prompt")
    prompt = body["prompt"]
    prompts: list[str | list[int]]
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(
        isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt
    ):
        prompts = [list(p) for p in prompt]
    else:
        raise bad("prompt must be a string, a list of strings, a non-empty list of token ids or a list of non-empty "
                  "token id lists", "prompt")
    if len(prompts) > max_prompts:
        raise bad(f"at most {max_prompts} prompts per request", "prompt")
    for p in prompts:
        if isinstance(p, str):
            _check_text(p, "prompt")
        elif any(not 0 <= t < vocab_size for t in p):
            raise bad(f"token ids must be in [0, {vocab_size})", "prompt")

    req = CompletionsRequest(prompts=prompts, max_tokens=default_max_tokens)
    if opt("max_tokens") is not None:
        v = body["max_tokens"]
        if not _is_int(v) or v < 0:
            raise bad("max_tokens must be an integer >= 0", "max_tokens")
        req.max_tokens = v
    if opt("temperature") is not None:
        v = body["temperature"]
        if not _is_number(v) or not 0.0 <= v <= 2.0:
            raise bad("temperature must be a number between 0 and 2", "temperature")
        req.temperature = float(v)
    if opt("top_p") is not None:
        v = body["top_p"]
        if not _is_number(v) or not 0.0 < v <= 1.0:
            raise bad("top_p must be a number in (0, 1]", "top_p")
        req.top_p = float(v)
    if opt("top_k") is not None:
        v = body["top_k"]
        if not _is_int(v) or v < -1:
            raise bad("top_k must be an integer >= 1, or 0 / -1 for no top-k filtering", "top_k")
        req.top_k = max(v, 0)
    if opt("stop") is not None:
        v = body["stop"]
        stops = [v] if isinstance(v, str) else v
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise bad("stop must be a non-empty string or a list of non-empty strings", "stop")
        if len(stops) > OPENAI_MAX_STOP:
            raise bad(f"at most {OPENAI_MAX_STOP} stop sequences", "stop")
        for s in stops:
            _check_text(s, "stop")
        req.stop = tuple(dict.fromkeys(stops))
    if opt("seed") is not None:
        v = body["seed"]
        if not _is_int(v) or not -(2**63) <= v < 2**64:
            raise bad("seed must be a 64-bit integer", "seed")
        req.seed = v % 2**63
    if opt("logprobs") is not None:
        v = body["logprobs"]
        if not _is_int(v) or not 0 <= v <= OPENAI_MAX_LOGPROBS:
            raise bad(f"logprobs must be an integer between 0 and {OPENAI_MAX_LOGPROBS}", "logprobs")
        req.logprobs = v
    for name in ("echo", "stream"):
        if opt(name) is not None:
            if not isinstance(body[name], bool):
                raise bad(f"{name} must be a boolean", name)
            setattr(req, name, body[name])
    if opt("stream_options") is not None:
        v = body["stream_options"]
        if not req.stream:
            raise bad("stream_options is only allowed with stream=true", "stream_options")
        if not isinstance(v, dict) or not isinstance(v.get("include_usage", False), bool):
            raise bad("stream_options must be an object with a boolean include_usage", "stream_options")
        req.include_usage = v.get("include_usage", False)
    for name in ("n", "best_of"):
        if opt(name) is not None:
            v = body[name]
            if not _is_int(v) or v < 1:
                raise bad(f"{name} must be a positive integer", name)
            if v != 1:
                raise bad(f"{name} > 1 is not supported by this server", name)
    for name in ("presence_penalty", "frequency_penalty"):
        if opt(name) is not None:
            if not _is_number(body[name]) or not -2.0 <= body[name] <= 2.0:
                raise bad(f"{name} must be a number between -2 and 2", name)
            if body[name] != 0:
                raise bad(f"{name} is not supported by this server", name)
    if opt("logit_bias"):
        raise bad("logit_bias is not supported by this server", "logit_bias")
    if opt("suffix"):
        raise bad("suffix is not supported by this server", "suffix")
    if opt("model") is not None and not isinstance(body["model"], str):
        raise bad("model must be a string", "model")
    if req.max_tokens == 0 and not req.echo:
        raise bad("max_tokens=0 requires echo=true (scoring the prompt)", "max_tokens")
    return req


# ------------------------------------------------------------------------------------------------ request plumbing


class _EngineRequest:
    """One engine request seen from the asyncio side: its events arrive on an asyncio queue."""

    def __init__(self, scheduler: GenerationScheduler, loop: asyncio.AbstractEventLoop, prompt_ids: list[int],
                 params: SamplingParams, completion: _Completion) -> None:
        self.scheduler = scheduler
        self.loop = loop
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.completion = completion
        self.closed = False
        self.request_id = scheduler.submit(prompt_ids, params, self._push)

    def _push(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def next_update(self) -> None:
        """Wait for the next event and apply it; raises RequestError on an engine failure."""
        item = await self.queue.get()
        if isinstance(item, SchedulerFailure):
            self.closed = True
            raise RequestError(item.status, item.message)
        event, output = item
        # The prompt's log-probabilities ride on the first event (so a stream can echo them at once); the finished
        # output carries them too, for engines whose events do not.
        prompt_logprobs = getattr(event, "prompt_logprobs", None)
        if prompt_logprobs is None and output is not None:
            prompt_logprobs = output.prompt_logprobs
        if prompt_logprobs is not None and self.completion.prompt_logprobs is None:
            self.completion.prompt_logprobs = list(prompt_logprobs)
        complete = self.completion.add(event.token_id, event.logprob, event.finished, event.finish_reason)
        if event.finished:
            self.closed = True
        elif complete:  # a stop string ended it before the engine noticed: free the slot now
            self.abort()

    async def run_to_end(self) -> _Completion:
        while not self.completion.done:
            await self.next_update()
        return self.completion

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self.scheduler.abort(self.request_id)


class _DisconnectWatcher:
    """Completes when the client goes away (reads the ASGI ``http.disconnect`` message once the body is consumed)."""

    def __init__(self, request: Request) -> None:
        self.task = asyncio.ensure_future(self._watch(request))

    @staticmethod
    async def _watch(request: Request) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    def cancel(self) -> None:
        self.task.cancel()


async def _until_done_or_disconnect(coro: Any, watcher: _DisconnectWatcher) -> Any:
    """Await ``coro`` unless the client disconnects first (then cancel it and raise ``ConnectionAbortedError``)."""
    work = asyncio.ensure_future(coro)
    try:
        await asyncio.wait({work, watcher.task}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await work
        raise ConnectionAbortedError("client disconnected")
    finally:
        if not work.done():
            work.cancel()


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes; 413 beyond (after draining a bounded amount, so the client reads
    the answer instead of a connection reset)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_len = int(declared)
        except ValueError:
            raise RequestError(400, "invalid Content-Length header") from None
        if declared_len > limit:
            if declared_len <= _DRAIN_CAP:
                async for _ in request.stream():
                    pass
            raise RequestError(413, f"request body too large: {declared_len} bytes > limit {limit} bytes")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            async for more in request.stream():
                total += len(more)
                if total > _DRAIN_CAP:
                    break
            raise RequestError(413, f"request body too large: more than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_json(body: bytes) -> dict[str, Any]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(400, f"request body is not valid UTF-8 ({e.reason} at byte {e.start})") from None

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        obj = json.loads(text, parse_constant=no_constants)
    except json.JSONDecodeError as e:
        raise RequestError(400, f"malformed JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except (ValueError, RecursionError) as e:
        raise RequestError(400, f"malformed JSON: {e}") from None
    if not isinstance(obj, dict):
        raise RequestError(400, "the request body must be a JSON object")
    return obj


def _megatron_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"message": message}, status_code=status)


def _openai_error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status)


def _error_for_path(path: str, status: int, message: str, param: str | None = None) -> JSONResponse:
    if path.startswith("/api"):
        return _megatron_error(status, message)
    return _openai_error(status, message, param)


# ------------------------------------------------------------------------------------------------------------ app


class TextGenerationService:
    """What the handlers share: engine scheduler, tokenizer and settings."""

    def __init__(self, engine: Any, tokenizer: Any, config: ServerConfig) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.config = config
        self.scheduler = GenerationScheduler(engine, coalesce_s=config.coalesce_s)
        self.vocab_size = int(tokenizer.vocab_size)
        self.eod = int(tokenizer.eod)
        bos = getattr(tokenizer, "bos", None)
        self.bos = int(bos) if bos is not None else self.eod

    def shutdown(self) -> None:
        """Stop the scheduler (running requests fail with 500), then close the engine, which releases the
        tensor-parallel worker ranks."""
        self.scheduler.stop()
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

    def tokenize(self, text: str) -> list[int]:
        try:
            return [int(t) for t in self.tokenizer.tokenize(text)]
        except ValueError as e:  # e.g. NullTokenizer given words instead of ids
            raise RequestError(400, f"cannot tokenize the prompt: {e}", "prompt") from None

    def check_capacity(self, n: int) -> None:
        if self.scheduler.pending + n > self.config.max_pending_requests:
            raise RequestError(503, "the server is busy; retry later")

    def check_context(self, prompt_len: int, new_tokens: int, megatron: bool) -> None:
        limit = self.config.context_length
        if prompt_len + new_tokens > limit:
            if megatron:
                msg = (f"Length of prompt + tokens_to_generate longer than allowed ({prompt_len} + {new_tokens} > "
                       f"{limit})")
            else:
                msg = (f"This model's maximum context length is {limit} tokens, however you requested "
                       f"{prompt_len + new_tokens} tokens ({prompt_len} in the prompt, {new_tokens} for the "
                       "completion). Please reduce the prompt or the completion length.")
            raise RequestError(400, msg, "prompt" if not megatron else None)

    def start(self, loop: asyncio.AbstractEventLoop, prompt_ids: list[int], params: SamplingParams,
              completion: _Completion) -> _EngineRequest:
        return _EngineRequest(self.scheduler, loop, prompt_ids, params, completion)


def _sampling_params(**kwargs: Any) -> SamplingParams:
    try:
        return SamplingParams(**kwargs)
    except (TypeError, ValueError) as e:
        raise RequestError(400, f"invalid sampling parameters: {e}") from None


def create_app(service: TextGenerationService) -> FastAPI:
    """The FastAPI application; the scheduler thread runs for the application's lifespan."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.scheduler.start()
        try:
            yield
        finally:
            # Here and not after uvicorn returns: uvicorn re-raises SIGTERM / SIGINT once it has shut down, which
            # ends the process before any code after ``Server.run``.
            await run_in_threadpool(service.shutdown)

    app = FastAPI(title="megatron_hybrid text generation", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.service = service

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_for_path(request.url.path, exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s", request.url.path)
        return _error_for_path(request.url.path, 500, f"internal server error: {type(exc).__name__}")

    @app.get("/health")
    async def health() -> JSONResponse:
        sched = service.scheduler
        ok = sched.alive
        return JSONResponse(
            {
                "status": "ok" if ok else "error",
                "model": service.config.model_name,
                "context_length": service.config.context_length,
                "pending_requests": sched.pending,
                "engine_busy": sched.engine_busy,
                "engine_active": sched.engine_active,
                "engine_waiting": sched.engine_waiting,
                "stats": dict(sched.stats),
                "last_error": sched.last_error,
            },
            status_code=200 if ok else 503,
        )

    @app.put("/api")
    async def megatron_generate(request: Request) -> Response:
        try:
            body = _parse_json(await _read_body(request, service.config.max_body_bytes))
            req = parse_megatron_request(body, max_prompts=service.config.max_prompts,
                                         default_tokens=service.config.default_tokens_to_generate)
            if not req.no_log:
                log.info("request from %s: %s", request.client.host if request.client else "?",
                         json.dumps(body)[:1000])
            return await _megatron(request, req)
        except RequestError as e:
            return _megatron_error(e.status, e.message)
        except ConnectionAbortedError:
            return _megatron_error(499, "client disconnected")

    async def _megatron(request: Request, req: MegatronRequest) -> Response:
        prompt_ids = []
        for p in req.prompts:
            ids = await run_in_threadpool(service.tokenize, p)
            if req.add_BOS:
                ids = [service.bos, *ids]
            if not ids:
                raise RequestError(400, "a prompt tokenizes to no tokens")
            service.check_context(len(ids), req.tokens_to_generate, megatron=True)
            prompt_ids.append(ids)
        service.check_capacity(len(prompt_ids))
        stops = (("\n\n",) if req.stop_on_double_eol else ()) + (("\n",) if req.stop_on_eol else ())
        scoring = req.tokens_to_generate == 0
        loop = asyncio.get_running_loop()
        requests = []
        for i, ids in enumerate(prompt_ids):
            params = _sampling_params(
                max_new_tokens=req.tokens_to_generate,
                temperature=req.temperature,
                top_k=req.top_k,
                top_p=req.top_p,
                seed=None if req.random_seed < 0 else req.random_seed + i,
                stop_token_ids=(service.eod,),
                stop_strings=stops,
                logprobs=req.logprobs,
                prompt_logprobs=req.logprobs,
            )
            completion = _Completion(ids, stops, frozenset((service.eod,)), True, service.tokenizer)
            requests.append(service.start(loop, ids, params, completion))
        watcher = _DisconnectWatcher(request)
        try:
            done = await _until_done_or_disconnect(asyncio.gather(*(r.run_to_end() for r in requests)), watcher)
        finally:
            watcher.cancel()
            for r in requests:
                r.abort()
        texts, segments, tokens, logprobs = [], [], [], []
        for ids, c in zip(prompt_ids, done):
            gen = [] if scoring else c.token_ids
            all_ids = ids + gen
            tokens.append(all_ids)
            texts.append(service.tokenizer.detokenize(all_ids))
            segments.append([service.tokenizer.detokenize([t]) for t in all_ids])
            if req.logprobs:
                prompt_lp = _prompt_logprobs(c, len(ids))
                logprobs.append(prompt_lp + ([] if scoring else [_f(x) for x in c.logprobs]))
        return JSONResponse({"text": texts, "segments": segments, "logprobs": logprobs if req.logprobs else None,
                             "tokens": tokens})

    async def completions(request: Request) -> Response:
        try:
            body = _parse_json(await _read_body(request, service.config.max_body_bytes))
            req = parse_completions_request(body, vocab_size=service.vocab_size,
                                            max_prompts=service.config.max_prompts,
                                            default_max_tokens=service.config.default_max_tokens)
            return await _completions(request, req)
        except RequestError as e:
            return _openai_error(e.status, e.message, e.param)
        except ConnectionAbortedError:
            return _openai_error(499, "client disconnected")

    async def _completions(request: Request, req: CompletionsRequest) -> Response:
        prompt_ids: list[list[int]] = []
        for p in req.prompts:
            if isinstance(p, str):
                ids = await run_in_threadpool(service.tokenize, p) if p else []
                if not ids:
                    ids = [service.eod]  # OpenAI: no prompt = generate from the start of a new document
            else:
                ids = p
            service.check_context(len(ids), req.max_tokens, megatron=False)
            prompt_ids.append(ids)
        service.check_capacity(len(prompt_ids))
        scoring = req.max_tokens == 0
        want_prompt_lp = req.echo and req.logprobs is not None
        loop = asyncio.get_running_loop()
        requests = []
        for ids in prompt_ids:
            params = _sampling_params(
                max_new_tokens=req.max_tokens,
                temperature=req.temperature,
                top_k=req.top_k,
                top_p=0.0 if req.top_p >= 1.0 else req.top_p,
                seed=req.seed,
                stop_token_ids=(service.eod,),
                stop_strings=req.stop,
                logprobs=req.logprobs is not None,
                prompt_logprobs=want_prompt_lp,
            )
            completion = _Completion(ids, req.stop, frozenset((service.eod,)), False, service.tokenizer)
            requests.append(service.start(loop, ids, params, completion))
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": service.config.model_name}
        watcher = _DisconnectWatcher(request)
        if req.stream and not scoring:
            try:
                # Wait for the first event of every prompt so that an engine rejection is still a 4xx answer.
                await _until_done_or_disconnect(asyncio.gather(*(r.next_update() for r in requests)), watcher)
            except BaseException:
                watcher.cancel()
                for r in requests:
                    r.abort()
                raise
            return StreamingResponse(_stream(req, meta, prompt_ids, requests, watcher),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            done = await _until_done_or_disconnect(asyncio.gather(*(r.run_to_end() for r in requests)), watcher)
        finally:
            watcher.cancel()
            for r in requests:
                r.abort()
        choices = []
        for index, (ids, c) in enumerate(zip(prompt_ids, done)):
            choices.append(_choice(req, index, ids, c, scoring, final=True, full=True))
        usage = _usage(prompt_ids, done, scoring)
        if req.stream:  # scoring request with stream=true: one chunk with everything
            async def one_shot() -> AsyncIterator[bytes]:
                yield _sse({**meta, "choices": choices})
                if req.include_usage:
                    yield _sse({**meta, "choices": [], "usage": usage})
                yield b"data: [DONE]\n\n"

            return StreamingResponse(one_shot(), media_type="text/event-stream")
        return JSONResponse({**meta, "choices": choices, "usage": usage})

    def _choice(req: CompletionsRequest, index: int, prompt_ids: list[int], c: _Completion, scoring: bool,
                final: bool, full: bool, delta: str | None = None, lp_from: int = 0, lp_to: int | None = None,
                echo_prefix: bool = False) -> dict[str, Any]:
        """A choice object; ``full`` = the whole text (non-streamed) else ``delta`` plus the tokens [lp_from, lp_to)."""
        prompt_text = service.tokenizer.detokenize(prompt_ids) if (req.echo and (full or echo_prefix)) else ""
        gen_text = "" if scoring else (c.output_text if full else (delta or ""))
        text = prompt_text + gen_text
        logprobs = None
        if req.logprobs is not None:
            toks: list[str] = []
            tlp: list[float | None] = []
            offs: list[int] = []
            if prompt_text:
                plp = _prompt_logprobs(c, len(prompt_ids))
                pos = 0
                for k, t in enumerate(prompt_ids):
                    s = service.tokenizer.detokenize([t])
                    toks.append(s)
                    tlp.append(None if k == 0 else plp[k - 1])
                    offs.append(pos)
                    pos += len(s)
            base = len(service.tokenizer.detokenize(prompt_ids)) if req.echo else 0
            if not scoring:
                end = c.visible_token_count if lp_to is None else min(lp_to, c.visible_token_count)
                for k in range(lp_from, end):
                    toks.append(service.tokenizer.detokenize([c.token_ids[k]]))
                    tlp.append(_f(c.logprobs[k]))
                    offs.append(base + c.offsets[k])
            logprobs = {
                "tokens": toks,
                "token_logprobs": tlp,
                "top_logprobs": [None if lp is None else {tok: lp} for tok, lp in zip(toks, tlp)],
                "text_offset": offs,
            }
        reason = None
        if final:
            reason = "length" if scoring else (c.finish_reason or "length")
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}

    async def _stream(req: CompletionsRequest, meta: dict[str, Any], prompt_ids: list[list[int]],
                      requests: list[_EngineRequest], watcher: _DisconnectWatcher) -> AsyncIterator[bytes]:
        sent_tokens = [0] * len(requests)
        echoed = [False] * len(requests)
        waits: dict[asyncio.Future, int] = {}
        try:
            pending = {i: r for i, r in enumerate(requests)}
            for i, r in enumerate(requests):  # the first update of each was awaited already
                chunk = _stream_choice(req, i, prompt_ids[i], r, sent_tokens, echoed)
                if _has_content(chunk):
                    yield _sse({**meta, "choices": [chunk]})
                if r.completion.done:
                    pending.pop(i)
            waits.update({asyncio.ensure_future(r.next_update()): i for i, r in pending.items()})
            while waits:
                finished, _ = await asyncio.wait(set(waits) | {watcher.task}, return_when=asyncio.FIRST_COMPLETED)
                if watcher.task in finished:
                    return  # the client is gone
                for w in finished:
                    i = waits.pop(w)
                    try:
                        w.result()
                    except RequestError as e:
                        yield _sse({"error": {"message": e.message, "type": "server_error", "param": None,
                                              "code": None}})
                        return
                    r = requests[i]
                    chunk = _stream_choice(req, i, prompt_ids[i], r, sent_tokens, echoed)
                    if _has_content(chunk):
                        yield _sse({**meta, "choices": [chunk]})
                    if not r.completion.done:
                        waits[asyncio.ensure_future(r.next_update())] = i
            if req.include_usage:
                yield _sse({**meta, "choices": [],
                            "usage": _usage(prompt_ids, [r.completion for r in requests], False)})
            yield b"data: [DONE]\n\n"
        finally:
            for w in waits:
                w.cancel()
            watcher.cancel()
            for r in requests:
                r.abort()

    def _stream_choice(req: CompletionsRequest, index: int, ids: list[int], r: _EngineRequest,
                       sent_tokens: list[int], echoed: list[bool]) -> dict[str, Any]:
        c = r.completion
        delta = c.take_delta()
        # Tokens are reported with the chunk that carries (the start of) their text.
        upto = sum(1 for off in c.offsets[: c.visible_token_count] if off < c.released)
        if c.done:
            upto = c.visible_token_count
        chunk = _choice(req, index, ids, c, False, final=c.done, full=False, delta=delta,
                        lp_from=sent_tokens[index], lp_to=upto, echo_prefix=not echoed[index])
        echoed[index] = True
        sent_tokens[index] = max(sent_tokens[index], upto)
        return chunk

    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/completions", completions, methods=["POST"])
    return app


def _has_content(chunk: dict[str, Any]) -> bool:
    return bool(chunk["text"] or chunk["finish_reason"] or (chunk["logprobs"] and chunk["logprobs"]["tokens"]))


def _prompt_logprobs(c: _Completion, prompt_len: int) -> list[float | None]:
    """Log-probabilities of prompt tokens 1..P-1 (``None`` entries where the engine gave none)."""
    lp = c.prompt_logprobs
    if lp is None:
        return [None] * (prompt_len - 1)
    lp = [_f(x) for x in lp]
    if len(lp) == prompt_len:  # engine reports a leading entry for the first token
        lp = lp[1:]
    return lp[: prompt_len - 1] + [None] * max(0, prompt_len - 1 - len(lp))


def _f(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else -1e30  # JSON has no -inf


def _usage(prompt_ids: list[list[int]], done: Sequence[_Completion], scoring: bool) -> dict[str, int]:
    prompt_tokens = sum(len(ids) for ids in prompt_ids)
    completion_tokens = 0 if scoring else sum(len(c.token_ids) for c in done)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"


# -------------------------------------------------------------------------------------------------------- running


def _uvicorn_config(app: FastAPI, host: str, port: int, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, timeout_keep_alive=5,
                          lifespan="on")


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 5000, *, log_level: str = "info") -> None:
    """Serve until interrupted (SIGINT / SIGTERM shut down gracefully: the scheduler aborts what is running)."""
    server = uvicorn.Server(_uvicorn_config(app, host, port, log_level))
    server.run()


class BackgroundServer:
    """A uvicorn server on a thread, bound to a free port chosen race-free (tests, notebooks).

    ``with BackgroundServer(app) as srv: urlopen(srv.url + "/health")``
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = uvicorn.Server(_uvicorn_config(app, host, self.port, log_level))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the uvicorn server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
