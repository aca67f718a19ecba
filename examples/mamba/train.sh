#!/usr/bin/env bash
# Pretrain a hybrid Mamba-2 / attention model: megatron_hybrid's counterpart of Megatron-LM's examples/mamba/train.sh.
#
# Usage: examples/mamba/train.sh CHECKPOINT_DIR DATA_PATH TOKENIZER_PATH [extra pretrain_mamba.py flags...]
#
#   CHECKPOINT_DIR  --save and --load directory (resumes from its latest checkpoint if there is one); the metrics
#                   (metrics.jsonl) and, with MODEL_SCALE 800M/8B, TensorBoard logs go there too
#   DATA_PATH       --data-path: an indexed-dataset prefix (tools/preprocess_data.py output, e.g.
#                   data/corpus_text_document) or a quoted blend "0.3 data/a_text_document 0.7 data/b_text_document";
#                   "mock" trains on synthetic tokens (--mock-data; throughput runs without a corpus, e.g. with
#                   TOKENIZER_TYPE=NullTokenizer and an extra --vocab-size 256000)
#   TOKENIZER_PATH  --tokenizer-model: a sentencepiece .model (GPTSentencePieceTokenizer) or a tokenizer.json /
#                   its directory (HuggingFaceTokenizer); the type is inferred, or set TOKENIZER_TYPE
#   extra flags     appended last, so they override the defaults below (e.g. --train-iters 20 --log-interval 1)
#
# Environment:
#   MODEL_SCALE   tiny (default: the "tiny" preset, 8 layers / hidden 256, tied embeddings; runs on a laptop CPU)
#                 | 800M | 8B (Megatron-LM's example exactly: 48 layers / hidden 1024 / 16 heads, or 56 layers / hidden 4096 / 32 heads with TP 4;
#                 8 query groups, attention ratio 0.08, MLP ratio 0.5, sequence 4096, lr 2.5e-4 -> 2.5e-5 cosine,
#                 weight decay 0.1, clip 1.0, betas 0.9 / 0.95, untied embeddings, no position embedding)
#   NPROC         processes (GPUs) per node; default: the number of visible GPUs, or 1 without any
#   HAS_GPU       1 adds --bf16 (default: 1 when torch sees a GPU)
#   PYTHON        interpreter (default: the repository's .venv if present, else python3)
#   TORCHRUN_ARGS rendezvous arguments for torchrun (default --standalone; train_multinode.sh sets multi-node ones)
#   DRY_RUN=1     print the pretrain_mamba.py arguments (one per line) instead of launching
#   TRITON_CACHE_DIR  base of the Triton kernel cache (default ./triton-cache); every rank compiles into its own
#                 sub-directory <host>-local_rank<N> (megatron_hybrid/training/triton_cache.py), so ranks never race
#                 on one cache entry (this replaces Megatron's TRITON_CACHE_MANAGER=ParallelFileCacheManager)
#
# When the extra flags contain --train-iters, the sample-based schedule of the 800M / 8B recipes (--train-samples,
# --lr-warmup-samples, --lr-decay-samples) is left out so the two do not contradict each other.
set -euo pipefail

if [[ $# -lt 3 ]]; then
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
fi

CHECKPOINT_DIR=$1
DATA_PATH=$2
TOKENIZER_PATH=$3
shift 3
EXTRA_ARGS=("$@")

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/../.." && pwd)"
MODEL_SCALE="${MODEL_SCALE:-tiny}"

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "${REPO_ROOT}/.venv/bin/python" ]]; then PYTHON="${REPO_ROOT}/.venv/bin/python"; else PYTHON=python3; fi
fi

if [[ -z "${TOKENIZER_TYPE:-}" ]]; then
    if [[ "${TOKENIZER_PATH}" == *.model ]]; then
        TOKENIZER_TYPE=GPTSentencePieceTokenizer
    else
        TOKENIZER_TYPE=HuggingFaceTokenizer
    fi
fi

if [[ -z "${NPROC:-}" || -z "${HAS_GPU:-}" ]]; then
    GPUS="$("${PYTHON}" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
    [[ "${GPUS}" =~ ^[0-9]+$ ]] || GPUS=0
    HAS_GPU="${HAS_GPU:-$(( GPUS > 0 ? 1 : 0 ))}"
    NPROC="${NPROC:-$(( GPUS > 0 ? GPUS : 1 ))}"
fi

export CUDA_DEVICE_MAX_CONNECTIONS=1  # kernel issue order = launch order, as Megatron's TP/SP overlap expects
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-${PWD}/triton-cache}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"

USER_SETS_ITERS=0
for arg in "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}"; do
    [[ "${arg}" == "--train-iters" || "${arg}" == --train-iters=* ]] && USER_SETS_ITERS=1
done

