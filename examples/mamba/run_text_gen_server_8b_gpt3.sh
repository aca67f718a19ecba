#!/usr/bin/env bash
# Serve the 8B pure-transformer baseline with the flags of Megatron-LM's
# examples/mamba/run_text_gen_server_8b_gpt3.sh.
#
# Use: ./run_text_gen_server_8b_gpt3.sh <checkpoint-path> <tokenizer-path> [extra server args, e.g. --port 5001]
# To launch the client: python tools/text_generation_cli.py 127.0.0.1:5000
#
# Megatron's GPT layer = attention + MLP; here that is an attention layer followed by an MLP layer ("*-"), so its
# 32 transformer layers are a 64-layer pattern of 32 "*-" pairs. Rotary embeddings on half of each head
# (--rotary-percent 0.5), squared-ReLU MLPs, multi-head attention. Megatron's --apply-layernorm-1p (LayerNorm) has no
# equivalent here (RMSNorm everywhere), and --use-flash-attn / --transformer-impl are kernel choices made
# automatically. MODEL_SCALE=tiny serves a small checkpoint with its own settings (text_gen_server_common.sh).

SCRIPT_NAME="$(basename "$0")"
GPT_LAYERS=32
PATTERN=""
for ((i = 0; i < GPT_LAYERS; i++)); do PATTERN+="*-"; done
SCALE_ARGS_8B=(
    --untie-embeddings-and-output-weights
    --num-layers $((2 * GPT_LAYERS))
    --hybrid-override-pattern "${PATTERN}"
    --hidden-size 4096
    --num-attention-heads 32
    --attention-dropout 0.0
    --hidden-dropout 0.0
    --disable-bias-linear
    --normalization RMSNorm
    --seq-length 4096
    --max-position-embeddings 4096
    --position-embedding-type rope
    --rotary-percent 0.5
    --squared-relu
)
# shellcheck source=examples/mamba/text_gen_server_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/text_gen_server_common.sh"
