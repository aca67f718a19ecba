"""Helpers and fixtures of the data tests: small corpora from text that ships with Python, tiny tokenizers.

Imported by conftest.py (fixtures) and by the test modules (helpers); the unique module name avoids clashes with
other test folders.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from megatron_hybrid.data import IndexedDatasetBuilder

REPO_ROOT = Path(__file__).resolve().parents[2]
EOD = 999  # NullTokenizer(vocab_size=1000).eod


def stdlib_texts(n: int, max_chars: int = 1500) -> list[str]:
    """``n`` deterministic documents: the beginnings of stdlib modules (sorted by name)."""
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
    texts = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(max_chars).strip()
        if text:
            texts.append(text)
        if len(texts) == n:
            break
    assert len(texts) == n, f"only {len(texts)} stdlib files found"
    return texts


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE (tokenizer.json + vocab.json/merges.txt) trained on stdlib text, vocab 600."""
    from megatron_hybrid.tokenizers.training import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("bpe")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(stdlib_texts(60)), encoding="utf-8")
    out = root / "tok"
    train_bpe_tokenizer([str(corpus)], str(out), vocab_size=600)
    return out


@pytest.fixture(scope="session")
def jsonl_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 JSON lines with a "text" and a "title" key."""
    root = tmp_path_factory.mktemp("jsonl")
    path = root / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(stdlib_texts(120, max_chars=800)):
            f.write(json.dumps({"text": text, "title": f"document number {i}"}) + "\n")
    return path


def write_dataset(prefix: Path | str, docs: list[np.ndarray], dtype: type = np.uint16) -> str:
    """Write one-sequence documents to an indexed dataset; returns the prefix."""
    prefix = str(prefix)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(np.asarray(doc), [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


def random_docs(seed: int, n: int, min_len: int = 1, max_len: int = 60, eod: int | None = EOD) -> list[np.ndarray]:
    """Random documents of ids < 999, each ending with ``eod`` (if given)."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        body = rng.integers(0, 999, size=int(rng.integers(min_len, max_len + 1)))
        docs.append(np.concatenate([body, [eod]]) if eod is not None else body)
    return docs


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., str]:
    """Factory: ``make_dataset(name, docs, dtype)`` -> prefix in tmp_path."""

    def make(name: str, docs: list[np.ndarray], dtype: type = np.uint16) -> str:
        return write_dataset(tmp_path / name, docs, dtype)

    return make


@pytest.fixture(scope="session")
def mcore() -> object:
    """megatron-core's dataset modules (import is slow-ish and noisy: once per session, warnings silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import megatron.core.datasets.blended_megatron_dataset_builder as builder
        import megatron.core.datasets.gpt_dataset as gpt_dataset
        import megatron.core.datasets.helpers as helpers
        import megatron.core.datasets.indexed_dataset as indexed_dataset

    class Modules:
        pass

    m = Modules()
    m.indexed_dataset, m.gpt_dataset, m.helpers, m.builder = indexed_dataset, gpt_dataset, helpers, builder
    return m


def python_env() -> dict[str, str]:
    """Environment for subprocesses running the venv python on the tools."""
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


PYTHON = sys.executable
