"""Local ``tokenizer.json`` tokenizers through the Rust ``tokenizers`` library (never downloads from a hub)."""

from __future__ import annotations

import json
import os
from typing import Any

from megatron_hybrid.tokenizers.base import MegatronHybridTokenizer

__all__ = ["HuggingFaceTokenizer"]

# Tried in order when no tokenizer_config.json / special_tokens_map.json names the end-of-sequence token.
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>", "[SEP]")
_BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "[CLS]")


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as a string or as an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class HuggingFaceTokenizer(MegatronHybridTokenizer):
    """A Hugging Face fast tokenizer loaded from a local directory (with ``tokenizer.json``) or a ``.json`` file.

    Semantics follow Megatron's ``_HuggingFaceTokenizer`` (which wraps ``AutoTokenizer``): ``tokenize`` applies the
    tokenizer's post-processor (special tokens such as BOS are added if the tokenizer says so), ``detokenize`` keeps
    special tokens, ``vocab_size`` counts added tokens. ``eod`` is the eos token named by ``tokenizer_config.json``
    or ``special_tokens_map.json`` in the directory, else the first known end-of-text token present in the vocab.
    """

    tokenizer_type = "HuggingFaceTokenizer"

    def __init__(self, path: str, eos_token: str | None = None, bos_token: str | None = None) -> None:
        super().__init__()
        from tokenizers import Tokenizer

        if os.path.isdir(path):
            directory, file = path, os.path.join(path, "tokenizer.json")
        else:
            directory, file = os.path.dirname(path), path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"HuggingFaceTokenizer: no tokenizer.json at {file!r} (only local files are "
                                    "supported; hub names are never downloaded)")
        self.path = file
        self._tok = Tokenizer.from_file(file)
        config = self._read_special_tokens(directory)
        self._eos_token = eos_token or config.get("eos_token")
        self._bos_token = bos_token or config.get("bos_token")
        self._pad_token = config.get("pad_token")

    @staticmethod
    def _read_special_tokens(directory: str) -> dict[str, str]:
        found: dict[str, str] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
            p = os.path.join(directory, name)
            if not os.path.isfile(p):
                continue
            with open(p, encoding="utf-8") as f:
                data = json.load(f)
            for key in ("eos_token", "bos_token", "pad_token"):
                content = _token_content(data.get(key))
                if content is not None:
                    found[key] = content
        return found

    def _id_of(self, token: str | None, candidates: tuple[str, ...]) -> int | None:
        if token is not None:
            tid = self._tok.token_to_id(token)
            if tid is None:
                raise ValueError(f"{self.path}: special token {token!r} is not in the vocabulary")
            return tid
        for cand in candidates:
            tid = self._tok.token_to_id(cand)
            if tid is not None:
                return tid
        return None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def detokenize(self, ids: Any) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def eod(self) -> int:
        tid = self._id_of(self._eos_token, _EOS_CANDIDATES)
        if tid is None:
            raise ValueError(f"{self.path}: cannot tell the end-of-document token; add \"eos_token\" to a "
                             "tokenizer_config.json next to tokenizer.json")
        return tid

    @property
    def bos(self) -> int | None:
        return self._id_of(self._bos_token, _BOS_CANDIDATES)

    @property
    def pad(self) -> int | None:
        return self._tok.token_to_id(self._pad_token) if self._pad_token else None

    @property
    def vocab(self) -> dict[str, int]:
        """token -> id, added tokens included."""
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def unique_identifiers(self) -> dict[str, Any]:
        return {"class": type(self).__name__, "path": os.path.abspath(self.path), "vocab_size": self.vocab_size}
