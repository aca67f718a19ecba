"""Kernels of the Mamba-2 / attention hybrid: pure-PyTorch references plus an optional GPU fast path.

Import the dispatching functions from here; each takes ``backend="auto" | "torch" | "triton"`` (see ``ops.backend``).
The ``*_ref`` functions are the pure-PyTorch references (CPU or GPU, differentiable). mamba_ssm and causal_conv1d are
only imported lazily, on the first call with CUDA tensors or by ``kernel_backend_info()``.
"""

from megatron_hybrid.ops.backend import (
    ENV_VAR,
    KernelFallbackWarning,
    causal_conv1d,
    causal_conv1d_channel_last,
    causal_conv1d_update,
    cross_entropy,
    decode_attention_fused,
    fused_gemv,
    gated_rms_norm,
    greedy_tokens_and_feed,
    kernel_backend_info,
    mamba_decode_fused,
    mamba_span,
    rms_norm,
    skinny_gemv,
    ssd_chunk_scan,
    ssm_state_update,
)
from megatron_hybrid.ops.conv1d import causal_conv1d_ref
from megatron_hybrid.ops.mamba_ssm_loader import KernelUnavailableError
from megatron_hybrid.ops.norm import add_rms_norm_ref, gated_rms_norm_ref, rms_norm_ref
from megatron_hybrid.ops.ssd import ssd_chunk_scan_ref
from megatron_hybrid.ops.state_update import causal_conv1d_update_ref, ssm_state_update_ref

__all__ = [
    "ENV_VAR",
    "KernelFallbackWarning",
    "KernelUnavailableError",
    "add_rms_norm_ref",
    "causal_conv1d",
    "causal_conv1d_channel_last",
    "causal_conv1d_ref",
    "causal_conv1d_update",
    "causal_conv1d_update_ref",
    "cross_entropy",
    "decode_attention_fused",
    "fused_gemv",
    "gated_rms_norm",
    "gated_rms_norm_ref",
    "greedy_tokens_and_feed",
    "kernel_backend_info",
    "mamba_decode_fused",
    "mamba_span",
    "rms_norm",
    "rms_norm_ref",
    "skinny_gemv",
    "ssd_chunk_scan",
    "ssd_chunk_scan_ref",
    "ssm_state_update",
    "ssm_state_update_ref",
]
