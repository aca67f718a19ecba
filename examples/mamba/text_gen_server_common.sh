# shellcheck shell=bash
# Shared part of run_text_gen_server_8b.sh and run_text_gen_server_8b_gpt3.sh (sourced, not run).
#
# The caller sets SCALE_ARGS_8B (its 8B model flags, Megatron names) and SCRIPT_NAME, then sources this file with the
# script's arguments: CHECKPOINT TOKENIZER [extra server arguments...]. Environment:
#   MODEL_SCALE     8B (default): the 8B flags below, bf16. tiny: the model settings come from the checkpoint
#                   (--use-checkpoint-args), float32, so the tiny checkpoint of `make demo` serves on a CPU.
#   TP              tensor-parallel size (default 1). TP > 1 launches torchrun --nproc_per_node TP (rank 0 serves).
#   TOKENIZER_TYPE  default: GPTSentencePieceTokenizer for a .model file, HuggingFaceTokenizer for a directory or a
#                   .json file; with an empty TOKENIZER argument the checkpoint's tokenizer settings are used.
#   PYTHON          interpreter (default: the repository's .venv/bin/python when present, else python3).
#   MASTER_PORT     torchrun rendezvous port (default 29500).
#   DRY_RUN=1       print the command, one argument per line, instead of running it.
# CHECKPOINT is a training checkpoint directory (--load) or a transformers NemotronH directory (--hf-model: it has a
# config.json and neither latest_checkpointed_iteration.txt nor metadata.json). Extra arguments go to tools/run_text_generation_server.py
# last, so they override the defaults here (e.g. --port 5001, --host 0.0.0.0, --inference-max-batch-size 32).

set -euo pipefail

usage() {
    echo "Use: ${SCRIPT_NAME} <checkpoint-path> <tokenizer-path> [extra server args, e.g. --port 5001]" >&2
    echo "     MODEL_SCALE=tiny ${SCRIPT_NAME} checkpoints/tiny '' --port 5001   # model settings from the checkpoint" >&2
    echo "To launch the client: python tools/text_generation_cli.py 127.0.0.1:<port>" >&2
}

if [[ $# -lt 2 ]]; then
    usage
    exit 2
fi
CHECKPOINT_PATH=$1
TOKENIZER_PATH=$2
shift 2

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "${REPO_ROOT}/.venv/bin/python" ]]; then PYTHON="${REPO_ROOT}/.venv/bin/python"; else PYTHON=python3; fi
fi
MODEL_SCALE="${MODEL_SCALE:-8B}"
TP="${TP:-1}"

if [[ ! -e "${CHECKPOINT_PATH}" ]]; then
    echo "${SCRIPT_NAME}: checkpoint '${CHECKPOINT_PATH}' does not exist" >&2
    exit 2
fi
if [[ -f "${CHECKPOINT_PATH}/config.json" && ! -e "${CHECKPOINT_PATH}/latest_checkpointed_iteration.txt"
      && ! -e "${CHECKPOINT_PATH}/metadata.json" ]]; then
    SOURCE_ARGS=(--hf-model "${CHECKPOINT_PATH}")
else
    SOURCE_ARGS=(--load "${CHECKPOINT_PATH}")
fi

TOKENIZER_ARGS=()
if [[ -n "${TOKENIZER_PATH}" ]]; then
    if [[ -z "${TOKENIZER_TYPE:-}" ]]; then
        case "${TOKENIZER_PATH}" in
            *.model) TOKENIZER_TYPE=GPTSentencePieceTokenizer ;;
            *) TOKENIZER_TYPE=HuggingFaceTokenizer ;;
        esac
    fi
    TOKENIZER_ARGS=(--tokenizer-type "${TOKENIZER_TYPE}" --tokenizer-model "${TOKENIZER_PATH}")
elif [[ -n "${TOKENIZER_TYPE:-}" ]]; then
    TOKENIZER_ARGS=(--tokenizer-type "${TOKENIZER_TYPE}")
fi

case "${MODEL_SCALE}" in
    8B|8b)
        MODEL_ARGS=("${SCALE_ARGS_8B[@]}" --bf16)
        ;;
    tiny)
        MODEL_ARGS=(--use-checkpoint-args)
        ;;
    *)
        echo "${SCRIPT_NAME}: MODEL_SCALE must be 8B or tiny, got '${MODEL_SCALE}'" >&2
        exit 2
        ;;
esac

# The environment of Megatron-LM's example (NCCL over InfiniBand, one CUDA work queue for overlap) and a Triton
# cache per user (the kernels compile on first use).
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
export NCCL_IB_SL="${NCCL_IB_SL:-1}"
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-19}"
export NCCL_IB_QPS_PER_CONNECTION="${NCCL_IB_QPS_PER_CONNECTION:-4}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/megatron_hybrid/triton}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"

if [[ "${TP}" -gt 1 ]]; then
    LAUNCHER=("${PYTHON}" -m torch.distributed.run --nproc_per_node "${TP}" --nnodes 1 --node_rank 0
              --master_addr localhost --master_port "${MASTER_PORT:-29500}")
    BACKEND=nccl
    "${PYTHON}" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || BACKEND=gloo
else
    # One process needs no launcher (torchrun would only add its start-up time and signal forwarding).
    LAUNCHER=("${PYTHON}")
    BACKEND=gloo
fi

CMD=("${LAUNCHER[@]}" "${REPO_ROOT}/tools/run_text_generation_server.py"
    "${SOURCE_ARGS[@]}"
    --tensor-model-parallel-size "${TP}"
    --pipeline-model-parallel-size 1
    "${MODEL_ARGS[@]}"
    "${TOKENIZER_ARGS[@]}"
    --distributed-backend "${BACKEND}"
    --distributed-timeout-minutes 1440
    --micro-batch-size 1
    --seed 42
    "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%s\n' "${CMD[@]}"  # one argument per line (tests parse it)
    exit 0
fi
exec "${CMD[@]}"
