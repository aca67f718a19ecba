"""tools/train_tokenizer.py: local BPE / sentencepiece training from text globs and JSONL, loadable outputs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from tok_helpers import PYTHON, REPO_ROOT, SAMPLES

from megatron_hybrid.tokenizers import build_tokenizer
from megatron_hybrid.tokenizers.training import iter_texts


def _train(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    return subprocess.run([PYTHON, str(REPO_ROOT / "tools" / "train_tokenizer.py"), *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_cli_bpe_from_globs_and_jsonl(corpus_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "tok"
    proc = _train("--input", str(corpus_dir / "part*.txt"), str(corpus_dir / "docs.jsonl"), "--vocab-size", "500",
                  "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == ["merges.txt", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    hf = build_tokenizer("HuggingFaceTokenizer", str(out))
    gpt2 = build_tokenizer("GPT2BPETokenizer", vocab_file=str(out / "vocab.json"), merge_file=str(out / "merges.txt"))
    assert hf.vocab_size == gpt2.vocab_size == 500 and hf.eod == gpt2.eod
    for text in SAMPLES:
        assert hf.tokenize(text) == gpt2.tokenize(text)
        assert hf.detokenize(hf.tokenize(text)) == text


def test_cli_sentencepiece(corpus_dir: Path, tmp_path: Path) -> None:
    proc = _train("--input", str(corpus_dir / "docs.jsonl"), "--vocab-size", "600", "--output", str(tmp_path),
                  "--type", "sentencepiece")
    assert proc.returncode == 0, proc.stderr
    tok = build_tokenizer("GPTSentencePieceTokenizer", str(tmp_path / "tokenizer.model"))
    assert tok.vocab_size == 600 and tok.eod == 2
    assert tok.detokenize(tok.tokenize(SAMPLES[1])) == SAMPLES[1]


def test_inputs_are_validated(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{bad}:2: invalid JSON"):
        list(iter_texts([str(bad)]))
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{missing}:1: missing JSON key 'text'"):
        list(iter_texts([str(missing)]))
    proc = _train("--input", str(tmp_path / "nothing*.txt"), "--vocab-size", "300", "--output", str(tmp_path / "o"))
    assert proc.returncode == 1 and "error: no input file matches" in proc.stderr
