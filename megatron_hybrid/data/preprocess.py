"""JSONL -> Megatron indexed dataset, in parallel (the library side of ``tools/preprocess_data.py``).

Each input line is a JSON object; the strings under ``json_keys`` are tokenized (plus an end-of-document token with
``append_eod``) and written as one document of one sequence to ``{output_prefix}_{key}_document.{bin,idx}``, the
names and layout of Megatron-LM's ``tools/preprocess_data.py``.

Why the care about order and errors: a corpus must be reproducible (the same files for any ``workers``: an ordered
``Pool.imap`` keeps input order) and a bad line must never be dropped silently. Every problem (invalid JSON or UTF-8,
a missing key, a non-string value, a text that tokenizes to nothing, a blank line) raises ``PreprocessError`` naming
the file, line number and byte offset, unless ``skip_bad_lines`` is set; then the line is skipped for every key (the
outputs stay aligned), counted and reported at the end.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, TextIO

import numpy as np

from megatron_hybrid.data.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path, optimal_dtype

__all__ = ["PreprocessError", "PreprocessStats", "output_prefix_for_key", "preprocess_jsonl"]


class PreprocessError(ValueError):
    """A bad input line; ``path``, ``lineno`` (1-based) and ``byte_offset`` (of the line start) locate it."""

    def __init__(self, path: str, lineno: int, byte_offset: int, message: str) -> None:
        self.path, self.lineno, self.byte_offset = path, lineno, byte_offset
        super().__init__(f"{path}:{lineno} (byte offset {byte_offset}): {message}")


@dataclass
class PreprocessStats:
    """What a run did; ``skipped_messages`` keeps the first few skipped-line errors for the report."""

    documents: int = 0
    tokens: dict[str, int] = field(default_factory=dict)
    input_bytes: int = 0
    skipped: int = 0
    skipped_messages: list[str] = field(default_factory=list)
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)


def output_prefix_for_key(output_prefix: str, key: str) -> str:
    """Megatron's naming: ``{prefix}_{key}_document`` (``.bin`` / ``.idx`` appended)."""
    return f"{output_prefix}_{key}_document"


# Worker state, set once per process by _init_worker (tokenizers are not shipped per task).
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_kwargs: dict[str, Any], json_keys: Sequence[str], append_eod: bool, dtype: Any) -> None:
    from megatron_hybrid.tokenizers import build_tokenizer

    tok = build_tokenizer(**tokenizer_kwargs)
    _WORKER.update(tokenizer=tok, keys=list(json_keys), eod=tok.eod if append_eod else None, dtype=np.dtype(dtype))


def _encode(item: tuple[int, int, bytes]) -> tuple[int, int, str | None, list[np.ndarray] | None]:
    """(lineno, offset, raw line) -> (lineno, offset, error message or None, token arrays per key)."""
    lineno, offset, raw = item
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return lineno, offset, f"line is not valid UTF-8 (bad byte at position {e.start} of the line)", None
    if not text.strip():
        return lineno, offset, "empty line (expected a JSON object)", None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return lineno, offset, f"invalid JSON: {e.msg} at column {e.colno}", None
    if not isinstance(obj, dict):
        return lineno, offset, f"expected a JSON object, got {type(obj).__name__}", None
    tok, eod, dtype = _WORKER["tokenizer"], _WORKER["eod"], _WORKER["dtype"]
    out: list[np.ndarray] = []
    for key in _WORKER["keys"]:
        if key not in obj:
            return lineno, offset, f"missing JSON key {key!r} (keys present: {sorted(obj)[:10]})", None
        value = obj[key]
        if not isinstance(value, str):
            return lineno, offset, f"value of key {key!r} is {type(value).__name__}, expected a string", None
        try:
            ids = tok.tokenize(value)
        except Exception as e:  # noqa: BLE001 - any tokenizer failure becomes a located input error
            return lineno, offset, f"cannot tokenize key {key!r}: {e}", None
        if len(ids) == 0:
            return lineno, offset, f"empty document: key {key!r} tokenizes to no tokens", None
        if eod is not None:
            ids = list(ids) + [eod]
        out.append(np.asarray(ids, dtype=dtype))
    return lineno, offset, None, out


