"""SentencePiece ``.model`` tokenizer with Megatron's ``GPTSentencePieceTokenizer`` semantics."""

from __future__ import annotations

import os
from typing import Any

from megatron_hybrid.tokenizers.base import MegatronHybridTokenizer

__all__ = ["GPTSentencePieceTokenizer"]


class GPTSentencePieceTokenizer(MegatronHybridTokenizer):
    """Plain SentencePiece encode/decode; ``eod`` is the model's eos id, ``bos`` its bos id (None when disabled).

    Like Megatron's GPT variant, no extra ids are appended and no BOS/EOS is inserted by ``tokenize``.
    """

    tokenizer_type = "GPTSentencePieceTokenizer"

    def __init__(self, model_file: str) -> None:
        super().__init__()
        import sentencepiece as spm

        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"GPTSentencePieceTokenizer: no sentencepiece model at {model_file!r}")
        self.model_file = model_file
        self._sp = spm.SentencePieceProcessor(model_file=model_file)

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    def tokenize(self, text: str) -> list[int]:
        return list(self._sp.encode_as_ids(text))

    def detokenize(self, ids: Any) -> str:
        return self._sp.decode_ids([int(i) for i in ids])

    @property
    def eod(self) -> int:
        eos = int(self._sp.eos_id())
        if eos < 0:
            raise ValueError(f"{self.model_file}: the sentencepiece model has no eos piece (trained with eos_id=-1)")
        return eos

    @property
    def bos(self) -> int | None:
        bos = int(self._sp.bos_id())
        return bos if bos >= 0 else None

    @property
    def pad(self) -> int | None:
        pad = int(self._sp.pad_id())
        return pad if pad >= 0 else None

    @property
    def unique_identifiers(self) -> dict[str, Any]:
        return {"class": type(self).__name__, "model_file": os.path.abspath(self.model_file),
                "vocab_size": self.vocab_size}
