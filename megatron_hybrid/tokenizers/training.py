"""Train small tokenizers locally (no downloads): byte-level BPE via ``tokenizers``, or a sentencepiece model.

Why in the package (``tools/train_tokenizer.py`` is the CLI): tests and notebooks train tiny tokenizers in-process.

Inputs are files or glob patterns. ``.jsonl`` / ``.json`` files are read one JSON object per line and the strings
under ``json_keys`` are used; any other file is read as plain UTF-8 text, one training example per line.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
from collections.abc import Iterator, Sequence

__all__ = ["expand_inputs", "iter_texts", "train_bpe_tokenizer", "train_sentencepiece_tokenizer"]

EOD_TOKEN = "<|endoftext|>"


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Files and glob patterns -> sorted, de-duplicated file list (order of the arguments kept)."""
    files: list[str] = []
    for pattern in inputs:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise FileNotFoundError(f"no input file matches {pattern!r}")
        files.extend(m for m in matches if m not in files)
    return files


def _is_jsonl(path: str) -> bool:
    return path.endswith((".jsonl", ".json", ".jsonl.txt"))


def iter_texts(files: Sequence[str], json_keys: Sequence[str] = ("text",)) -> Iterator[str]:
    """Yield training texts; a malformed JSON line raises ``ValueError`` naming file and line."""
    for path in files:
        with open(path, encoding="utf-8", errors="strict") as f:
            if not _is_jsonl(path):
                for line in f:
                    line = line.rstrip("\n")
                    if line.strip():
                        yield line
                continue
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                for key in json_keys:
                    if key not in obj:
                        raise ValueError(f"{path}:{lineno}: missing JSON key {key!r}")
                    if not isinstance(obj[key], str):
                        raise ValueError(f"{path}:{lineno}: value of {key!r} is not a string")
                    yield obj[key]


def train_bpe_tokenizer(
    inputs: Sequence[str],
    output_dir: str,
    vocab_size: int,
    *,
    min_frequency: int = 2,
    json_keys: Sequence[str] = ("text",),
    special_tokens: Sequence[str] = (EOD_TOKEN,),
    write_gpt2_files: bool = True,
) -> dict[str, str]:
    """Train a GPT-2 style byte-level BPE and write ``tokenizer.json`` (+ ``vocab.json``/``merges.txt``).

    ``special_tokens[0]`` is the end-of-document token (written as ``eos_token`` in ``tokenizer_config.json`` so
    ``HuggingFaceTokenizer`` and ``transformers.AutoTokenizer`` both find it). Returns the paths written.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    files = expand_inputs(inputs)
    if not special_tokens:
        raise ValueError("at least one special token (the end-of-document token) is required")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_texts(files, json_keys), trainer=trainer)
    os.makedirs(output_dir, exist_ok=True)
    written = {"tokenizer.json": os.path.join(output_dir, "tokenizer.json")}
    tok.save(written["tokenizer.json"])
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": special_tokens[0],
        "unk_token": None,
        "model_max_length": 1_000_000_000,
    }
    written["tokenizer_config.json"] = os.path.join(output_dir, "tokenizer_config.json")
    with open(written["tokenizer_config.json"], "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    if write_gpt2_files:
        vocab_path, merges_path = tok.model.save(output_dir)
        written["vocab.json"], written["merges.txt"] = vocab_path, merges_path
    return written


def train_sentencepiece_tokenizer(
    inputs: Sequence[str],
    output_dir: str,
    vocab_size: int,
    *,
    model_type: str = "bpe",
    json_keys: Sequence[str] = ("text",),
    character_coverage: float = 1.0,
    byte_fallback: bool = True,
    model_name: str = "tokenizer",
) -> str:
    """Train a sentencepiece model (unk=0, bos=1, eos=2, no pad) and return the ``.model`` path.

    Normalisation is the identity and whitespace is kept, so with byte fallback ``detokenize(tokenize(t)) == t``.

    Texts are streamed to a temporary one-example-per-line file because sentencepiece trains from lines.
    """
    import sentencepiece as spm

    files = expand_inputs(inputs)
    os.makedirs(output_dir, exist_ok=True)
    prefix = os.path.join(output_dir, model_name)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False) as tmp:
        for text in iter_texts(files, json_keys):
            for line in text.splitlines():
                if line.strip():
                    tmp.write(line + "\n")
        corpus = tmp.name
    try:
        spm.SentencePieceTrainer.train(
            input=corpus,
            model_prefix=prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            hard_vocab_limit=False,
            # Lossless, GPT-style: no NFKC, keep runs of spaces; newlines/tabs fall back to byte pieces.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            minloglevel=2,
        )
    finally:
        os.remove(corpus)
    return prefix + ".model"
