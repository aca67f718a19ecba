"""Tokenize a JSONL corpus into Megatron-LM indexed datasets (``{prefix}_{key}_document.bin/.idx``).

Same outputs as Megatron-LM's ``tools/preprocess_data.py`` (readable by megatron-core and by
``megatron_hybrid.data.IndexedDataset``); the output does not depend on ``--workers``. Bad lines stop the run with
``file:line (byte offset N): reason`` unless ``--skip-bad-lines`` (then they are counted and reported at the end).

Example::

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model tok/ --append-eod --workers 8
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.append(os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_hybrid.data.preprocess import PreprocessError, preprocess_jsonl  # noqa: E402
from megatron_hybrid.tokenizers import TOKENIZER_TYPES  # noqa: E402


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (Megatron-LM names)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input data")
    g.add_argument("--input", nargs="+", required=True, help="JSONL file(s), one JSON object per line")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract (one output dataset per key)")
    g.add_argument("--skip-bad-lines", action="store_true",
                   help="skip (and count) malformed lines, missing keys and empty documents instead of failing")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", default=None, help="tokenizer.json dir/file or sentencepiece .model")
    g.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer vocab.json")
    g.add_argument("--merge-file", default=None, help="GPT2BPETokenizer merges.txt")
    g.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer vocabulary size")
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document token to every document")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    g.add_argument("--chunksize", type=int, default=32, help="lines per task sent to a worker")
    g.add_argument("--log-interval", type=int, default=1000, help="documents between progress lines (0: off)")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the conversion; exit status 1 with a located message on bad input."""
    args = get_args(argv)
    tokenizer_kwargs = {
        "tokenizer_type": args.tokenizer_type,
        "tokenizer_model": args.tokenizer_model,
        "vocab_file": args.vocab_file,
        "merge_file": args.merge_file,
        "vocab_size": args.vocab_size,
    }
    try:
        stats = preprocess_jsonl(args.input, args.output_prefix, tokenizer_kwargs, json_keys=args.json_keys,
                                 append_eod=args.append_eod, workers=args.workers, chunksize=args.chunksize,
                                 log_interval=args.log_interval, skip_bad_lines=args.skip_bad_lines)
    except (PreprocessError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    mb = stats.input_bytes / 1024**2
    print(f"Done: {stats.documents} documents, {mb:.2f} MB in {stats.seconds:.1f}s "
          f"({stats.documents / max(stats.seconds, 1e-9):.1f} docs/s).", file=sys.stderr)
    for key, prefix in stats.outputs.items():
        print(f"  {key}: {stats.tokens[key]} tokens -> {prefix}.bin/.idx", file=sys.stderr)
    if args.skip_bad_lines:
        print(f"Skipped {stats.skipped} bad line(s).", file=sys.stderr)
        for msg in stats.skipped_messages:
            print(f"  skipped {msg}", file=sys.stderr)
        if stats.skipped > len(stats.skipped_messages):
            print(f"  ... and {stats.skipped - len(stats.skipped_messages)} more", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
