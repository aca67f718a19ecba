#!/usr/bin/env bash
# Issue 3's GPU acceptance run: MODEL_SCALE=800M through examples/mamba/train.sh on real data, then the transformers
# NemotronH peer at the same shape on the same GPU, one JSON summary. Made for one command on a lent GPU machine
# (no network) that has torch with CUDA, triton and transformers; everything else comes from carried folders.
#
# Usage (repository root; one GPU):
#   bash benchmarks/gpu_train_800m.sh
#
# Needs (built beforehand with `bash benchmarks/prepare_gpu_carry.sh`, carried as ignored folders):
#   .gpu_carry/data/stdlib_text_document.bin/.idx   the Python standard library's source (the `make demo` corpus),
#                 tokenized with .gpu_carry/tokenizer/tokenizer.model (GPTSentencePiece, 32000 entries, EOD appended)
#   .gpu_carry/wheels/*.whl   sentencepiece / einops for CPython 3.12; installed into $WORK/site only if not importable
#   .whl_lead/mamba_ssm-*.whl a mamba_ssm wheel without CUDA extensions (its Triton kernels); installed the same way
#                 unless mamba_ssm is already importable (e.g. from a PYTHONPATH the caller set)
#
# What it does:
#   1. the kernels each op will use on CUDA (megatron_hybrid.ops.kernel_backend_info) -> $OUT/kernels.json;
#   2. examples/mamba/train.sh with MODEL_SCALE=800M (48 layers, hidden 1024, 16 heads / 8 query groups, attention
#      ratio 0.08, MLP ratio 0.5, untied, sequence 4096, lr 2.5e-4 cosine, bf16) plus, appended last so they win:
#      --train-iters $TRAIN_ITERS, micro = global batch $MICRO_BATCH (one optimizer step per micro batch, like the
#      peer), --log-interval 1 (one metrics line per iteration), --eval-iters 0 (no validation), --save "" and
#      --load "" (no checkpoint: an 800M checkpoint with Adam states is ~11 GB of writes that measure nothing),
#      --make-vocab-size-divisible-by 256000 (the 32000-entry tokenizer padded to 256000 rows, the peers' vocabulary:
#      the output layer and its FLOPs are those of the 800M recipe's 256000-entry Nemotron tokenizer), and, with
#      SAME_AS_PEER=1 (default), --squared-relu --mamba-dt-limit 0.001 inf so the network is exactly transformers'
#      NemotronH (relu2 MLP, dt clamped at time_step_min) rather than Megatron's GeLU default; metrics go to
#      $OUT/metrics.jsonl, the log to $OUT/train.log;
#   3. benchmarks/gpu_peer_nemotronh_train.py: transformers NemotronH with mamba_ssm's kernels, same architecture,
#      micro-batch sizes $PEER_BATCHES (an OOM is recorded, not fatal) -> $OUT/peer_nemotronh.json;
#   4. benchmarks/gpu_train_800m_summary.py -> $OUT/gpu_train_800m.json: median tokens/s, ms/iteration, model TFLOP/s
#      and MFU over iterations 5..$TRAIN_ITERS (the first ones compile and autotune Triton kernels), peak memory,
#      first / last loss, and our tokens/s over the peer's for each of its batch sizes. TFLOP/s on both sides use
#      training/flops.py's closed form; MFU is against its dense bf16 peak table (989.4 TFLOP/s for H100 SXM / H200).
#      The summary is written after step 2 already, so a later failure still leaves it.
#
# Environment: OUT (default /tmp/gpu_train_800m_out), WORK (scratch, default /tmp/gpu_train_800m), CARRY (default
#   .gpu_carry), MAMBA_WHEELS (default .whl_lead), PYTHON (default: python3, or python, whichever imports torch),
#   TRAIN_ITERS (25), MICRO_BATCH (4), PEER_BATCHES (2,4; empty = no peer), SAME_AS_PEER (1), TRAIN_TIMEOUT (330 s),
#   PEER_TIMEOUT (210 s), DRY_RUN=1 (print train.sh's pretrain_mamba.py arguments and stop), EXTRA_TRAIN_ARGS
#   (more pretrain_mamba.py flags, appended last; word-split), PEER_EXTRA_ARGS (more gpu_peer_nemotronh_train.py flags,
#   word-split; e.g. "--tiny --device cpu --no-kernels" to smoke-test this script on a CPU).
# Exit status: 0 when the training run produced its metrics, 1 otherwise (the peer's failures are only reported).
set -uo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"
cd "${REPO_ROOT}" || exit 1

