"""Fixtures of the tokenizer tests (defined in tok_helpers.py)."""

from __future__ import annotations

from tok_helpers import bpe_dir, corpus_dir, sp_model

__all__ = ["bpe_dir", "corpus_dir", "sp_model"]
