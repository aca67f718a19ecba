"""Pure-PyTorch RMSNorm and Mamba-2's grouped, gated RMSNorm (reference for mamba_ssm's ``rmsnorm_fn``).

Both normalise in float32 (float64 for float64 inputs), multiply by the weight in that precision and round once to
the input dtype, as mamba_ssm's Triton kernel and transformers' NemotronHRMSNorm do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_hybrid.ops._common import compute_dtype


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2, -1) + eps) * weight`` over the last dim; returns x's dtype."""
    cdt = compute_dtype(x, weight)
    if x.dtype == weight.dtype == cdt:
        # Same formula in one fused call (a decode step runs dozens of tiny norms: the op count is the cost).
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.to(cdt)
    y = xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)
    return (y * weight.to(cdt)).to(x.dtype)


def gated_rms_norm_ref(
    x: torch.Tensor,
    z: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> torch.Tensor:
    """Group-wise RMSNorm with a SiLU gate, over the last dim split into groups of ``group_size`` channels.

    ``norm_before_gate=False`` (Mamba-2, NemotronH): ``rmsnorm_groupwise(x * silu(z)) * weight``.
    ``norm_before_gate=True``: ``rmsnorm_groupwise(x) * weight * silu(z)``. ``z=None`` drops the gate;
    ``group_size=None`` means one group spanning the whole last dim.
    """
    width = x.shape[-1]
    group_size = width if group_size is None else group_size
    if group_size <= 0 or width % group_size:
        raise ValueError(f"group_size {group_size} must divide the last dim {width}")
    if weight.shape != (width,):
        raise ValueError(f"weight must be [{width}], got shape {tuple(weight.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must have the shape of x {tuple(x.shape)}, got {tuple(z.shape)}")
    cdt = compute_dtype(x, z, weight)
    xf = x.to(cdt)
    gate = F.silu(z.to(cdt)) if z is not None else None
    if gate is not None and not norm_before_gate:
        xf = xf * gate
    grouped = xf.reshape(*xf.shape[:-1], width // group_size, group_size)
    grouped = F.rms_norm(grouped, (group_size,), None, eps)
    y = grouped.reshape(xf.shape) * weight.to(cdt)
    if gate is not None and norm_before_gate:
        y = y * gate
    return y.to(x.dtype)
