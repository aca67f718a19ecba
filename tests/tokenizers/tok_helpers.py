"""Helpers and fixtures of the tokenizer tests: tiny tokenizers trained on text that ships with Python.

Imported by conftest.py (fixtures) and by the test modules; the unique module name avoids clashes with other test
folders.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

# Ordinary text (no special tokens) with the hard cases: accents, emoji, CJK, tabs, newlines, runs of spaces.
SAMPLES = [
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n\treturn x ** 2  # squared\n",
    "Déjà vu — naïve café, 東京, emoji 🙂 and spaces    here.",
    "  leading and trailing spaces  ",
    "",
]


def stdlib_texts(n: int, max_chars: int = 3000) -> list[str]:
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
    return texts


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three plain-text files and one JSONL file of stdlib text (plus accented text so all bytes of SAMPLES occur)."""
    root = tmp_path_factory.mktemp("corpus")
    texts = stdlib_texts(80)
    for k in range(3):
        (root / f"part{k}.txt").write_text("\n".join(texts[k::4]), encoding="utf-8")
    with open(root / "docs.jsonl", "w", encoding="utf-8") as f:
        for t in texts[3::4] + SAMPLES[:4]:
            f.write(json.dumps({"text": t}) + "\n")
    return root


@pytest.fixture(scope="session")
def bpe_dir(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from megatron_hybrid.tokenizers.training import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("bpe")
    train_bpe_tokenizer([str(corpus_dir / "*.txt"), str(corpus_dir / "docs.jsonl")], str(out), vocab_size=700)
    return out


@pytest.fixture(scope="session")
def sp_model(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from megatron_hybrid.tokenizers.training import train_sentencepiece_tokenizer

    out = tmp_path_factory.mktemp("sp")
    return Path(train_sentencepiece_tokenizer([str(corpus_dir / "*.txt")], str(out), vocab_size=800))
