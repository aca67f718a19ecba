"""RMSNorm and Mamba-2's grouped, gated RMSNorm (``rmsnorm_groupwise(x * silu(z)) * weight``) for training, in Triton.

Each program normalises a tile of ``BLOCK_M`` rows of one group, so every row is one vectorised reduction and the
grid spans rows x groups; the backward walks a few such tiles per program and keeps its share of the weight gradient
in registers (one float32 partial row per program, summed by torch). mamba_ssm's ``layernorm_gated`` instead loops
over rows one at a time in a program per SM, which at the 800M Mamba layer's shape made each norm's backward ~3x slower
than its memory traffic. Every tensor is addressed as ``[batch, length, width]`` with its own two leading strides and
contiguous channels, so ``z`` can be read, and its gradient written, in place inside ``in_proj``'s output (the mixer's
fused span, ``ops.triton_mamba_span``, writes every gradient of that output into one buffer this way).

Math in float32, rounded once to the storage dtype, as ``ops.norm.gated_rms_norm_ref`` (the reference) and
mamba_ssm's kernel do.
"""

from __future__ import annotations

import torch

from megatron_hybrid.ops._triton_common import UNAVAILABLE_REASON, tl, triton

MAX_GROUP = 8192  # the widest group one program holds (8192 float32 values of a row per tensor in registers)
TILE_ELEMENTS = 4096  # BLOCK_M x BLOCK_N of one tile
BWD_PROGRAMS = 2048  # about this many backward programs: fewer partial rows of the weight gradient to sum

__all__ = ["MAX_GROUP", "UNAVAILABLE_REASON", "group_rms_norm_bwd", "group_rms_norm_fwd", "group_rms_norm_triton"]

