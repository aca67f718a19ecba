"""Helpers shared by the dataset classes: splits, blend parsing, atomic on-disk caching, rank-0-builds protocol."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any

import numpy as np

__all__ = [
    "Split",
    "atomic_save_npy",
    "atomic_write_text",
    "build_on_rank0_then_load",
    "convert_split_vector_to_split_matrix",
    "description_hash",
    "normalize",
    "parse_data_path",
    "parse_split",
]


class Split(Enum):
    """Dataset splits in Megatron's order (the order of the ``split`` string)."""

    train = 0
    valid = 1
    test = 2


def normalize(weights: Sequence[float]) -> list[float]:
    """Weights divided by their sum (float64, like Megatron's ``normalize``)."""
    w = np.asarray(weights, dtype=np.float64)
    total = float(w.sum())
    if total <= 0:
        raise ValueError(f"weights must have a positive sum, got {list(weights)}")
    return (w / total).tolist()


def parse_split(split: str) -> list[float]:
    """``"99,1,0"`` -> ``[0.99, 0.01, 0.0]`` (missing trailing entries are 0), as Megatron parses ``--split``."""
    values = [float(v) for v in re.findall(r"[.0-9]+", split)]
    if not values or len(values) > len(Split):
        raise ValueError(f"split {split!r} must have 1 to {len(Split)} comma-separated non-negative numbers")
    values += [0.0] * (len(Split) - len(values))
    return normalize(values)


def convert_split_vector_to_split_matrix(vector: Sequence[float]) -> list[tuple[float, float] | None]:
    """``[0.99, 0.01, 0.0]`` -> ``[(0, 0.99), (0.99, 1.0), None]``: the fraction book-ends of each split."""
    bounds = [0.0]
    for v in vector:
        bounds.append(bounds[-1] + v)
    return [(a, b) if b > a else None for a, b in zip(bounds[:-1], bounds[1:])]


def parse_data_path(data_path: str | Sequence[str] | None) -> tuple[list[str], list[float] | None] | None:
    """Parse a Megatron ``--data-path``: ``"A"``, ``"A B"`` (no weights) or ``"0.3 A 0.7 B"`` (weight, prefix pairs).

    Accepts the CLI token list or one whitespace-separated string. Returns ``(prefixes, weights or None)``; the
    weights are returned as given (callers normalise). Raises a clear ``ValueError`` on a half-weighted list.
    """
    if data_path is None:
        return None
    tokens = data_path.split() if isinstance(data_path, str) else [t for item in data_path for t in str(item).split()]
    if not tokens:
        raise ValueError("empty data path")

    def as_float(tok: str) -> float | None:
        try:
            return float(tok)
        except ValueError:
            return None

    if len(tokens) % 2 == 0 and as_float(tokens[0]) is not None:
        weights = [as_float(t) for t in tokens[0::2]]
        prefixes = tokens[1::2]
        if any(w is None for w in weights):
            raise ValueError(f"data path {tokens} mixes weights and prefixes; use 'W1 P1 W2 P2 ...' or 'P1 P2 ...'")
        if any(w < 0 for w in weights if w is not None):
            raise ValueError(f"blend weights must be non-negative, got {weights}")
        return [p.strip() for p in prefixes], [float(w) for w in weights if w is not None]
    if any(as_float(t) is not None for t in tokens) and len(tokens) > 1:
        raise ValueError(f"data path {tokens} has numbers but not as 'W1 P1 W2 P2 ...' pairs")
    return [t.strip() for t in tokens], None


def description_hash(description: dict[str, Any]) -> tuple[str, str]:
    """JSON text of a description and its md5: the cache key of the index files built from it."""
    text = json.dumps(description, indent=4, sort_keys=False, default=str)
    return text, hashlib.md5(text.encode("utf-8"), usedforsecurity=False).hexdigest()


def _tmp_sibling(path: str) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.tmp.{os.getpid()}")


def atomic_save_npy(path: str, array: np.ndarray) -> None:
    """``numpy.save`` to a temporary sibling then rename: readers see the complete file or none."""
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
    """Write text via a temporary sibling and a rename."""
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _distributed() -> tuple[bool, int]:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a hard dependency of the package
        return False, 0
    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank()
    return False, 0


def build_on_rank0_then_load(
    cache_files: dict[str, str] | None,
    description_path: str | None,
    description: str,
    build: Callable[[], dict[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """Return the named index arrays, building them at most once across ranks and runs.

    Protocol (Megatron's): with ``cache_files`` None nothing is cached and every caller builds. Otherwise, when
    the cache is complete, load it (memory-mapped). If not, rank 0 (or the only process) builds and writes every
    array atomically, the description file last (it marks the entry complete); when ``torch.distributed`` is
    initialised the other ranks wait on a barrier and then load. The cache directory must be shared by all ranks.
    """
    if cache_files is None or description_path is None:
        return build()

    def complete() -> bool:
        return os.path.isfile(description_path) and all(os.path.isfile(p) for p in cache_files.values())

    def load() -> dict[str, np.ndarray]:
        return {name: np.load(p, mmap_mode="r", allow_pickle=False) for name, p in cache_files.items()}

    def build_and_save() -> dict[str, np.ndarray]:
        arrays = build()
        os.makedirs(os.path.dirname(description_path), exist_ok=True)
        for name, p in cache_files.items():
            atomic_save_npy(p, arrays[name])
        atomic_write_text(description_path, description)
        return arrays

    is_dist, rank = _distributed()
    if not is_dist:
        return load() if complete() else build_and_save()
    import torch.distributed as dist

    arrays: dict[str, np.ndarray] | None = None
    if rank == 0 and not complete():
        arrays = build_and_save()
    dist.barrier()
    if arrays is not None:
        return arrays
    if not complete():
        raise FileNotFoundError(f"rank {rank}: dataset index cache {description_path} not found after rank 0 built "
                                "it; the cache directory (path_to_cache) must be on a filesystem shared by all ranks")
    return load()
