"""Triton causal depthwise conv1d for the training path: channel-last input, fused SiLU, documents, fwd + bwd.

Why it exists: without causal_conv1d's CUDA extension the GPU fallback was PyTorch's depthwise conv in float32 on a
``[b, d, l]`` layout, which cost ~1.7 ms of conv kernels plus ~2.5 ms of transposes, casts and SiLU per Mamba layer
(fwd + bwd, 800M shape on an H200) against ~0.1 ms of memory traffic that the op really needs. These kernels read the
mixer's ``xBC`` slice of ``in_proj``'s output where it lies (``[b, l, d]``, any row strides, channels contiguous), so
no copy, cast or transpose is made on either side of the convolution.

Semantics are those of ``ops.causal_conv1d_ref`` on the channel-last view (``causal_conv1d_fn`` of causal_conv1d):
``out[b, t, c] = act(bias[c] + sum_j weight[c, j] * x[b, t - (w - 1) + j, c])`` with zeros before position 0 and, with
``seq_idx``, only taps of the output token's document segment (``_common.segment_ids``). No initial or final states
(the prefill of an inference cache keeps its own path). Math is float32 whatever the input dtype; the output has the
dtype of ``x``, the weight and bias gradients those of the parameters.

Forward: one program per ``[BLOCK_L, BLOCK_D]`` output tile, ``w`` shifted loads of ``x`` (neighbouring rows are L1/L2
hits). Backward: the pre-activation is recomputed from ``x`` (nothing but ``x`` is saved; it is a view of ``in_proj``'s
output, which the scan and the norm keep alive anyway), the input gradient of a tile gathers ``dpre`` at the ``w``
later positions, and weight/bias gradients are reduced per program into float32 partials that one ``sum`` finishes
(deterministic: no atomics).

Importing this module imports triton; ``ops.backend`` only does that lazily, on CUDA tensors. Under
``TRITON_INTERPRET=1`` (set before this module is imported) the same kernels run on CPU tensors, which is how the
tests check them without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_hybrid.ops._common import check_activation, segment_ids

__all__ = ["causal_conv1d_channel_last_triton", "MAX_WIDTH"]

MAX_WIDTH = 8  # taps are unrolled at compile time; Mamba uses 4
# Tile shapes (module globals, read at every call, so a benchmark can sweep them). Chosen offline from ptxas's
# register report for sm_90 with bf16 inputs: forward 124 registers/thread, no spills; backward ~210, no spills.
FWD_BLOCK_L, FWD_BLOCK_D, FWD_WARPS = 32, 128, 4
BWD_BLOCK_L, BWD_BLOCK_D, BWD_WARPS = 64, 64, 8
BWD_ROWS_PER_PROGRAM = 256  # sequence positions one backward program walks (bounds the weight-grad partials)

if not hasattr(tl, "gather"):  # the backward shifts dpre in registers with tl.gather (Triton >= 3.2)
    raise ImportError(f"megatron_hybrid's Triton conv1d needs triton >= 3.2 (tl.gather), found {triton.__version__}")


@triton.jit
def _conv1d_fwd_kernel(
    X, W, BIAS, SEG, OUT,
    L, D,
    stride_xb, stride_xl,
    stride_ob, stride_ol,
    stride_wd, stride_ww,
    stride_sb,
    HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr, KW: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_l = offs_l < L
    mask_d = offs_d < D
    x_base = X + pid_b * stride_xb

    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    if HAS_SEQ:
        seg_base = SEG + pid_b * stride_sb
        seg_t = tl.load(seg_base + offs_l, mask=mask_l, other=-1)
    for j in tl.static_range(KW):
        src = offs_l - (KW - 1) + j
        valid = mask_l & (src >= 0)
        if HAS_SEQ:
            if j < KW - 1:
                seg_src = tl.load(seg_base + src, mask=valid, other=-2)
                valid = valid & (seg_src == seg_t)
        x = tl.load(
            x_base + src.to(tl.int64)[:, None] * stride_xl + offs_d[None, :],
            mask=valid[:, None] & mask_d[None, :], other=0.0,
        ).to(tl.float32)
        w = tl.load(W + offs_d * stride_wd + j * stride_ww, mask=mask_d, other=0.0).to(tl.float32)
        acc += x * w[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    out_ptrs = OUT + pid_b * stride_ob + offs_l.to(tl.int64)[:, None] * stride_ol + offs_d[None, :]
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=mask_l[:, None] & mask_d[None, :])


@triton.jit
def _conv1d_bwd_kernel(
    X, W, BIAS, SEG, DOUT, DX, DW_PART, DB_PART,
    L, D, TILES,
    stride_xb, stride_xl,
    stride_gb, stride_gl,
    stride_dxb, stride_dxl,
    stride_wd, stride_ww,
    stride_sb,
    stride_pb, stride_pc,
    stride_qb, stride_qc,
    HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr, KW: tl.constexpr, KW_PAD: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # A tile computes dpre = dout * silu'(pre) on BLOCK_L rows but writes dx only for its first OUT_L rows: the last
    # KW - 1 rows are the halo that dx[s] = sum_k weight[KW-1-k] * dpre[s+k] reads (shifted in registers by gather),
    # and the next tile starts right after the OUT_L rows, so every position is output exactly once.
    OUT_L: tl.constexpr = BLOCK_L - (KW - 1)
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    rows = tl.arange(0, BLOCK_L)
    x_base = X + pid_b * stride_xb
    g_base = DOUT + pid_b * stride_gb
    if HAS_SEQ:
        seg_base = SEG + pid_b * stride_sb
    taps = tl.arange(0, KW_PAD)
    if HAS_BIAS:
        bias = tl.load(BIAS + offs_d, mask=mask_d, other=0.0).to(tl.float32)

    dw_acc = tl.zeros((BLOCK_D, KW_PAD), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for tile in range(TILES):
        offs_r = (pid_c * TILES + tile) * OUT_L + rows
        mask_r = offs_r < L
        is_out = mask_r & (rows < OUT_L)
        if HAS_SEQ:
            seg_r = tl.load(seg_base + offs_r, mask=mask_r, other=-1)
        dpre = tl.load(
            g_base + offs_r.to(tl.int64)[:, None] * stride_gl + offs_d[None, :],
            mask=mask_r[:, None] & mask_d[None, :], other=0.0,
        ).to(tl.float32)
        if SILU:
            pre = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
            if HAS_BIAS:
                pre += bias[None, :]
            for j in tl.static_range(KW):
                src = offs_r - (KW - 1) + j
                valid = mask_r & (src >= 0)
                if HAS_SEQ:
                    if j < KW - 1:
                        seg_src = tl.load(seg_base + src, mask=valid, other=-2)
                        valid = valid & (seg_src == seg_r)
                x = tl.load(
                    x_base + src.to(tl.int64)[:, None] * stride_xl + offs_d[None, :],
                    mask=valid[:, None] & mask_d[None, :], other=0.0,
                ).to(tl.float32)
                w = tl.load(W + offs_d * stride_wd + j * stride_ww, mask=mask_d, other=0.0).to(tl.float32)
                pre += x * w[None, :]
            sig = tl.sigmoid(pre)
            dpre = dpre * sig * (1.0 + pre * (1.0 - sig))

        # Weight and bias gradients from the output rows (x reloaded: L1/L2 hits, fewer live registers).
        dpre_out = tl.where(is_out[:, None], dpre, 0.0)
        db_acc += tl.sum(dpre_out, axis=0)
        for j in tl.static_range(KW):
            src = offs_r - (KW - 1) + j
            valid = is_out & (src >= 0)
            if HAS_SEQ:
                if j < KW - 1:
                    seg_src = tl.load(seg_base + src, mask=valid, other=-2)
                    valid = valid & (seg_src == seg_r)
            x = tl.load(
                x_base + src.to(tl.int64)[:, None] * stride_xl + offs_d[None, :],
                mask=valid[:, None] & mask_d[None, :], other=0.0,
            ).to(tl.float32)
            contrib = tl.sum(dpre_out * x, axis=0)
            dw_acc += tl.where(taps[None, :] == j, contrib[:, None], 0.0)

        # Input gradient of the output rows.
        w_last = tl.load(W + offs_d * stride_wd + (KW - 1) * stride_ww, mask=mask_d, other=0.0).to(tl.float32)
        dx = dpre * w_last[None, :]
        for k in tl.static_range(1, KW):
            idx = tl.minimum(rows + k, BLOCK_L - 1)
            shifted = tl.gather(dpre, tl.broadcast_to(idx[:, None], (BLOCK_L, BLOCK_D)), axis=0)
            if HAS_SEQ:
                seg_k = tl.load(seg_base + offs_r + k, mask=mask_r & (offs_r + k < L), other=-3)
                shifted = tl.where((seg_k == seg_r)[:, None], shifted, 0.0)
            w_k = tl.load(W + offs_d * stride_wd + (KW - 1 - k) * stride_ww, mask=mask_d, other=0.0).to(tl.float32)
            dx += shifted * w_k[None, :]
        dx_ptrs = DX + pid_b * stride_dxb + offs_r.to(tl.int64)[:, None] * stride_dxl + offs_d[None, :]
        tl.store(dx_ptrs, dx.to(DX.dtype.element_ty), mask=is_out[:, None] & mask_d[None, :])

    part = pid_b * stride_pb + pid_c * stride_pc
    tl.store(
        DW_PART + part + offs_d[:, None] * KW + taps[None, :], dw_acc,
        mask=mask_d[:, None] & (taps[None, :] < KW),
    )
    if HAS_BIAS:
        tl.store(DB_PART + pid_b * stride_qb + pid_c * stride_qc + offs_d, db_acc, mask=mask_d)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dim() != 3:
        raise ValueError(f"x must be [batch, seqlen, dim] (channel-last), got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        raise ValueError(f"x must have contiguous channels (stride(-1) == 1), got strides {x.stride()}")
    d = x.shape[-1]
    if weight.dim() != 2 or weight.shape[0] != d:
        raise ValueError(f"weight must be [{d}, width], got shape {tuple(weight.shape)}")
    if not 1 <= weight.shape[1] <= MAX_WIDTH:
        raise ValueError(f"kernel width must be in [1, {MAX_WIDTH}], got {weight.shape[1]}")
    if bias is not None and bias.shape != (d,):
        raise ValueError(f"bias must be [{d}], got shape {tuple(bias.shape)}")


def _conv_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, segments: torch.Tensor | None,
              silu: bool) -> torch.Tensor:
    b, l, d = x.shape
    out = torch.empty((b, l, d), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(l, FWD_BLOCK_L), triton.cdiv(d, FWD_BLOCK_D), b)
    _conv1d_fwd_kernel[grid](
        x, weight, bias, segments, out,
        l, d,
        x.stride(0), x.stride(1),
        out.stride(0), out.stride(1),
        weight.stride(0), weight.stride(1),
        segments.stride(0) if segments is not None else 0,
        HAS_BIAS=bias is not None, HAS_SEQ=segments is not None, SILU=silu, KW=weight.shape[1],
        BLOCK_L=FWD_BLOCK_L, BLOCK_D=FWD_BLOCK_D, num_warps=FWD_WARPS,
    )
    return out


def _conv_bwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, segments: torch.Tensor | None, silu: bool,
    dout: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    b, l, d = x.shape
    kw = weight.shape[1]
    dx = torch.empty((b, l, d), device=x.device, dtype=x.dtype)
    block_l = max(BWD_BLOCK_L, triton.next_power_of_2(2 * kw))  # room for the kw - 1 halo rows
    out_rows = block_l - (kw - 1)
    n_blocks = triton.cdiv(l, out_rows)
    tiles = max(1, min(n_blocks, BWD_ROWS_PER_PROGRAM // out_rows))
    chunks = triton.cdiv(n_blocks, tiles)
    dw_part = torch.zeros((b, chunks, d, kw), device=x.device, dtype=torch.float32)
    db_part = torch.zeros((b, chunks, d), device=x.device, dtype=torch.float32) if bias is not None else None
    if dx.numel() > 0:
        grid = (chunks, triton.cdiv(d, BWD_BLOCK_D), b)
        _conv1d_bwd_kernel[grid](
            x, weight, bias, segments, dout, dx, dw_part, db_part,
            l, d, tiles,
            x.stride(0), x.stride(1),
            dout.stride(0), dout.stride(1),
            dx.stride(0), dx.stride(1),
            weight.stride(0), weight.stride(1),
            segments.stride(0) if segments is not None else 0,
            dw_part.stride(0), dw_part.stride(1),
            db_part.stride(0) if db_part is not None else 0, db_part.stride(1) if db_part is not None else 0,
            HAS_BIAS=bias is not None, HAS_SEQ=segments is not None, SILU=silu, KW=kw,
            KW_PAD=triton.next_power_of_2(kw), BLOCK_L=block_l, BLOCK_D=BWD_BLOCK_D, num_warps=BWD_WARPS,
        )
    dweight = dw_part.sum(dim=(0, 1)).to(weight.dtype)
    dbias = db_part.sum(dim=(0, 1)).to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias


class _CausalConv1dChannelLast(torch.autograd.Function):
    """Saves only ``x`` (a view), the parameters and the segment ids; the pre-activation is recomputed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                segments: torch.Tensor | None, silu: bool) -> torch.Tensor:
        ctx.save_for_backward(x, weight, bias, segments)
        ctx.silu = silu
        return _conv_fwd(x, weight, bias, segments, silu)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        x, weight, bias, segments = ctx.saved_tensors
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        dx, dweight, dbias = _conv_bwd(x, weight, bias, segments, ctx.silu, dout)
        return (
            dx if ctx.needs_input_grad[0] else None,
            dweight if ctx.needs_input_grad[1] else None,
            dbias if bias is not None and ctx.needs_input_grad[2] else None,
            None,
            None,
        )


def causal_conv1d_channel_last_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    seq_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal depthwise conv of channel-last ``x`` [b, l, d] (``stride(-1) == 1``, other strides free) -> [b, l, d].

    ``weight`` [d, w] (w <= ``MAX_WIDTH``), ``bias`` [d], ``activation`` None | "silu" | "swish", ``seq_idx`` [b, l]
    integer document ids. Differentiable in ``x``, ``weight`` and ``bias``. The output is a new contiguous tensor in
    ``x``'s dtype; parameters may be float32 (autocast training) while ``x`` is bf16, without any cast kernel.
    """
    silu = check_activation(activation)
    _check(x, weight, bias)
    segments = None
    if seq_idx is not None:
        if seq_idx.shape != x.shape[:2]:
            raise ValueError(f"seq_idx must be {tuple(x.shape[:2])}, got shape {tuple(seq_idx.shape)}")
        segments = segment_ids(seq_idx).to(torch.int32).contiguous()
    return _CausalConv1dChannelLast.apply(x, weight, bias, segments, silu)