OUT="${OUT:-/tmp/gpu_train_800m_out}"
WORK="${WORK:-/tmp/gpu_train_800m}"
CARRY="${CARRY:-${REPO_ROOT}/.gpu_carry}"
MAMBA_WHEELS="${MAMBA_WHEELS:-${REPO_ROOT}/.whl_lead}"
TRAIN_ITERS="${TRAIN_ITERS:-25}"
MICRO_BATCH="${MICRO_BATCH:-4}"
PEER_BATCHES="${PEER_BATCHES-2,4}"
SAME_AS_PEER="${SAME_AS_PEER:-1}"
TRAIN_TIMEOUT="${TRAIN_TIMEOUT:-330}"
PEER_TIMEOUT="${PEER_TIMEOUT:-210}"
SEQ_LEN="${SEQ_LEN:-4096}"  # train.sh's 800M sequence length; a smaller one only for CPU smoke tests
mkdir -p "${OUT}" "${WORK}/site"

if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    for candidate in python3 python; do
        if command -v "${candidate}" >/dev/null 2>&1 && "${candidate}" -c 'import torch' >/dev/null 2>&1; then
            PYTHON="$(command -v "${candidate}")"
            break
        fi
    done
fi
export PYTHONPATH="${WORK}/site:${REPO_ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
export TOKENIZERS_PARALLELISM=false
log() { echo "[gpu_train_800m $(date +%H:%M:%S)] $*"; }

DATA_PREFIX="${CARRY}/data/stdlib_text_document"
TOKENIZER="${CARRY}/tokenizer/tokenizer.model"
TRAIN_ARGS=(
    --train-iters "${TRAIN_ITERS}" --micro-batch-size "${MICRO_BATCH}" --global-batch-size "${MICRO_BATCH}"
    --seq-length "${SEQ_LEN}" --max-position-embeddings "${SEQ_LEN}"
    --log-interval 1 --eval-iters 0 --save "" --load "" --tensorboard-dir ""
    --metrics-jsonl "${OUT}/metrics.jsonl" --data-cache-path "${WORK}/data_cache"
    --make-vocab-size-divisible-by 256000
)
[[ "${SAME_AS_PEER}" == 1 ]] && TRAIN_ARGS+=(--squared-relu --mamba-dt-limit 0.001 inf)
read -r -a EXTRA_TRAIN <<< "${EXTRA_TRAIN_ARGS:-}"
TRAIN_ARGS+=(${EXTRA_TRAIN[@]+"${EXTRA_TRAIN[@]}"})

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    MODEL_SCALE=800M PYTHON="${PYTHON}" HAS_GPU="${HAS_GPU:-1}" NPROC="${NPROC:-1}" DRY_RUN=1 \
        bash examples/mamba/train.sh "${WORK}/unused" "${DATA_PREFIX}" "${TOKENIZER}" "${TRAIN_ARGS[@]}"
    exit $?
fi

# --- 0. carried wheels: install what does not import (pip, else a plain unzip: a wheel is a zip of site-packages)
install_if_missing() {  # MODULE WHEEL_GLOB
    local module=$1 pattern=$2 wheel
    if "${PYTHON}" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('${module}') is None)" \
            2>/dev/null; then
        log "${module}: already importable"
        return 0
    fi
    wheel="$(compgen -G "${pattern}" | head -n 1)"
    if [[ -z "${wheel}" ]]; then
        log "${module}: not importable and no wheel matches ${pattern}"
        return 1
    fi
    if "${PYTHON}" -m pip install --quiet --no-deps --no-index --target "${WORK}/site" "${wheel}" >/dev/null 2>&1; then
        log "${module}: installed ${wheel##*/} into ${WORK}/site (pip)"
    else
        "${PYTHON}" -m zipfile -e "${wheel}" "${WORK}/site" && log "${module}: unpacked ${wheel##*/} into ${WORK}/site"
    fi
}
install_if_missing sentencepiece "${CARRY}/wheels/sentencepiece-*.whl"
install_if_missing einops "${CARRY}/wheels/einops-*.whl"
install_if_missing mamba_ssm "${MAMBA_WHEELS}/mamba_ssm-*.whl"

for f in "${DATA_PREFIX}.bin" "${DATA_PREFIX}.idx" "${TOKENIZER}"; do
    [[ -f "${f}" ]] || { log "missing ${f}: run benchmarks/prepare_gpu_carry.sh and carry .gpu_carry"; exit 1; }
done

