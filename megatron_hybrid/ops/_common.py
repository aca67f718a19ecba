"""Helpers shared by the reference kernels: compute dtypes, document segments, time-step processing.

Kept private because their only purpose is to make the reference ops agree with each other (the chunked scan, the
single-token update and the convolution must treat ``dt`` and ``seq_idx`` identically, or decoding would drift from
training).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVATIONS = (None, "silu", "swish")


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when any input is float64 (exactness tests), else float32 (what the GPU kernels accumulate in)."""
    for tensor in tensors:
        if tensor is not None and tensor.dtype == torch.float64:
            return torch.float64
    return torch.float32


def check_activation(activation: str | None) -> bool:
    """Return whether SiLU is applied; ``"swish"`` is accepted as an alias because causal_conv1d accepts it."""
    if activation not in ACTIVATIONS:
        raise NotImplementedError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation is not None


def segment_ids(seq_idx: torch.Tensor) -> torch.Tensor:
    """Turn document ids into monotone segment ids (int64, [b, l]).

    A segment starts wherever ``seq_idx`` changes between neighbouring tokens, so ``0 0 1 1 0`` gives ``0 0 1 1 2``:
    "state resets where the id changes" holds even for non-monotone ids, and equality of segment ids then means
    "same contiguous document". A virtual token before position 0 has id 0 (the rule of mamba_ssm's kernels), so the
    leading document is segment 0 exactly when its id is 0, and only segment 0 sees ``initial_states``.
    """
    if seq_idx.dim() != 2:
        raise ValueError(f"seq_idx must be [batch, seqlen], got shape {tuple(seq_idx.shape)}")
    if seq_idx.dtype.is_floating_point or seq_idx.dtype == torch.bool:
        raise TypeError(f"seq_idx must be an integer tensor, got {seq_idx.dtype}")
    ids = seq_idx.long()
    previous = F.pad(ids[:, :-1], (1, 0), value=0)
    return torch.cumsum((ids != previous).long(), dim=1)


def process_dt(
    dt: torch.Tensor,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Effective time step: ``clamp(softplus(dt + dt_bias), *dt_limit)`` in ``dtype``.

    Order and clamp exactly as mamba_ssm's ``_chunk_cumsum_fwd`` (bias, then softplus with threshold 20, then an
    unconditional clamp) and transformers' NemotronH ``torch_forward``. ``dt_bias`` broadcasts over the trailing dims
    of ``dt`` ([h] against [..., h], or [h, p] against [..., h, p]).
    """
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    low, high = float(dt_limit[0]), float(dt_limit[1])
    # softplus is never negative, so the default limit (0, inf) is a no-op there; skipping it saves a kernel.
    if not (dt_softplus and low <= 0.0 and high == math.inf):
        dt = dt.clamp(min=low, max=high)
    return dt