def _read_lines(paths: Sequence[str]) -> Iterator[tuple[str, tuple[int, int, bytes]]]:
    for path in paths:
        offset = 0
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                yield path, (lineno, offset, line)
                offset += len(line)


def _bounded_imap(pool: Any, items: Iterator[Any], chunksize: int, block: int) -> Iterator[Any]:
    """Ordered ``pool.imap`` with bounded memory.

    ``Pool.imap`` drains its input eagerly (a huge corpus would be read into the task queue at once), so lines are
    fed in blocks, at most two in flight: the workers stay busy while the results of the previous block are written.
    """
    pending: deque[Any] = deque()
    while batch := list(islice(items, block)):
        pending.append(pool.imap(_encode, batch, chunksize))
        if len(pending) == 2:
            yield from pending.popleft()
    while pending:
        yield from pending.popleft()


def preprocess_jsonl(
    inputs: str | Sequence[str],
    output_prefix: str,
    tokenizer_kwargs: dict[str, Any],
    *,
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    chunksize: int = 32,
    log_interval: int = 1000,
    skip_bad_lines: bool = False,
    log_file: TextIO | None = None,
) -> PreprocessStats:
    """Tokenize JSONL ``inputs`` (files processed in order into one dataset per key); return run statistics.

    ``tokenizer_kwargs`` are ``build_tokenizer`` arguments (each worker builds its own tokenizer). Output files
    appear atomically and only when the whole input was processed; on an error nothing is written.
    """
    from megatron_hybrid.tokenizers import build_tokenizer

    paths = [inputs] if isinstance(inputs, str) else list(inputs)
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"input file {p!r} does not exist")
    if not json_keys:
        raise ValueError("json_keys must name at least one key")
    log = log_file if log_file is not None else sys.stderr
    tokenizer = build_tokenizer(**tokenizer_kwargs)
    if append_eod:
        _ = tokenizer.eod  # fail early if the tokenizer has no end-of-document token
    dtype = optimal_dtype(tokenizer.vocab_size)
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    prefixes = {key: output_prefix_for_key(output_prefix, key) for key in json_keys}
    builders = {key: IndexedDatasetBuilder(get_bin_path(pre), dtype=dtype) for key, pre in prefixes.items()}
    stats = PreprocessStats(tokens={key: 0 for key in json_keys})
    total_bytes = sum(os.path.getsize(p) for p in paths)
    init_args = (tokenizer_kwargs, list(json_keys), append_eod, dtype)

    # The path travels outside the worker payload: results come back in input order, so a FIFO of paths (filled by
    # the reader, possibly on the pool's feeder thread; deque appends/pops are thread safe) pairs them up.
    path_of_item: deque[str] = deque()

    def items() -> Iterator[tuple[int, int, bytes]]:
        for path, item in _read_lines(paths):
            path_of_item.append(path)
            yield item

    t0 = time.time()
    pool = None
    try:
        if workers > 1:
            ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=init_args)
            results: Iterator[Any] = _bounded_imap(pool, items(), chunksize, block=workers * chunksize * 64)
        else:
            _init_worker(*init_args)
            results = map(_encode, items())
        for lineno, offset, error, arrays in results:
            path = path_of_item.popleft()
            if error is not None:
                err = PreprocessError(path, lineno, offset, error)
                if not skip_bad_lines:
                    raise err
                stats.skipped += 1
                if len(stats.skipped_messages) < 10:
                    stats.skipped_messages.append(str(err))
                continue
            assert arrays is not None
            for key, arr in zip(json_keys, arrays):
                builders[key].add_document(arr, [arr.size])
                stats.tokens[key] += int(arr.size)
            stats.documents += 1
            if log_interval > 0 and stats.documents % log_interval == 0:
                elapsed = max(time.time() - t0, 1e-9)
                done_mb = offset / 1024**2
                print(f"Processed {stats.documents} documents ({stats.documents / elapsed:.1f} docs/s, "
                      f"{done_mb / elapsed:.2f} MB/s, {100.0 * offset / max(total_bytes, 1):.1f}% of input).",
                      file=log, flush=True)
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        for key, builder in builders.items():
            builder.finalize(get_idx_path(prefixes[key]))
            stats.outputs[key] = prefixes[key]
    except BaseException:
        for builder in builders.values():
            builder.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    stats.input_bytes = total_bytes
    stats.seconds = time.time() - t0
    return stats
