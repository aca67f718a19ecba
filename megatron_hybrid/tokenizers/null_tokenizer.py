"""Tokenizer for pre-tokenized text: whitespace-separated integer ids (benchmarks, synthetic data, tests)."""

from __future__ import annotations

from typing import Any

from megatron_hybrid.tokenizers.base import MegatronHybridTokenizer

__all__ = ["NullTokenizer"]


class NullTokenizer(MegatronHybridTokenizer):
    """``"5 17 3"`` -> ``[5, 17, 3]``; ``vocab_size`` is given and the last id is the end-of-document token.

    Megatron's ``_NullTokenizer(V)`` has ids ``0..V-1`` plus eod ``V`` (so its ``vocab_size`` is ``V + 1``). Here the
    given ``vocab_size`` is the total, so ``eod == vocab_size - 1`` and ``NullTokenizer(V + 1)`` reproduces
    Megatron's ``_NullTokenizer(V)`` exactly (same eod, same vocab size).
    """

    tokenizer_type = "NullTokenizer"

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        if vocab_size is None or int(vocab_size) < 1:
            raise ValueError(f"NullTokenizer needs a positive vocab_size, got {vocab_size!r}")
        self._vocab_size = int(vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._vocab_size - 1

    def tokenize(self, text: str) -> list[int]:
        try:
            ids = [int(tok) for tok in text.split()]
        except ValueError as e:
            raise ValueError(f"NullTokenizer expects whitespace-separated integers: {e}") from None
        bad = [i for i in ids if not 0 <= i < self._vocab_size]
        if bad:
            raise ValueError(f"NullTokenizer: id {bad[0]} outside [0, {self._vocab_size})")
        return ids

    def detokenize(self, ids: Any) -> str:
        return " ".join(str(int(i)) for i in ids)
