"""The Mamba-2 mixer between its two projections as one autograd node on the GPU, for training.

``in_proj``'s output ``[z, x, B, C, dt]`` -> causal conv + SiLU over ``[x, B, C]`` (``ops.triton_conv1d``) -> SSD
scan with D and dt processing (``ops.triton_ssd``) -> grouped gated RMSNorm of ``y * silu(z)`` (``ops.triton_norm``).
Composed from separate autograd nodes, the backward of the two ``torch.split`` calls (the mixer's split of the
projection and of the conv output) concatenates the pieces' gradients: two copies of the widest activations, 6% of
the layer's kernel time at the 800M shape. Here every kernel writes its gradient where it belongs instead: the norm's
``dz`` and the scan's ``ddt`` into slices of one buffer shaped like ``in_proj``'s output, the scan's ``dx`` / ``dB`` /
``dC`` into slices of one conv-output-shaped buffer, and the conv's input gradient into the remaining slice of the
first. Same kernels, same arithmetic as the composed path, so the results are bitwise those of the composed Triton ops.

No inference caches here (a prefill that stores the final conv inputs and SSM state takes the composed path).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_hybrid.ops._triton_common import UNAVAILABLE_REASON, triton

if triton is not None:
    from megatron_hybrid.ops import triton_conv1d, triton_norm, triton_ssd

__all__ = ["UNAVAILABLE_REASON", "MambaSpanShape", "mamba_span_triton", "unsupported_reason"]


@dataclass(frozen=True)
class MambaSpanShape:
    """The local (this rank's) widths of ``in_proj``'s output pieces and the scan's settings."""

    nheads: int
    headdim: int
    ngroups: int
    d_state: int
    chunk_size: int
    norm_group_size: int
    norm_eps: float
    dt_limit: tuple[float, float] = (0.0, math.inf)

    @property
    def d_inner(self) -> int:
        return self.nheads * self.headdim

    @property
    def conv_width(self) -> int:
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def width(self) -> int:
        return self.d_inner + self.conv_width + self.nheads

    def pieces(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z, xBC, dt)`` views of an in_proj-output-shaped ``t`` [b, l, width]."""
        di, cw = self.d_inner, self.conv_width
        return t[..., :di], t[..., di:di + cw], t[..., di + cw:]

    def scan_inputs(self, xbc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x [b, l, h, p], B [b, l, g, n], C [b, l, g, n])`` views of a conv-output-shaped ``xbc``."""
        b, l, _ = xbc.shape
        di, gw = self.d_inner, self.ngroups * self.d_state
        return (xbc[..., :di].unflatten(-1, (self.nheads, self.headdim)),
                xbc[..., di:di + gw].unflatten(-1, (self.ngroups, self.d_state)),
                xbc[..., di + gw:].unflatten(-1, (self.ngroups, self.d_state)))


def unsupported_reason(zxbcdt: torch.Tensor, conv_weight: torch.Tensor, D: torch.Tensor | None,
                       shape: MambaSpanShape) -> str | None:
    """Why the fused span cannot run these arguments (None when it can); the mixer then composes the ops."""
    if zxbcdt.dim() != 3 or zxbcdt.shape[-1] != shape.width or zxbcdt.stride(-1) != 1:
        return f"in_proj output of shape {tuple(zxbcdt.shape)} (want [b, l, {shape.width}], contiguous channels)"
    if conv_weight.shape != (shape.conv_width, conv_weight.shape[-1]) or conv_weight.shape[-1] > \
            triton_conv1d.MAX_WIDTH:
        return f"conv weight of shape {tuple(conv_weight.shape)}"
    if shape.norm_group_size > triton_norm.MAX_GROUP or shape.d_inner % shape.norm_group_size:
        return f"norm group size {shape.norm_group_size}"
    x, B, C = shape.scan_inputs(zxbcdt[..., :shape.conv_width])
    return triton_ssd.unsupported_reason(x, B, C, shape.chunk_size, D)


def _like_layout(zxbcdt: torch.Tensor, width: int) -> torch.Tensor:
    """A new [b, l, width] tensor laid out like ``zxbcdt``: sequence-first memory when ``zxbcdt`` is the transposed
    view of a sequence-first projection, so that ``out_proj`` and ``in_proj``'s backward get contiguous operands."""
    b, l, _ = zxbcdt.shape
    if b > 1 and zxbcdt.stride(0) < zxbcdt.stride(1):
        return torch.empty(l, b, width, device=zxbcdt.device, dtype=zxbcdt.dtype).transpose(0, 1)
    return torch.empty(b, l, width, device=zxbcdt.device, dtype=zxbcdt.dtype)


class _MambaSpan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zxbcdt, conv_weight, conv_bias, A, D, dt_bias, norm_weight, segments, shape: MambaSpanShape):
        b, l, _ = zxbcdt.shape
        z, xbc_in, dt = shape.pieces(zxbcdt)
        xbc = triton_conv1d._conv_fwd(xbc_in, conv_weight, conv_bias, segments, True)
        x, B, C = shape.scan_inputs(xbc)
        y, _final, dtp, acs, entering = triton_ssd._forward(
            x, dt, A, B, C, D, dt_bias, segments, None, shape.chunk_size, True, shape.dt_limit)
        y = y.view(b, l, shape.d_inner)
        out = _like_layout(zxbcdt, shape.d_inner)
        _, rstd = triton_norm.group_rms_norm_fwd(y, z, norm_weight, shape.norm_eps, shape.norm_group_size, out=out)
        ctx.save_for_backward(zxbcdt, conv_weight, conv_bias, A, D, dt_bias, norm_weight, segments, xbc, y, rstd,
                              dtp, acs, entering)
        ctx.shape = shape
        return out

    @staticmethod
    def backward(ctx, dout):
        (zxbcdt, conv_weight, conv_bias, A, D, dt_bias, norm_weight, segments, xbc, y, rstd, dtp, acs,
         entering) = ctx.saved_tensors
        shape = ctx.shape
        b, l, _ = zxbcdt.shape
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        grad = _like_layout(zxbcdt, shape.width)
        dz, dxbc_in, ddt = shape.pieces(grad)
        z, xbc_in, dt = shape.pieces(zxbcdt)
        dy = torch.empty_like(y)
        _, _, dnorm_weight = triton_norm.group_rms_norm_bwd(
            dout, y, z, norm_weight, rstd, shape.norm_group_size, dx=dy, dz=dz)
        dxbc = torch.empty_like(xbc)
        dx, dB, dC = shape.scan_inputs(dxbc)
        x, B, C = shape.scan_inputs(xbc)
        _, _, dA, _, _, dD, ddt_bias, _ = triton_ssd._backward(
            dy.unflatten(-1, (shape.nheads, shape.headdim)), None, x, dt, A, B, C, D, dt_bias, segments, None,
            shape.chunk_size, True, shape.dt_limit, dtp, acs, entering, out=(dx, ddt, dB, dC))
        _, dconv_weight, dconv_bias = triton_conv1d._conv_bwd(
            xbc_in, conv_weight, conv_bias, segments, True, dxbc, dx=dxbc_in)
        return grad, dconv_weight, dconv_bias, dA, dD, ddt_bias, dnorm_weight, None, None


def mamba_span_triton(
    zxbcdt: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    A: torch.Tensor,
    D: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    norm_weight: torch.Tensor,
    shape: MambaSpanShape,
    segments: torch.Tensor | None = None,
) -> torch.Tensor:
    """``norm(ssd_scan(silu(conv(xBC)), dt), z)`` [b, l, d_inner] from ``zxbcdt`` [b, l, width], with softplus on
    ``dt + dt_bias`` clamped to ``shape.dt_limit``. ``zxbcdt`` may have any leading strides (contiguous channels);
    the output and ``zxbcdt``'s gradient are sequence-first in memory when it is. ``conv_weight`` [conv width,
    kernel]; ``segments`` int32 [b, l] monotone document ids (``_common.segment_ids``) or None.
    ``unsupported_reason`` must be None for these arguments (the caller, ``ops.backend.mamba_span``, checks)."""
    return _MambaSpan.apply(zxbcdt, conv_weight, conv_bias, A, D, dt_bias, norm_weight, segments, shape)
