"""Named model configurations.

``PRESETS[name]()`` returns a FRESH :class:`HybridConfig` (configs are mutable dataclasses; a shared instance would
leak one caller's edits into another's). ``get_preset(name, **overrides)`` applies field overrides on top.

* ``"800M"`` and ``"8B"``: the two scales of Megatron-LM's ``examples/mamba/train.sh`` (the Mamba-2-Hybrid recipe):
  48 layers / hidden 1024 / 16 heads and 56 layers / hidden 4096 / 32 heads, both with 8 query groups (GQA),
  ``--hybrid-attention-ratio 0.08 --hybrid-mlp-ratio 0.5``, untied embeddings, no position embedding, no linear
  biases, RMSNorm, init std 0.02, sequence length 4096 (``max_position_embeddings``). The script sets no FFN size, no
  activation and no Mamba dimensions, so Megatron's defaults apply and are written out here: ``ffn = 4 * hidden``,
  GeLU, Mamba state 128, head dim 64, 8 groups, expand 2 (``heads = 2 * hidden / 64``), conv kernel 4, chunk 128.
  The tokenizer is the GPTSentencePiece (Nemotron) model with 256000 entries, padded like Megatron to a multiple of
  ``128 * tensor_parallel_size`` with the script's TP sizes (1 for 800M, 4 for 8B); 256000 is already a multiple of
  both. The script's parallelism (``--sequence-parallel``, TP) and ``--bf16`` are run settings, not model
  hyper-parameters, and are left at the HybridConfig defaults.
* ``"tiny"``: an 8-layer, hidden-256 model for smoke tests and laptop runs (pattern ``MM*-M*M-``).
* ``"cpu-bench"``: the model of the CPU training-throughput benchmark, pattern ``M-*-M-M-*-M-``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from megatron_hybrid.config import HybridConfig

__all__ = ["NEMOTRON_SENTENCEPIECE_VOCAB", "PRESETS", "get_preset"]

NEMOTRON_SENTENCEPIECE_VOCAB = 256000
"""Entries of the GPTSentencePiece (Nemotron) tokenizer model that train.sh's ``--tokenizer-model`` points at."""

_TRAIN_SH_SEQ_LENGTH = 4096
_MEGATRON_VOCAB_MULTIPLE = 128  # Megatron's --make-vocab-size-divisible-by default, multiplied by the TP size


def _megatron_mamba_example(num_layers: int, hidden_size: int, num_attention_heads: int, tp: int) -> HybridConfig:
    """A scale of Megatron-LM's examples/mamba/train.sh, with the Megatron defaults it relies on made explicit."""
    return HybridConfig(
        num_layers=num_layers,
        hidden_size=hidden_size,
        vocab_size=NEMOTRON_SENTENCEPIECE_VOCAB,
        hybrid_attention_ratio=0.08,
        hybrid_mlp_ratio=0.5,
        num_attention_heads=num_attention_heads,
        num_query_groups=8,
        position_embedding_type="none",
        max_position_embeddings=_TRAIN_SH_SEQ_LENGTH,
        ffn_hidden_size=4 * hidden_size,
        activation="gelu",
        add_bias_linear=False,
        mamba_state_dim=128,
        mamba_head_dim=64,
        mamba_num_groups=8,
        mamba_expand=2,
        mamba_conv_kernel=4,
        mamba_chunk_size=128,
        untie_embeddings_and_output_weights=True,
        make_vocab_size_divisible_by=_MEGATRON_VOCAB_MULTIPLE * tp,
        init_method_std=0.02,
    )


def _preset_800m() -> HybridConfig:
    return _megatron_mamba_example(num_layers=48, hidden_size=1024, num_attention_heads=16, tp=1)


def _preset_8b() -> HybridConfig:
    return _megatron_mamba_example(num_layers=56, hidden_size=4096, num_attention_heads=32, tp=4)


def _preset_tiny() -> HybridConfig:
    return HybridConfig(
        num_layers=8,
        hidden_size=256,
        vocab_size=8192,  # a placeholder: training replaces it with the tokenizer's vocabulary size
        hybrid_attention_ratio=0.25,
        hybrid_mlp_ratio=0.25,
        num_attention_heads=8,
        num_query_groups=4,
        ffn_hidden_size=1024,
        mamba_state_dim=64,
        mamba_head_dim=64,
        mamba_num_groups=2,
        mamba_chunk_size=64,
    )


def _preset_cpu_bench() -> HybridConfig:
    return HybridConfig(
        num_layers=12,
        hidden_size=256,
        vocab_size=8192,
        hybrid_override_pattern="M-*-M-M-*-M-",
        num_attention_heads=8,
        num_query_groups=4,
        kv_channels=32,
        ffn_hidden_size=1024,
        activation="squared_relu",
        mamba_num_heads=8,
        mamba_head_dim=64,
        mamba_state_dim=64,
        mamba_num_groups=2,
        mamba_chunk_size=128,
        # transformers' NemotronH clamps softplus(dt + dt_bias) to time_step_limit, (0, inf) by default (up to 5.23
        # its PyTorch path clamped at time_step_min = 0.001); matching it makes the preset the very network the
        # benchmark compares against.
        mamba_dt_limit=(0.0, math.inf),
        untie_embeddings_and_output_weights=True,
    )


PRESETS: dict[str, Callable[[], HybridConfig]] = {
    "tiny": _preset_tiny,
    "cpu-bench": _preset_cpu_bench,
    "800M": _preset_800m,
    "8B": _preset_8b,
}


def get_preset(name: str, **overrides: object) -> HybridConfig:
    """A fresh config of preset ``name`` with ``overrides`` applied (validated again by ``HybridConfig``)."""
    try:
        factory = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
    config = factory()
    return config.replace(**overrides) if overrides else config
