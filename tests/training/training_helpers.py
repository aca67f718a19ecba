"""Helpers and fixtures of the training tests: a byte-level corpus from Python's own stdlib, tiny model flags.

Byte-level data (ids 0..255, end-of-document 256, ``NullTokenizer(257)``) needs no tokenizer training, so fixtures
are instant; the train.sh test trains a real BPE tokenizer instead.
"""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_hybrid.data import IndexedDatasetBuilder

REPO_ROOT = Path(__file__).resolve().parents[2]
BYTE_VOCAB = 257  # NullTokenizer(257): bytes 0..255, eod 256

# A 4-layer hybrid (Mamba, attention, Mamba, MLP) small enough for many CPU steps per second; TP=2 divisible.
TINY_MODEL_FLAGS = [
    "--num-layers", "4", "--hybrid-override-pattern", "M*M-", "--hidden-size", "32",
    "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2", "--ffn-hidden-size", "64",
    "--mamba-state-dim", "16", "--mamba-head-dim", "8", "--mamba-num-groups", "2", "--mamba-chunk-size", "16",
    "--squared-relu", "--disable-bias-linear", "--attention-dropout", "0", "--hidden-dropout", "0",
    "--make-vocab-size-divisible-by", "8", "--position-embedding-type", "rope",
]


def stdlib_documents(n: int, max_chars: int = 4000) -> list[bytes]:
    """``n`` deterministic documents: the beginnings of stdlib modules, sorted by name."""
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
    docs = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(max_chars)
        if text.strip():
            docs.append(text.encode("utf-8"))
        if len(docs) == n:
            return docs
    raise AssertionError(f"only {len(docs)} stdlib files found")


def write_byte_dataset(prefix: str | Path, n_docs: int = 60) -> str:
    """An indexed dataset of stdlib documents as byte ids, each followed by the end-of-document id."""
    prefix = str(prefix)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in stdlib_documents(n_docs):
        ids = np.frombuffer(doc, dtype=np.uint8).astype(np.uint16)
        builder.add_document(np.concatenate([ids, [BYTE_VOCAB - 1]]).astype(np.uint16), [len(ids) + 1])
    builder.finalize(prefix + ".idx")
    return prefix


def data_flags(prefix: str) -> list[str]:
    return ["--data-path", prefix, "--split", "95,5,0", "--tokenizer-type", "NullTokenizer",
            "--vocab-size", str(BYTE_VOCAB)]


def run_flags(prefix: str, *, iters: int = 4, micro: int = 2, global_batch: int = 4, seq: int = 32,
              extra: list[str] | None = None) -> list[str]:
    """A complete command line for a short CPU run on the byte dataset."""
    return TINY_MODEL_FLAGS + data_flags(prefix) + [
        "--seq-length", str(seq), "--max-position-embeddings", str(seq), "--micro-batch-size", str(micro),
        "--global-batch-size", str(global_batch), "--train-iters", str(iters), "--lr", "3e-3", "--min-lr", "3e-4",
        "--lr-decay-style", "cosine", "--lr-warmup-iters", "1", "--weight-decay", "0.1", "--adam-beta2", "0.95",
        "--log-interval", "1", "--eval-iters", "0", "--seed", "7",
    ] + list(extra or [])


@pytest.fixture(scope="session")
def byte_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Prefix of a ~200 KB byte-level indexed dataset of stdlib source."""
    return write_byte_dataset(tmp_path_factory.mktemp("bytes") / "stdlib")


def python() -> str:
    return sys.executable
