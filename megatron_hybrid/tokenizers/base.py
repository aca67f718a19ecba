"""Common tokenizer interface and Megatron's vocabulary padding rule.

Why a thin interface of our own: the data pipeline and the training loop only need ``tokenize``, ``detokenize``,
``vocab_size``, ``eod`` and the padded vocabulary size; each backend (``tokenizers``, ``sentencepiece``, plain ints)
exposes those differently. The names follow Megatron-LM's ``MegatronTokenizer`` so Megatron users recognise them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

__all__ = ["MegatronHybridTokenizer", "vocab_size_with_padding"]


def vocab_size_with_padding(orig_vocab_size: int, make_vocab_size_divisible_by: int = 128, tp_size: int = 1) -> int:
    """Smallest size >= ``orig_vocab_size`` divisible by ``make_vocab_size_divisible_by * tp_size``.

    Same rule as Megatron-LM's ``_vocab_size_with_padding``: the embedding and output layer are split evenly over
    tensor-parallel ranks and each shard should be a multiple of a GPU-friendly size (128 by default).
    """
    if orig_vocab_size <= 0:
        raise ValueError(f"vocab size must be positive, got {orig_vocab_size}")
    if make_vocab_size_divisible_by <= 0 or tp_size <= 0:
        raise ValueError("make_vocab_size_divisible_by and tp_size must be positive")
    multiple = make_vocab_size_divisible_by * tp_size
    return -(-orig_vocab_size // multiple) * multiple


class MegatronHybridTokenizer(ABC):
    """Interface every tokenizer of ``build_tokenizer`` implements.

    ``padded_vocab_size`` is set by ``build_tokenizer`` (it depends on the parallel layout, not on the tokenizer);
    before that it equals ``vocab_size`` padded with the defaults (128, tp 1).
    """

    tokenizer_type: str = ""

    def __init__(self) -> None:
        self._padding: tuple[int, int] = (128, 1)

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (including special tokens)."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Text -> token ids."""

    @abstractmethod
    def detokenize(self, ids: Any) -> str:
        """Token ids -> text."""

    @property
    @abstractmethod
    def eod(self) -> int:
        """End-of-document id appended between documents (``--append-eod``)."""

    @property
    def bos(self) -> int | None:
        """Beginning-of-sequence id, or None when the tokenizer has none."""
        return None

    @property
    def pad(self) -> int | None:
        """Padding id, or None (the GPT dataset then pads with -1 and masks it, as Megatron does)."""
        return None

    def set_padding(self, make_vocab_size_divisible_by: int = 128, tp_size: int = 1) -> None:
        """Record the parallel layout used to compute ``padded_vocab_size``."""
        vocab_size_with_padding(self.vocab_size, make_vocab_size_divisible_by, tp_size)  # validates
        self._padding = (make_vocab_size_divisible_by, tp_size)

    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows: ``vocab_size`` rounded up to a multiple of make_vocab_size_divisible_by * tp_size."""
        return vocab_size_with_padding(self.vocab_size, *self._padding)

    @property
    def unique_identifiers(self) -> dict[str, Any]:
        """Description used in cache keys and logs."""
        return {"class": type(self).__name__, "vocab_size": self.vocab_size}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eod={self._safe_eod()})"

    def _safe_eod(self) -> int | None:
        try:
            return self.eod
        except (ValueError, AttributeError):
            return None
