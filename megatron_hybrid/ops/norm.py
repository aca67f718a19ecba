"""Pure-PyTorch RMSNorm and Mamba-2's grouped, gated RMSNorm (reference for mamba_ssm's ``rmsnorm_fn``).

Both normalise in float32 (float64 for float64 inputs), multiply by the weight in that precision and round once to
the input dtype, as mamba_ssm's Triton kernel and transformers' NemotronHRMSNorm do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_hybrid.ops._common import compute_dtype


class _GroupRMSNorm(torch.autograd.Function):
    """``rmsnorm_groupwise(x * silu(z)) * weight`` (``z`` may be None) with a hand-written backward, for training.

    x and z are viewed as [N, G, group]; everything stays in their dtype (float32 or float64). The mean square comes
    from one ``vector_norm`` pass, and the backward uses ``t = dy * xg`` for both reductions it needs
    (``dweight = sum_n t * rstd`` and ``c = sum_group t * weight``), then ``dxg = rstd * weight * dy - rstd^3 c / group
    * xg``: about 10 passes over the activation where autograd through the composite CPU rms_norm (pow, mean, rsqrt,
    several muls, each saved and differentiated) takes over 20.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, eps: float,
                group_size: int) -> torch.Tensor:
        width = x.shape[-1]
        groups = width // group_size
        x2 = x.reshape(-1, groups, group_size)
        gate = None
        if z is not None:
            gate = F.silu(z.reshape(-1, groups, group_size))
            xg = x2 * gate
        else:
            xg = x2
        rstd = torch.linalg.vector_norm(xg, dim=-1).square_().div_(group_size).add_(eps).rsqrt_()  # [N, G]
        y = (xg * rstd.unsqueeze(-1)).mul_(weight.view(groups, group_size))
        ctx.save_for_backward(x2 if z is not None else None, z, gate, xg, rstd, weight)
        ctx.group_size = group_size
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x2, z, gate, xg, rstd, weight = ctx.saved_tensors
        group_size = ctx.group_size
        groups = xg.shape[1]
        w = weight.view(groups, group_size)
        dy = grad_y.reshape(xg.shape)
        t = dy * xg
        if groups == 1:  # matrix-vector products (einsum would take a batched-matmul path with a batch of one)
            flat = t.view(-1, group_size)
            grad_weight = flat.t() @ rstd.view(-1)
            c = (flat @ weight).unsqueeze(1)
        else:
            grad_weight = torch.einsum("ngs,ng->gs", t, rstd).reshape(weight.shape)
            c = torch.einsum("ngs,gs->ng", t, w)
        k = rstd.pow(3).mul_(c).div_(group_size)
        grad_xg = (dy * w).mul_(rstd.unsqueeze(-1)).addcmul_(xg, k.unsqueeze(-1), value=-1.0)
        if z is None:
            return grad_xg.view(grad_y.shape), None, grad_weight, None, None
        grad_x = (grad_xg * gate).view(grad_y.shape)
        grad_z = torch.ops.aten.silu_backward(grad_xg.mul_(x2), z.reshape(xg.shape)).view(grad_y.shape)
        return grad_x, grad_z, grad_weight, None, None


def _use_autograd_function(*tensors: torch.Tensor | None) -> bool:
    """Training calls (a gradient is wanted) in one float32/float64 dtype take ``_GroupRMSNorm``; inference keeps the
    plain ops (fewer Python steps per call, which is what a decode step of tiny norms pays for)."""
    present = [t for t in tensors if t is not None]
    dtype = present[0].dtype
    return (torch.is_grad_enabled() and any(t.requires_grad for t in present)
            and dtype in (torch.float32, torch.float64) and all(t.dtype == dtype for t in present))


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2, -1) + eps) * weight`` over the last dim; returns x's dtype."""
    cdt = compute_dtype(x, weight)
    if _use_autograd_function(x, weight):
        return _GroupRMSNorm.apply(x, None, weight, eps, x.shape[-1])
    if x.dtype == weight.dtype == cdt:
        # Same formula in one fused call (a decode step runs dozens of tiny norms: the op count is the cost).
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.to(cdt)
    y = xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)
    return (y * weight.to(cdt)).to(x.dtype)


def add_rms_norm_ref(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-norm residual carry: ``(rms_norm(s in x's dtype), s)`` with ``s = residual + x`` in ``residual_dtype``
    (default residual's dtype).

    Exactly the unfused layer path: ``_PreNormResidual._residual_add`` (``residual + update``, or ``residual.float()
    + update.float()`` for a float32 stream), then the next norm on the working-precision copy of the stream.
    """
    residual_dtype = residual_dtype or residual.dtype
    if residual.dtype == x.dtype == residual_dtype:
        total = residual + x
    else:
        total = residual.to(residual_dtype) + x.to(residual_dtype)
    return rms_norm_ref(total.to(x.dtype), weight, eps), total


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
    if not norm_before_gate and _use_autograd_function(x, z, weight):
        return _GroupRMSNorm.apply(x, z, weight, eps, group_size)
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
