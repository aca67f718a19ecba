#!/usr/bin/env bash
# Build .gpu_carry/: everything benchmarks/gpu_train_800m.sh needs on a lent GPU machine that has no network.
#
# Usage (on a development machine with network access to the package index):
#   bash benchmarks/prepare_gpu_carry.sh [CARRY_DIR]            (default: .gpu_carry in the repository root)
#
# What it writes (about 15 MB; the folder is git-ignored and travels to the device as a carried path):
#   data/stdlib.jsonl is NOT kept (only its manifest): the Python standard library's own source, built with the
#       demo's corpus code (megatron_hybrid.demo.build_corpus: every .py under the stdlib minus tests,
#       site-packages and generated tables, one JSON line per file, sorted), i.e. the corpus `make demo` trains on;
#   tokenizer/tokenizer.model   a GPTSentencePiece (sentencepiece BPE) model trained on that corpus by
#       tools/train_tokenizer.py --type sentencepiece (VOCAB entries, default 32000; byte fallback, lossless);
#   data/stdlib_text_document.bin/.idx   tools/preprocess_data.py output with that tokenizer, --append-eod;
#   wheels/   CPython 3.12 manylinux x86_64 wheels of the run-time packages a bare torch + transformers image may
#       lack (sentencepiece, einops); gpu_train_800m.sh installs only those that do not import there;
#   MANIFEST.json   corpus / tokenizer / dataset statistics and file sizes.
#
# Environment: PYTHON (default .venv/bin/python), VOCAB (default 32000), WORKERS (default 2),
#              WHEEL_PYTHON_VERSION (default 3.12), WHEEL_PLATFORM (default manylinux2014_x86_64).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"
CARRY="$(mkdir -p "${1:-${REPO_ROOT}/.gpu_carry}" && cd "${1:-${REPO_ROOT}/.gpu_carry}" && pwd)"
PYTHON="${PYTHON:-${REPO_ROOT}/.venv/bin/python}"
VOCAB="${VOCAB:-32000}"
WORKERS="${WORKERS:-2}"
WHEEL_PYTHON_VERSION="${WHEEL_PYTHON_VERSION:-3.12}"
WHEEL_PLATFORM="${WHEEL_PLATFORM:-manylinux2014_x86_64}"
export TOKENIZERS_PARALLELISM=false

mkdir -p "${CARRY}/data" "${CARRY}/tokenizer" "${CARRY}/wheels"
SCRATCH="$(mktemp -d)"
trap 'rm -rf "${SCRATCH}"' EXIT

echo "== corpus: the Python standard library source (megatron_hybrid.demo.build_corpus)"
cd "${REPO_ROOT}"
"${PYTHON}" - "${SCRATCH}/stdlib.jsonl" "${CARRY}/data/corpus_manifest.json" <<'EOF'
import json, sys
from megatron_hybrid.demo import build_corpus
manifest = build_corpus(sys.argv[1])
with open(sys.argv[2], "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1)
print(f"{manifest['documents']} files, {manifest['text_bytes'] / 1e6:.1f} MB of Python {manifest['python']} source")
EOF

echo "== tokenizer: sentencepiece BPE, ${VOCAB} entries (tools/train_tokenizer.py)"
rm -rf "${CARRY}/tokenizer"
"${PYTHON}" tools/train_tokenizer.py --type sentencepiece --input "${SCRATCH}/stdlib.jsonl" \
    --vocab-size "${VOCAB}" --output "${CARRY}/tokenizer"

echo "== indexed dataset (tools/preprocess_data.py --append-eod)"
rm -f "${CARRY}/data/stdlib_text_document".{bin,idx}
"${PYTHON}" tools/preprocess_data.py --input "${SCRATCH}/stdlib.jsonl" --output-prefix "${CARRY}/data/stdlib" \
    --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model "${CARRY}/tokenizer/tokenizer.model" \
    --append-eod --workers "${WORKERS}" --log-interval 0

echo "== wheels for CPython ${WHEEL_PYTHON_VERSION} ${WHEEL_PLATFORM}"
rm -f "${CARRY}/wheels/"*.whl
"${PYTHON}" -m pip download --quiet --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON_VERSION}" \
    --platform "${WHEEL_PLATFORM}" --implementation cp -d "${CARRY}/wheels" sentencepiece einops

"${PYTHON}" - "${CARRY}" "${VOCAB}" <<'EOF'
import json, os, sys
from megatron_hybrid.data.indexed_dataset import IndexedDataset
from megatron_hybrid.tokenizers import build_tokenizer
carry, vocab = sys.argv[1], int(sys.argv[2])
tok = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=os.path.join(carry, "tokenizer", "tokenizer.model"),
                      make_vocab_size_divisible_by=256000)
ds = IndexedDataset(os.path.join(carry, "data", "stdlib_text_document"))
tokens = int(ds.index.sequence_lengths.sum())
files = {os.path.relpath(os.path.join(d, f), carry): os.path.getsize(os.path.join(d, f))
         for d, _, fs in os.walk(carry) for f in fs}
manifest = {"tokenizer_vocab_requested": vocab, "tokenizer_vocab": tok.vocab_size, "eod": tok.eod,
            "padded_vocab_with_divisor_256000": tok.padded_vocab_size, "documents": len(ds), "tokens": tokens,
            "corpus": json.load(open(os.path.join(carry, "data", "corpus_manifest.json")))["python"],
            "files": files, "total_bytes": sum(files.values())}
with open(os.path.join(carry, "MANIFEST.json"), "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1)
print(json.dumps({k: v for k, v in manifest.items() if k != "files"}))
EOF
du -sh "${CARRY}"
