"""build_tokenizer: every type on a locally trained model, the shared interface, and Megatron's vocab padding."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tok_helpers import SAMPLES

from megatron_hybrid.tokenizers import (
    GPT2BPETokenizer,
    GPTSentencePieceTokenizer,
    HuggingFaceTokenizer,
    MegatronHybridTokenizer,
    NullTokenizer,
    build_tokenizer,
    vocab_size_with_padding,
)


def _megatron_padding(orig: int, divisible_by: int, tp: int) -> int:
    """Megatron-LM's _vocab_size_with_padding, as the loop it is written as."""
    after = orig
    multiple = divisible_by * tp
    while after % multiple != 0:
        after += 1
    return after


def _check_interface(tok: MegatronHybridTokenizer, exact_round_trip: bool = True) -> None:
    assert isinstance(tok.vocab_size, int) and tok.vocab_size > 0
    assert 0 <= tok.eod < tok.vocab_size
    assert tok.bos is None or 0 <= tok.bos < tok.vocab_size
    for text in SAMPLES:
        ids = tok.tokenize(text)
        assert isinstance(ids, list) and all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
        if exact_round_trip:
            assert tok.detokenize(ids) == text
    assert tok.padded_vocab_size % 128 == 0 and tok.padded_vocab_size >= tok.vocab_size


@pytest.mark.parametrize("divisible_by, tp", [(1, 1), (128, 1), (128, 2), (128, 8), (64, 3)])
@pytest.mark.parametrize("orig", [1, 127, 128, 700, 32000, 50257, 151665])
def test_vocab_size_with_padding_is_megatrons(orig: int, divisible_by: int, tp: int) -> None:
    assert vocab_size_with_padding(orig, divisible_by, tp) == _megatron_padding(orig, divisible_by, tp)


def test_padded_vocab_size_uses_divisor_and_tp(bpe_dir: Path) -> None:
    assert vocab_size_with_padding(50257) == 50304
    assert vocab_size_with_padding(50257, 128, 8) == 51200
    tok = build_tokenizer("HuggingFaceTokenizer", str(bpe_dir), make_vocab_size_divisible_by=128, tp_size=4)
    assert tok.vocab_size == 700 and tok.padded_vocab_size == 1024
    assert build_tokenizer("HuggingFaceTokenizer", str(bpe_dir)).padded_vocab_size == 768
    assert build_tokenizer("NullTokenizer", vocab_size=1000, make_vocab_size_divisible_by=100).padded_vocab_size == 1000
    with pytest.raises(ValueError):
        vocab_size_with_padding(0)


def test_huggingface_tokenizer(bpe_dir: Path, tmp_path: Path) -> None:
    tok = build_tokenizer("HuggingFaceTokenizer", str(bpe_dir))
    assert isinstance(tok, HuggingFaceTokenizer) and tok.vocab_size == 700
    _check_interface(tok)
    assert tok.eod == tok.vocab["<|endoftext|>"] and tok.bos is None
    assert tok.tokenize("a<|endoftext|>b")[1] == tok.eod  # added special tokens are matched in text (HF semantics)
    # the file itself works too, and without tokenizer_config.json the end-of-text token is still found
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(bpe_dir / "tokenizer.json", bare / "tokenizer.json")
    by_file = build_tokenizer("HuggingFaceTokenizer", str(bare / "tokenizer.json"))
    assert by_file.eod == tok.eod and by_file.tokenize(SAMPLES[2]) == tok.tokenize(SAMPLES[2])
    (bare / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<nope>"}}))
    with pytest.raises(ValueError, match="'<nope>' is not in the vocabulary"):
        _ = HuggingFaceTokenizer(str(bare)).eod


def test_gpt2_bpe_tokenizer(bpe_dir: Path) -> None:
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=str(bpe_dir / "vocab.json"),
                          merge_file=str(bpe_dir / "merges.txt"))
    assert isinstance(tok, GPT2BPETokenizer)
    _check_interface(tok)
    vocab = json.loads((bpe_dir / "vocab.json").read_text(encoding="utf-8"))
    assert tok.vocab_size == len(vocab) and tok.eod == vocab["<|endoftext|>"]
    hf = build_tokenizer("HuggingFaceTokenizer", str(bpe_dir))
    for text in SAMPLES:
        assert tok.tokenize(text) == hf.tokenize(text)  # same byte-level BPE from either file format
    # Megatron's GPT-2 tokenizer does not split special tokens out of text
    assert tok.eod not in tok.tokenize("a<|endoftext|>b")
    assert tok.detokenize(tok.tokenize("a<|endoftext|>b")) == "a<|endoftext|>b"


def test_sentencepiece_tokenizer(sp_model: Path) -> None:
    tok = build_tokenizer("GPTSentencePieceTokenizer", str(sp_model))
    assert isinstance(tok, GPTSentencePieceTokenizer)
    assert tok.vocab_size == 800 and tok.padded_vocab_size == 896
    assert (tok.eod, tok.bos) == (2, 1)
    _check_interface(tok)  # lossless: identity normalisation + byte fallback
    assert tok.tokenize("hello")[0] != tok.bos  # no BOS inserted (Megatron's GPT variant)


def test_null_tokenizer() -> None:
    tok = build_tokenizer("NullTokenizer", vocab_size=1000)
    assert isinstance(tok, NullTokenizer)
    assert tok.vocab_size == 1000 and tok.eod == 999 and tok.bos is None and tok.padded_vocab_size == 1024
    assert tok.tokenize("5 17  3\n42") == [5, 17, 3, 42]
    assert tok.detokenize([5, 17, 3]) == "5 17 3"
    with pytest.raises(ValueError, match="whitespace-separated integers"):
        tok.tokenize("5 x")
    with pytest.raises(ValueError, match=r"outside \[0, 1000\)"):
        tok.tokenize("1000")


def test_build_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tokenizer type 'Nope'"):
        build_tokenizer("Nope")
    with pytest.raises(ValueError, match="needs tokenizer_model"):
        build_tokenizer("HuggingFaceTokenizer")
    with pytest.raises(ValueError, match="needs vocab_file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file="v.json")
    with pytest.raises(ValueError, match="needs vocab_size"):
        build_tokenizer("NullTokenizer")
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        build_tokenizer("HuggingFaceTokenizer", "gpt2")  # a hub name, not a local path
    with pytest.raises(FileNotFoundError):
        build_tokenizer("GPTSentencePieceTokenizer", str(tmp_path / "missing.model"))
