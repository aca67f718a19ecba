#!/usr/bin/env bash
# Serve the 8B Mamba-2-Hybrid model with the flags of Megatron-LM's examples/mamba/run_text_gen_server_8b.sh.
#
# Use: ./run_text_gen_server_8b.sh <checkpoint-path> <tokenizer-path> [extra server args, e.g. --port 5001]
# To launch the client: python tools/text_generation_cli.py 127.0.0.1:5000
# MODEL_SCALE=tiny serves a small checkpoint (e.g. `make demo`'s) on a CPU with the checkpoint's own settings;
# TP=4 runs tensor parallel over 4 GPUs. See text_gen_server_common.sh for every environment variable.

SCRIPT_NAME="$(basename "$0")"
# 56 layers with ~8% attention and ~50% MLP layers, GQA with 8 groups, no position embedding, 4096 context.
SCALE_ARGS_8B=(
    --untie-embeddings-and-output-weights
    --num-layers 56
    --hidden-size 4096
    --num-attention-heads 32
    --group-query-attention
    --num-query-groups 8
    --hybrid-attention-ratio 0.08
    --hybrid-mlp-ratio 0.5
    --attention-dropout 0.0
    --hidden-dropout 0.0
    --disable-bias-linear
    --normalization RMSNorm
    --seq-length 4096
    --max-position-embeddings 4096
    --position-embedding-type none
)
# shellcheck source=examples/mamba/text_gen_server_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/text_gen_server_common.sh"
