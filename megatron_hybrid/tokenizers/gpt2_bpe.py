"""GPT-2 style byte-level BPE from ``vocab.json`` + ``merges.txt`` (the files Megatron's GPT2BPETokenizer reads)."""

from __future__ import annotations

import os
from typing import Any

from megatron_hybrid.tokenizers.base import MegatronHybridTokenizer

__all__ = ["GPT2BPETokenizer"]

EOD_TOKEN = "<|endoftext|>"


class GPT2BPETokenizer(MegatronHybridTokenizer):
    """Byte-level BPE with GPT-2's pre-tokenization regex, built on the ``tokenizers`` library's BPE model.

    Same behaviour as Megatron's ``_GPT2BPETokenizer``: no prefix space, no special-token splitting in ``tokenize``
    (``"<|endoftext|>"`` inside text is encoded as ordinary characters), ``eod`` is the id of ``<|endoftext|>``,
    ``vocab_size`` is the number of entries of ``vocab.json``.
    """

    tokenizer_type = "GPT2BPETokenizer"

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        super().__init__()
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        for kind, p in (("vocab", vocab_file), ("merges", merge_file)):
            if p is None or not os.path.isfile(p):
                raise FileNotFoundError(f"GPT2BPETokenizer: {kind} file {p!r} not found")
        self.vocab_file, self.merge_file = vocab_file, merge_file
        tok = Tokenizer(models.BPE.from_file(vocab_file, merge_file))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        self._tok = tok
        self._vocab_size = tok.get_vocab_size(with_added_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Any) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def eod(self) -> int:
        tid = self._tok.token_to_id(EOD_TOKEN)
        if tid is None:
            raise ValueError(f"{self.vocab_file}: {EOD_TOKEN!r} is not in the vocabulary")
        return tid

    @property
    def vocab(self) -> dict[str, int]:
        """token -> id."""
        return self._tok.get_vocab(with_added_tokens=False)

    @property
    def unique_identifiers(self) -> dict[str, Any]:
        return {"class": type(self).__name__, "vocab_file": os.path.abspath(self.vocab_file),
                "merge_file": os.path.abspath(self.merge_file), "vocab_size": self.vocab_size}
