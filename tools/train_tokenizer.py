"""Train a tokenizer locally (no downloads).

Byte-level BPE (default) writes ``tokenizer.json`` + ``tokenizer_config.json`` (load with
``--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR``) and ``vocab.json`` + ``merges.txt`` (load with
``--tokenizer-type GPT2BPETokenizer --vocab-file DIR/vocab.json --merge-file DIR/merges.txt``).
``--type sentencepiece`` writes ``DIR/tokenizer.model`` (``--tokenizer-type GPTSentencePieceTokenizer``).

Example::

    python tools/train_tokenizer.py --input 'corpus/*.txt' data.jsonl --vocab-size 32000 --output tok/
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.append(os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_hybrid.tokenizers.training import train_bpe_tokenizer, train_sentencepiece_tokenizer  # noqa: E402


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="text files, JSONL files or glob patterns")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys read from JSONL inputs")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--type", choices=["bpe", "sentencepiece"], default="bpe")
    p.add_argument("--min-frequency", type=int, default=2, help="BPE: minimum pair frequency to merge")
    p.add_argument("--special-tokens", nargs="+", default=["<|endoftext|>"],
                   help="BPE: special tokens, the first is the end-of-document token")
    p.add_argument("--no-gpt2-files", action="store_true", help="BPE: do not write vocab.json/merges.txt")
    p.add_argument("--sp-model-type", default="bpe", choices=["bpe", "unigram", "char", "word"])
    p.add_argument("--character-coverage", type=float, default=1.0)
    p.add_argument("--no-byte-fallback", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train and report the files written."""
    args = get_args(argv)
    t0 = time.time()
    try:
        if args.type == "bpe":
            written = train_bpe_tokenizer(args.input, args.output, args.vocab_size, min_frequency=args.min_frequency,
                                          json_keys=args.json_keys, special_tokens=args.special_tokens,
                                          write_gpt2_files=not args.no_gpt2_files)
            paths = list(written.values())
        else:
            paths = [train_sentencepiece_tokenizer(args.input, args.output, args.vocab_size,
                                                   model_type=args.sp_model_type, json_keys=args.json_keys,
                                                   character_coverage=args.character_coverage,
                                                   byte_fallback=not args.no_byte_fallback)]
    except (FileNotFoundError, ValueError, UnicodeDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"trained {args.type} tokenizer in {time.time() - t0:.1f}s:", file=sys.stderr)
    for path in paths:
        print(f"  {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
