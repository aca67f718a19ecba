"""Fixtures of the data tests (defined in data_helpers.py)."""

from __future__ import annotations

from data_helpers import bpe_dir, jsonl_corpus, make_dataset, mcore

__all__ = ["bpe_dir", "jsonl_corpus", "make_dataset", "mcore"]