# --- 1. which kernels will run
"${PYTHON}" - "${OUT}/kernels.json" <<'EOF'
import json, sys
import torch
from megatron_hybrid.ops.backend import kernel_backend_info
info = kernel_backend_info()
info["torch"] = torch.__version__
info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
try:
    import triton
    info["triton"] = triton.__version__
except Exception as exc:  # noqa: BLE001
    info["triton"] = f"unavailable: {exc}"
try:
    import transformers
    info["transformers"] = transformers.__version__
except Exception as exc:  # noqa: BLE001
    info["transformers"] = f"unavailable: {exc}"
with open(sys.argv[1], "w") as f:
    json.dump(info, f, indent=1)
print(json.dumps(info))
EOF

summarise() {
    local peer_args=()
    [[ -f "${OUT}/peer_nemotronh.json" ]] && peer_args=(--peer "${OUT}/peer_nemotronh.json")
    "${PYTHON}" benchmarks/gpu_train_800m_summary.py --metrics "${OUT}/metrics.jsonl" --kernels "${OUT}/kernels.json" \
        --train-log "${OUT}/train.log" \
        --from 5 --to "${TRAIN_ITERS}" --tokens-per-iteration $((MICRO_BATCH * SEQ_LEN)) ${peer_args[@]+"${peer_args[@]}"} \
        --extra "model_scale=800M" "micro_batch=${MICRO_BATCH}" "global_batch=${MICRO_BATCH}" "seq_length=${SEQ_LEN}" \
        "train_iters=${TRAIN_ITERS}" "data=${DATA_PREFIX##*/} (Python stdlib source, sentencepiece 32000)" \
        "same_as_peer=${SAME_AS_PEER}" "train_rc=${TRAIN_RC:-}" "train_s=${TRAIN_S:-}" \
        "peer_rc=${PEER_RC:-}" "peer_s=${PEER_S:-}" \
        --out "${OUT}/gpu_train_800m.json"
}

# --- 2. our training run
rm -f "${OUT}/metrics.jsonl"
log "training: MODEL_SCALE=800M, ${TRAIN_ITERS} iterations of ${MICRO_BATCH} x ${SEQ_LEN} tokens (limit ${TRAIN_TIMEOUT}s)"
T0=$SECONDS
MODEL_SCALE=800M PYTHON="${PYTHON}" TRITON_CACHE_DIR="${WORK}/triton-cache" \
    timeout --kill-after=20 "${TRAIN_TIMEOUT}" \
    bash examples/mamba/train.sh "${WORK}/checkpoints" "${DATA_PREFIX}" "${TOKENIZER}" "${TRAIN_ARGS[@]}" \
    > "${OUT}/train.log" 2>&1
TRAIN_RC=$?
TRAIN_S=$((SECONDS - T0))
grep -E "padded|vocab|pattern|parameters|iteration +(1|5|10|15|20|25)/|error|Error|Warning|warning" "${OUT}/train.log" \
    | head -n 60
tail -n 5 "${OUT}/train.log"
log "training exited ${TRAIN_RC} after ${TRAIN_S}s"
summarise > /dev/null

# --- 3. the peer
if [[ -n "${PEER_BATCHES}" ]]; then
    log "peer: transformers NemotronH, micro-batches ${PEER_BATCHES} (limit ${PEER_TIMEOUT}s)"
    read -r -a PEER_EXTRA <<< "${PEER_EXTRA_ARGS:-}"
    T0=$SECONDS
    # the Triton kernels our rank 0 compiled (same mamba_ssm kernels): reused, so the peer is not charged compiling
    HOST="$("${PYTHON}" -c 'import socket; print(socket.gethostname())')"
    TRITON_CACHE_DIR="${WORK}/triton-cache/${HOST}-local_rank0" \
        timeout --kill-after=20 "${PEER_TIMEOUT}" \
        "${PYTHON}" benchmarks/gpu_peer_nemotronh_train.py --batches "${PEER_BATCHES}" --seq "${SEQ_LEN}" \
        --out "${OUT}/peer_nemotronh.json" ${PEER_EXTRA[@]+"${PEER_EXTRA[@]}"} > "${OUT}/peer.log" 2>&1
    PEER_RC=$?
    PEER_S=$((SECONDS - T0))
    grep -E "^b[0-9]+ |error|Error" "${OUT}/peer.log" | head -n 20
    log "peer exited ${PEER_RC} after ${PEER_S}s"
fi

# --- 4. summary
summarise
[[ -s "${OUT}/metrics.jsonl" ]]