case "${MODEL_SCALE}" in
    tiny)
        TENSOR_MODEL_PARALLEL_SIZE=1
        MODEL_ARGS=(
            --num-layers 8 --hidden-size 256 --num-attention-heads 8
            --group-query-attention --num-query-groups 4
            --hybrid-attention-ratio 0.25 --hybrid-mlp-ratio 0.25
            --ffn-hidden-size 1024 --squared-relu
            --mamba-state-dim 64 --mamba-head-dim 64 --mamba-num-groups 2 --mamba-chunk-size 64
        )
        SEQ_LEN=256
        TRAIN_ARGS=(
            --micro-batch-size 8 --global-batch-size 8 --train-iters 1000
            --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 20
        )
        LOG_ARGS=(--log-interval 10 --save-interval 200 --eval-interval 200 --eval-iters 4 --split "98,2,0")
        ;;
    800M|8B)
        if [[ "${MODEL_SCALE}" == 800M ]]; then
            TENSOR_MODEL_PARALLEL_SIZE=1; NUM_LAYERS=48; HIDDEN_SIZE=1024; NUM_ATTENTION_HEADS=16
            GLOBAL_BATCH_SIZE=32
        else
            TENSOR_MODEL_PARALLEL_SIZE=4; NUM_LAYERS=56; HIDDEN_SIZE=4096; NUM_ATTENTION_HEADS=32
            GLOBAL_BATCH_SIZE=8
        fi
        MODEL_ARGS=(
            --num-layers "${NUM_LAYERS}" --hidden-size "${HIDDEN_SIZE}" --num-attention-heads "${NUM_ATTENTION_HEADS}"
            --group-query-attention --num-query-groups 8
            --hybrid-attention-ratio 0.08 --hybrid-mlp-ratio 0.5
            --untie-embeddings-and-output-weights
        )
        SEQ_LEN=4096
        TRAIN_SAMPLES=73242188      # 300B tokens / 4096
        LR_WARMUP_SAMPLES=50000
        LR_DECAY_SAMPLES=73192188   # TRAIN_SAMPLES - LR_WARMUP_SAMPLES
        TRAIN_ARGS=(
            --micro-batch-size 4 --global-batch-size "${GLOBAL_BATCH_SIZE}"
            --lr 2.5e-4 --min-lr 2.5e-5 --lr-decay-style cosine
        )
        if [[ "${USER_SETS_ITERS}" == 0 ]]; then
            TRAIN_ARGS+=(--train-samples "${TRAIN_SAMPLES}" --lr-warmup-samples "${LR_WARMUP_SAMPLES}"
                         --lr-decay-samples "${LR_DECAY_SAMPLES}")
        fi
        LOG_ARGS=(
            --log-interval 10 --save-interval 2000 --eval-interval 2000 --eval-iters 32 --split "99,1,0"
            --tensorboard-dir "${CHECKPOINT_DIR}/tensorboard"
            --sequence-parallel --use-distributed-optimizer
        )
        ;;
    *)
        echo "train.sh: invalid MODEL_SCALE '${MODEL_SCALE}' (expected tiny, 800M or 8B)" >&2
        exit 2
        ;;
esac

PRECISION_ARGS=()
[[ "${HAS_GPU}" == 1 ]] && PRECISION_ARGS=(--bf16)

if [[ "${DATA_PATH}" == mock ]]; then
    DATA_ARGS=(--mock-data)
else
    # shellcheck disable=SC2206  # DATA_PATH may be a blend: "w1 prefix1 w2 prefix2" splits into words on purpose
    DATA_ARGS=(--data-path ${DATA_PATH})
fi

OPTIONS=(
    --tensor-model-parallel-size "${TENSOR_MODEL_PARALLEL_SIZE}"
    --pipeline-model-parallel-size 1
    "${MODEL_ARGS[@]}"
    --init-method-std 0.02
    --position-embedding-type none
    --seq-length "${SEQ_LEN}"
    --max-position-embeddings "${SEQ_LEN}"
    "${TRAIN_ARGS[@]}"
    --save "${CHECKPOINT_DIR}"
    --load "${CHECKPOINT_DIR}"
    "${DATA_ARGS[@]}"
    --tokenizer-type "${TOKENIZER_TYPE}"
    --tokenizer-model "${TOKENIZER_PATH}"
    --weight-decay 0.1
    --clip-grad 1.0
    --attention-dropout 0.0
    --hidden-dropout 0.0
    --disable-bias-linear
    --normalization RMSNorm
    --adam-beta1 0.9
    --adam-beta2 0.95
    "${LOG_ARGS[@]}"
    "${PRECISION_ARGS[@]+"${PRECISION_ARGS[@]}"}"
)

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%s\n' "${OPTIONS[@]}" "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}"
    exit 0
fi
mkdir -p "${CHECKPOINT_DIR}" "${TRITON_CACHE_DIR}"
read -r -a TORCHRUN_RDZV <<< "${TORCHRUN_ARGS:---standalone}"
echo "train.sh: MODEL_SCALE=${MODEL_SCALE} NPROC=${NPROC} TRITON_CACHE_DIR=${TRITON_CACHE_DIR} (per-rank subdirs)"
exec "${PYTHON}" -m torch.distributed.run "${TORCHRUN_RDZV[@]}" --nproc_per_node "${NPROC}" \
    "${REPO_ROOT}/pretrain_mamba.py" "${OPTIONS[@]}" "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}"
