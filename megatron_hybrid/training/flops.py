"""Model FLOPs of a training step and the peak throughput of common accelerators (for TFLOP/s and MFU logging).

Why a closed form: MFU compares the *model's* arithmetic (what an ideal implementation must do) with the hardware
peak, independent of recomputation or kernel choices. Counting one multiply-add as 2 FLOPs, per token of a sequence
of length ``s`` and per layer, forward only:

* Mamba-2 layer (``h`` hidden, ``H`` heads of dim ``P``, ``d = H P``, ``G`` groups, state ``N``, conv width ``k``,
  chunk ``Q``)::

      in_proj   2 h (2 d + 2 G N + H)
      conv1d    2 k (d + 2 G N)
      SSD       2 Q G N          C B^T inside a chunk (per group; shared by the heads of a group)
              + 2 Q d            the chunk's masked "attention" (C B^T . L) applied to x
              + 2 N d            chunk states B^T x
              + 2 N d            output from the carried states C h
      out_proj  2 d h

  The chunked scan computes whole Q x Q blocks (the causal half is not skipped), so the SSD term is what the
  kernels execute; the state passing between chunks (O(N d / Q) per token) is negligible and left out.

* attention layer (``a`` query heads, ``g`` key/value groups, head dim ``e``)::

      2 h (a + 2 g) e  +  2 a e h  +  2 * 2 a e (s / 2)     (QKV, output projection, causal QK^T and AV)

* MLP layer (``f`` inner width, ``m`` = 2 for SwiGLU else 1): ``2 h m f + 2 f h``;
* output layer: ``2 h V`` (padded vocabulary); the embedding lookup is free.

Training = forward + backward = 3 x forward (the backward computes gradients for inputs and weights). Activation
recomputation is not counted (it is not model arithmetic). TFLOP/s per device = step FLOPs / step time / devices.
"""

from __future__ import annotations

from megatron_hybrid.config import HybridConfig

__all__ = ["PEAK_TFLOPS", "forward_flops_per_token", "peak_tflops_for_device", "training_flops_per_step"]

# Dense peak TFLOP/s per device: (bf16, tf32). Matched against torch.cuda.get_device_name() in order.
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("H200", 989.4, 494.7),
    ("H100 PCIe", 756.5, 378.0),
    ("H100 NVL", 835.5, 417.5),
    ("H100", 989.4, 494.7),
    ("H800", 989.4, 494.7),
    ("GH200", 989.4, 494.7),
    ("B200", 2250.0, 1100.0),
    ("A100", 312.0, 156.0),
    ("A800", 312.0, 156.0),
    ("L40S", 362.1, 183.0),
    ("A10G", 70.0, 35.0),
    ("L4", 121.0, 60.0),
)


def _mamba_layer(config: HybridConfig, seq_length: int) -> float:
    h, d, heads = config.hidden_size, config.mamba_d_inner, config.mamba_num_heads
    gn = config.mamba_num_groups * config.mamba_state_dim
    n, q, k = config.mamba_state_dim, min(config.mamba_chunk_size, seq_length), config.mamba_conv_kernel
    in_proj = 2 * h * (2 * d + 2 * gn + heads)
    conv = 2 * k * (d + 2 * gn)
    ssd = 2 * q * gn + 2 * q * d + 4 * n * d
    out_proj = 2 * d * h
    return in_proj + conv + ssd + out_proj


def _attention_layer(config: HybridConfig, seq_length: int) -> float:
    h, e = config.hidden_size, config.kv_channels
    a, g = config.num_attention_heads, config.num_query_groups
    return 2 * h * (a + 2 * g) * e + 2 * a * e * h + 4 * a * e * (seq_length / 2)


def _mlp_layer(config: HybridConfig) -> float:
    h, f = config.hidden_size, config.ffn_hidden_size
    m = 2 if config.activation == "swiglu" else 1
    return 2 * h * m * f + 2 * f * h


def forward_flops_per_token(config: HybridConfig, seq_length: int) -> float:
    """Forward FLOPs per token of a ``seq_length`` sequence (see the module docstring)."""
    total = 2.0 * config.hidden_size * config.padded_vocab_size
    for symbol in config.layer_pattern:
        if symbol == "M":
            total += _mamba_layer(config, seq_length)
        elif symbol == "*":
            total += _attention_layer(config, seq_length)
        else:
            total += _mlp_layer(config)
    return total


def training_flops_per_step(config: HybridConfig, seq_length: int, global_batch_size: int) -> float:
    """Model FLOPs of one optimizer step over ``global_batch_size`` sequences (3 x forward)."""
    return 3.0 * forward_flops_per_token(config, seq_length) * seq_length * global_batch_size


def peak_tflops_for_device(device_name: str, bf16: bool = True) -> float | None:
    """Dense peak TFLOP/s of a CUDA device by name (bf16, else TF32); None when unknown (e.g. a CPU)."""
    for key, bf16_peak, tf32_peak in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return bf16_peak if bf16 else tf32_peak
    return None