if triton is not None:

    @triton.jit
    def _tile(base, rows, cols, mask, L, stride_b, stride_l):
        """The [rows, cols] tile of a [batch, L, width] tensor (rows flattened over batch and length), as float32."""
        rows = rows.to(tl.int64)
        offsets = (rows // L) * stride_b + (rows % L) * stride_l
        return tl.load(base + offsets[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _store_tile(base, value, rows, cols, mask, L, stride_b, stride_l):
        rows = rows.to(tl.int64)
        offsets = (rows // L) * stride_b + (rows % L) * stride_l
        tl.store(base + offsets[:, None] + cols[None, :], value.to(base.dtype.element_ty), mask=mask)

    @triton.jit
    def _group_norm_fwd(
        X, Z, W, OUT, RSTD,
        M, L, ngroups, eps,
        stride_xb, stride_xl, stride_zb, stride_zl, stride_ob, stride_ol,
        GROUP: tl.constexpr, HAS_Z: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        g = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs = tl.arange(0, BLOCK_N)
        cols = g * GROUP + offs
        mask = (rows < M)[:, None] & (offs < GROUP)[None, :]
        x = _tile(X, rows, cols, mask, L, stride_xb, stride_xl)
        if HAS_Z:
            z = _tile(Z, rows, cols, mask, L, stride_zb, stride_zl)
            x = x * (z * tl.sigmoid(z))
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / GROUP + eps)
        w = tl.load(W + cols, mask=offs < GROUP, other=0.0).to(tl.float32)
        _store_tile(OUT, (x * rstd[:, None]) * w[None, :], rows, cols, mask, L, stride_ob, stride_ol)
        tl.store(RSTD + rows.to(tl.int64) * ngroups + g, rstd, mask=rows < M)

    @triton.jit
    def _group_norm_bwd(
        X, Z, W, DOUT, RSTD, DX, DZ, DW_PART,
        M, L, ngroups, width, tiles,
        stride_xb, stride_xl, stride_zb, stride_zl, stride_gb, stride_gl,
        stride_dxb, stride_dxl, stride_dzb, stride_dzl,
        GROUP: tl.constexpr, HAS_Z: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # y = w * xg * rstd with xg = x * silu(z): dxg = rstd * (w dy - xhat * mean(w dy xhat)), xhat = xg * rstd;
        # dw = sum_rows dy * xhat; dx = dxg * silu(z); dz = dxg * x * silu'(z).
        pid_m = tl.program_id(0)
        g = tl.program_id(1)
        offs = tl.arange(0, BLOCK_N)
        cols = g * GROUP + offs
        col_mask = offs < GROUP
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for tile in range(tiles):
            rows = (pid_m * tiles + tile) * BLOCK_M + tl.arange(0, BLOCK_M)
            row_mask = rows < M
            mask = row_mask[:, None] & col_mask[None, :]
            x = _tile(X, rows, cols, mask, L, stride_xb, stride_xl)
            xg = x
            if HAS_Z:
                z = _tile(Z, rows, cols, mask, L, stride_zb, stride_zl)
                sig = tl.sigmoid(z)
                xg = x * (z * sig)
            rstd = tl.load(RSTD + rows.to(tl.int64) * ngroups + g, mask=row_mask, other=0.0)
            dy = _tile(DOUT, rows, cols, mask, L, stride_gb, stride_gl)
            xhat = xg * rstd[:, None]
            wdy = dy * w[None, :]
            dw += tl.sum(dy * xhat, axis=0)
            c = tl.sum(wdy * xhat, axis=1) / GROUP
            dxg = (wdy - xhat * c[:, None]) * rstd[:, None]
            if HAS_Z:
                _store_tile(DX, dxg * (z * sig), rows, cols, mask, L, stride_dxb, stride_dxl)
                _store_tile(DZ, dxg * x * sig * (1.0 + z * (1.0 - sig)), rows, cols, mask, L, stride_dzb, stride_dzl)
            else:
                _store_tile(DX, dxg, rows, cols, mask, L, stride_dxb, stride_dxl)
        tl.store(DW_PART + pid_m.to(tl.int64) * width + cols, dw, mask=col_mask)


def _as_3d(t: torch.Tensor) -> torch.Tensor:
    """``t`` [..., width] as [batch, length, width] without a copy where its strides allow (channels contiguous)."""
    if t.dim() == 3 and t.stride(-1) == 1:
        return t
    flat = t.reshape(-1, t.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    return flat.unsqueeze(0)


def _tile_shape(group_size: int) -> tuple[int, int, int]:
    block_n = triton.next_power_of_2(group_size)
    block_m = max(1, TILE_ELEMENTS // block_n)
    warps = 4 if block_n * block_m <= 4096 else 8
    return block_m, block_n, warps


def group_rms_norm_fwd(
    x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, eps: float, group_size: int,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rmsnorm_groupwise(x * silu(z)) * weight, rstd)`` for [b, l, width] tensors (z may be None); ``out`` (a new
    contiguous tensor of x's shape and dtype if not given) may be any view with contiguous channels. ``rstd`` is
    float32 [b * l, groups], what the backward needs."""
    b, l, width = x.shape
    groups = width // group_size
    if out is None:
        out = torch.empty(b, l, width, device=x.device, dtype=x.dtype)
    rstd = torch.empty(b * l, groups, device=x.device, dtype=torch.float32)
    if x.numel() == 0:
        return out, rstd
    block_m, block_n, warps = _tile_shape(group_size)
    zt = z if z is not None else x
    _group_norm_fwd[(triton.cdiv(b * l, block_m), groups)](
        x, zt, weight, out, rstd,
        b * l, l, groups, float(eps),
        x.stride(0), x.stride(1), zt.stride(0), zt.stride(1), out.stride(0), out.stride(1),
        GROUP=group_size, HAS_Z=z is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )
    return out, rstd


def group_rms_norm_bwd(
    dout: torch.Tensor, x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, rstd: torch.Tensor,
    group_size: int, dx: torch.Tensor | None = None, dz: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Gradients ``(dx, dz, dweight)`` of ``group_rms_norm_fwd``; ``dx`` / ``dz`` may be given as views (contiguous
    channels) to write into, else new contiguous tensors. ``dweight`` in weight's dtype."""
    b, l, width = x.shape
    groups = width // group_size
    if dx is None:
        dx = torch.empty(b, l, width, device=x.device, dtype=x.dtype)
    if z is not None and dz is None:
        dz = torch.empty(b, l, width, device=z.device, dtype=z.dtype)
    block_m, block_n, warps = _tile_shape(group_size)
    n_tiles = triton.cdiv(b * l, block_m) if x.numel() else 0
    tiles = max(1, n_tiles * groups // BWD_PROGRAMS)
    programs = triton.cdiv(n_tiles, tiles)
    dw_part = torch.empty(programs, width, device=x.device, dtype=torch.float32)
    if programs:
        zt, dzt = (z, dz) if z is not None else (x, dx)
        _group_norm_bwd[(programs, groups)](
            x, zt, weight, dout, rstd, dx, dzt, dw_part,
            b * l, l, groups, width, tiles,
            x.stride(0), x.stride(1), zt.stride(0), zt.stride(1), dout.stride(0), dout.stride(1),
            dx.stride(0), dx.stride(1), dzt.stride(0), dzt.stride(1),
            GROUP=group_size, HAS_Z=z is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        )
    return dx, dz, dw_part.sum(dim=0).to(weight.dtype)


class _GroupRMSNormTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, eps: float,
                group_size: int) -> torch.Tensor:
        x3 = _as_3d(x)
        z3 = _as_3d(z) if z is not None else None
        out, rstd = group_rms_norm_fwd(x3, z3, weight, eps, group_size)
        ctx.save_for_backward(x3, z3, weight, rstd)
        ctx.group_size = group_size
        ctx.shapes = (x.shape, z.shape if z is not None else None)
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        x3, z3, weight, rstd = ctx.saved_tensors
        dx, dz, dweight = group_rms_norm_bwd(_as_3d(dout), x3, z3, weight, rstd, ctx.group_size)
        x_shape, z_shape = ctx.shapes
        return dx.view(x_shape), dz.view(z_shape) if dz is not None else None, dweight, None, None


def group_rms_norm_triton(
    x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, eps: float, group_size: int | None = None
) -> torch.Tensor:
    """``rmsnorm_groupwise(x * silu(z)) * weight`` over the last dim (``z`` None: plain RMSNorm; ``group_size`` None:
    one group), x's dtype; differentiable in x, z and weight. ``group_size`` must divide the width and be at most
    ``MAX_GROUP``; the caller (``ops.backend``) checks."""
    width = x.shape[-1]
    return _GroupRMSNormTriton.apply(x, z, weight, float(eps), width if group_size is None else int(group_size))
