"""Closed-form parameter count of a (TP=1) hybrid model, computed from the configuration alone.

This is deliberately independent of the modules: it sums, over the layer pattern, a per-layer-type formula, so a test
can check the model code against it (and the formula against the model code) and a README can quote it. Notation:
``h`` hidden size, ``V`` padded vocabulary, ``b`` = 1 if ``add_bias_linear`` else 0.

* Mamba-2 layer ``M`` (``H`` heads of dim ``P``, ``d = H * P``, ``G`` groups, state ``N``, conv kernel ``k``,
  ``c = d + 2 G N`` conv channels, ``cb`` = 1 if ``mamba_conv_bias``)::

      P_M = h                      pre-norm
          + h (2 d + 2 G N + H)    in_proj (z, x, B, C, dt), no bias
          + k c + cb c             depthwise conv1d weight [c, 1, k] and bias
          + 3 H                    dt_bias, A_log, D
          + d                      gated RMSNorm
          + d h                    out_proj, no bias

* Attention layer ``*`` (``a`` heads, ``g`` query groups, head dim ``e = kv_channels``)::

      P_* = h + (a + 2 g) e (h + b) + a e h + b h

* MLP layer ``-`` (``f = ffn_hidden_size``, ``m = 2`` for SwiGLU, else 1)::

      P_- = h + m f (h + b) + f h + b h

* Whole model::

      total = V h                                (word embeddings)
            + V h   if embeddings are untied     (output layer)
            + h                                  (final norm)
            + sum over the layer pattern of P_M, P_*, P_-

``non_embedding`` is ``total - V h`` (the output layer of an untied model counts as non-embedding), the convention of
:func:`megatron_hybrid.models.mamba_model.count_parameters`.
"""

from __future__ import annotations

from megatron_hybrid.config import HybridConfig

__all__ = [
    "attention_layer_parameters",
    "mamba_layer_parameters",
    "mlp_layer_parameters",
    "parameter_count_formula",
]


def mamba_layer_parameters(config: HybridConfig) -> int:
    """``P_M``: parameters of one Mamba-2 layer (pre-norm included)."""
    h = config.hidden_size
    heads, head_dim = config.mamba_num_heads, config.mamba_head_dim
    d = heads * head_dim
    bc = 2 * config.mamba_num_groups * config.mamba_state_dim
    conv_channels = d + bc
    return (
        h
        + h * (2 * d + bc + heads)
        + config.mamba_conv_kernel * conv_channels
        + (conv_channels if config.mamba_conv_bias else 0)
        + 3 * heads
        + d
        + d * h
    )


def attention_layer_parameters(config: HybridConfig) -> int:
    """``P_*``: parameters of one self-attention layer (pre-norm included)."""
    h, e, b = config.hidden_size, config.kv_channels, int(config.add_bias_linear)
    qkv = (config.num_attention_heads + 2 * config.num_query_groups) * e
    return h + qkv * (h + b) + config.num_attention_heads * e * h + b * h


def mlp_layer_parameters(config: HybridConfig) -> int:
    """``P_-``: parameters of one MLP layer (pre-norm included)."""
    h, f, b = config.hidden_size, config.ffn_hidden_size, int(config.add_bias_linear)
    fc1 = (2 if config.activation == "swiglu" else 1) * f
    return h + fc1 * (h + b) + f * h + b * h


def parameter_count_formula(config: HybridConfig) -> dict[str, int]:
    """Parameter counts of the TP=1 model described by ``config``, by closed form (see the module docstring).

    Returns ``total``, ``embedding``, ``non_embedding`` (the keys of ``count_parameters``) and the breakdown
    ``output_layer``, ``final_norm``, ``mamba``, ``attention``, ``mlp`` (sums over the layers of each type).
    """
    h, vocab = config.hidden_size, config.padded_vocab_size
    pattern = config.layer_pattern
    counts = {symbol: pattern.count(symbol) for symbol in "M*-"}
    embedding = vocab * h
    output_layer = vocab * h if config.untie_embeddings_and_output_weights else 0
    mamba = counts["M"] * mamba_layer_parameters(config)
    attention = counts["*"] * attention_layer_parameters(config)
    mlp = counts["-"] * mlp_layer_parameters(config)
    total = embedding + output_layer + h + mamba + attention + mlp
    return {
        "total": total,
        "embedding": embedding,
        "non_embedding": total - embedding,
        "output_layer": output_layer,
        "final_norm": h,
        "mamba": mamba,
        "attention": attention,
        "mlp": mlp,
    }
