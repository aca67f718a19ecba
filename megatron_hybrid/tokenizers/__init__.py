"""Tokenizers: one factory (``build_tokenizer``) over Megatron-LM's tokenizer types, all local files only.

Types (Megatron names):
- ``HuggingFaceTokenizer``: ``tokenizer_model`` = directory holding ``tokenizer.json`` (or the file itself).
- ``GPTSentencePieceTokenizer``: ``tokenizer_model`` = sentencepiece ``.model``.
- ``GPT2BPETokenizer``: ``vocab_file`` (vocab.json) + ``merge_file`` (merges.txt), byte-level BPE.
- ``NullTokenizer``: text is whitespace-separated ids; ``vocab_size`` given, ``eod = vocab_size - 1``.

``tools/train_tokenizer.py`` (``megatron_hybrid.tokenizers.training``) trains the files these load.
"""

from __future__ import annotations

from megatron_hybrid.tokenizers.base import MegatronHybridTokenizer, vocab_size_with_padding
from megatron_hybrid.tokenizers.gpt2_bpe import GPT2BPETokenizer
from megatron_hybrid.tokenizers.huggingface import HuggingFaceTokenizer
from megatron_hybrid.tokenizers.null_tokenizer import NullTokenizer
from megatron_hybrid.tokenizers.sentencepiece_tokenizer import GPTSentencePieceTokenizer

__all__ = [
    "TOKENIZER_TYPES",
    "GPT2BPETokenizer",
    "GPTSentencePieceTokenizer",
    "HuggingFaceTokenizer",
    "MegatronHybridTokenizer",
    "NullTokenizer",
    "build_tokenizer",
    "vocab_size_with_padding",
]

TOKENIZER_TYPES = ("HuggingFaceTokenizer", "GPTSentencePieceTokenizer", "GPT2BPETokenizer", "NullTokenizer")


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: str | None = None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    vocab_size: int | None = None,
    make_vocab_size_divisible_by: int = 128,
    tp_size: int = 1,
) -> MegatronHybridTokenizer:
    """Build a tokenizer by Megatron type name; ``padded_vocab_size`` uses the given divisor and TP size."""
    if tokenizer_type == "HuggingFaceTokenizer":
        if tokenizer_model is None:
            raise ValueError("HuggingFaceTokenizer needs tokenizer_model (a local directory or tokenizer.json)")
        tok: MegatronHybridTokenizer = HuggingFaceTokenizer(tokenizer_model)
    elif tokenizer_type == "GPTSentencePieceTokenizer":
        if tokenizer_model is None:
            raise ValueError("GPTSentencePieceTokenizer needs tokenizer_model (a sentencepiece .model file)")
        tok = GPTSentencePieceTokenizer(tokenizer_model)
    elif tokenizer_type == "GPT2BPETokenizer":
        if vocab_file is None or merge_file is None:
            raise ValueError("GPT2BPETokenizer needs vocab_file (vocab.json) and merge_file (merges.txt)")
        tok = GPT2BPETokenizer(vocab_file, merge_file)
    elif tokenizer_type == "NullTokenizer":
        if vocab_size is None:
            raise ValueError("NullTokenizer needs vocab_size")
        tok = NullTokenizer(vocab_size)
    else:
        raise ValueError(f"unknown tokenizer type {tokenizer_type!r}; expected one of {', '.join(TOKENIZER_TYPES)}")
    tok.set_padding(make_vocab_size_divisible_by, tp_size)
    return tok
