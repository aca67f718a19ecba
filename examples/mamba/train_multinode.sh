#!/usr/bin/env bash
# Multi-node pretraining: run this once on EVERY node (by hand, pdsh, or srun as in train.sbatch); each node starts
# one torchrun that spawns NPROC ranks, and the nodes meet through torchrun's c10d rendezvous on MASTER_ADDR.
#
# Usage: NNODES=2 MASTER_ADDR=node0 examples/mamba/train_multinode.sh CHECKPOINT_DIR DATA_PATH TOKENIZER_PATH [flags]
#
# Environment (plus everything examples/mamba/train.sh reads: MODEL_SCALE, NPROC, PYTHON, TRITON_CACHE_DIR, ...):
#   NNODES       number of nodes (required)
#   MASTER_ADDR  host name or address of the rendezvous node, reachable from all nodes (required)
#   MASTER_PORT  rendezvous port (default 29500)
#   RDZV_ID      job id shared by all nodes (default: SLURM_JOB_ID, else "megatron_hybrid")
#
# Requirements: CHECKPOINT_DIR, the data (and its index cache next to it, or --data-cache-path) and TRITON_CACHE_DIR
# on a filesystem every node sees (checkpoints are written by all ranks and completed by global rank 0; dataset
# indices are built by rank 0 and read by the others). Per-rank Triton caches are named <host>-local_rank<N>, so
# nodes sharing TRITON_CACHE_DIR never collide. The NCCL settings below are Megatron-LM's InfiniBand defaults;
# override them for your fabric.
set -euo pipefail

: "${NNODES:?set NNODES to the number of nodes}"
: "${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_ID="${RDZV_ID:-${SLURM_JOB_ID:-megatron_hybrid}}"

export NCCL_IB_SL="${NCCL_IB_SL:-1}"
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-19}"
export NCCL_IB_QPS_PER_CONNECTION="${NCCL_IB_QPS_PER_CONNECTION:-4}"

export TORCHRUN_ARGS="--nnodes ${NNODES} --rdzv-backend c10d --rdzv-endpoint ${MASTER_ADDR}:${MASTER_PORT} --rdzv-id ${RDZV_ID}"
exec "$(dirname "${BASH_SOURCE[0]}")/train.sh" "$@"
