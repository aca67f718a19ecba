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
hits). The pre-activation is never saved: the backward recomputes it from ``x`` (a view of ``in_proj``'s output, which
the scan and the norm keep alive anyway). Backward, in two passes: pass 1 walks ``BWD_ROWS_PER_PROGRAM`` output rows
of a channel block, recomputes the pre-activation once per element, writes ``dpre = dout * silu'(pre)`` to a
``[b, l, d]`` buffer (``DPRE_DTYPE``: by default ``x``'s dtype) and accumulates the weight and bias gradients; pass 2
computes ``dx`` from ``w`` shifted loads of ``dpre`` (or of ``dout`` itself without activation). Memory-bound: ~50
instructions per element in pass 1 (ptxas, sm_90). Two single-pass variants measured slower and were dropped: one
recomputing the pre-activation at each of the ``w`` shifts (no buffer, ~135 instructions per element; H200 0.50 vs
0.39 ms), and one passing each tile's dpre to the next through a two-tile float32 ring per program in L2, with
barriers (H100 0.48 vs 0.43 ms).

``dpre`` is stored in ``x``'s dtype: for bf16 that is one more rounding (of the value ``dx`` is a 4-term sum of, just
as PyTorch's own bf16 autograd of SiLU then conv rounds it) and saves a quarter of the backward's memory traffic
(0.43 -> 0.34 ms on an H100 at the 800M layer shape). ``DPRE_DTYPE = torch.float32`` keeps it exact.

The weight and bias gradients are accumulated per tap in registers, reduced once per program into float32
partials, and finished with one ``sum`` (deterministic: no atomics). The first version shifted ``dpre`` between threads
with ``tl.gather`` and reduced every tile (shared memory and barriers): 0.94 ms for ~0.1 ms of memory traffic.

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

MAX_WIDTH = 8  # taps are unrolled at compile time (and the backward has 8 named tap accumulators); Mamba uses 4
# Tile shapes and the backward's algorithm: module globals read at every call, so ``benchmarks/gpu_model.py --parts
# conv`` can sweep them (and keeps the fastest for the rest of its run). Fixed constants rather than triton.autotune:
# the weight-gradient reduction order depends on the tiles, and a timing-dependent choice would make gradients differ
# from run to run.
# Values: the fastest of the sweep on an H200 at the 800M layer shape (b4, L4096, 4096 channels, bf16; 2026-11-22):
# forward 0.109 ms, backward 0.394 ms, from 0.17 / 1.48 ms before; on an H100 (2026-12-07, dpre in bf16): forward
# 0.121 ms, backward 0.328 ms with 1024 rows per backward program (512: 0.339 ms).
FWD_BLOCK_L, FWD_BLOCK_D, FWD_WARPS = 16, 128, 4
BWD_BLOCK_L, BWD_BLOCK_D, BWD_WARPS = 16, 32, 2  # pass 1 of the backward; ptxas sm_90: no spills
BWD_ROWS_PER_PROGRAM = 1024  # sequence positions one backward program walks (bounds the weight-grad partials)
DX_BLOCK_L, DX_BLOCK_D, DX_WARPS = 32, 128, 4  # pass 2 of the backward
DPRE_DTYPE: torch.dtype | None = None  # the dtype of pass 1's dpre buffer; None: x's dtype


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
def _tap_input(x_base, seg_base, offs_t, mask_t, seg_t, offs_d, mask_d, stride_xl,
               j: tl.constexpr, KW: tl.constexpr, HAS_SEQ: tl.constexpr):
    """float32 ``x[t - (KW - 1) + j]`` on the rows ``t`` of a tile where tap ``j`` of output ``t`` is live, else 0
    (before position 0, or in another document segment than ``t``; the last tap is the token itself)."""
    src = offs_t - (KW - 1) + j
    valid = mask_t & (src >= 0)
    if HAS_SEQ:
        if j < KW - 1:
            seg_src = tl.load(seg_base + src, mask=valid, other=-2)
            valid = valid & (seg_src == seg_t)
    return tl.load(
        x_base + src.to(tl.int64)[:, None] * stride_xl + offs_d[None, :],
        mask=valid[:, None] & mask_d[None, :], other=0.0,
    ).to(tl.float32)


@triton.jit
def _silu_grad(g, pre):
    """``g * silu'(pre)``."""
    sig = tl.sigmoid(pre)
    return g * sig * (1.0 + pre * (1.0 - sig))


@triton.jit
def _acc_tap(acc, value, tap: tl.constexpr, slot: tl.constexpr):
    # One register accumulator per weight tap (Triton has no arrays of tensors): ``slot`` names the accumulator, and
    # only the one whose slot equals ``tap`` grows. Accumulators of slots >= KW are never updated, so the compiler
    # drops them from the loop.
    if tap == slot:
        acc += value
    return acc


@triton.jit
def _store_tap(dw_row, acc, offs_d, mask_d, slot: tl.constexpr, KW: tl.constexpr):
    if slot < KW:
        tl.store(dw_row + offs_d * KW + slot, tl.sum(acc, axis=0), mask=mask_d)


@triton.jit
def _store_partials(DW_PART, DB_PART, pid_b, pid_c, stride_pb, stride_pc, stride_qb, stride_qc, offs_d, mask_d,
                    a0, a1, a2, a3, a4, a5, a6, a7, adb, HAS_BIAS: tl.constexpr, KW: tl.constexpr):
    """Rows summed once per program (one cross-thread reduction per tap, not per tile), then float32 partials."""
    dw_row = DW_PART + pid_b * stride_pb + pid_c * stride_pc
    _store_tap(dw_row, a0, offs_d, mask_d, 0, KW)
    _store_tap(dw_row, a1, offs_d, mask_d, 1, KW)
    _store_tap(dw_row, a2, offs_d, mask_d, 2, KW)
    _store_tap(dw_row, a3, offs_d, mask_d, 3, KW)
    _store_tap(dw_row, a4, offs_d, mask_d, 4, KW)
    _store_tap(dw_row, a5, offs_d, mask_d, 5, KW)
    _store_tap(dw_row, a6, offs_d, mask_d, 6, KW)
    _store_tap(dw_row, a7, offs_d, mask_d, 7, KW)
    if HAS_BIAS:
        tl.store(DB_PART + pid_b * stride_qb + pid_c * stride_qc + offs_d, tl.sum(adb, axis=0), mask=mask_d)


@triton.jit
def _conv1d_bwd_dpre_kernel(
    X, W, BIAS, SEG, DOUT, DPRE, DW_PART, DB_PART,
    L, D, TILES,
    stride_xb, stride_xl,
    stride_gb, stride_gl,
    stride_eb, stride_el,
    stride_wd, stride_ww,
    stride_sb,
    stride_pb, stride_pc,
    stride_qb, stride_qc,
    HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr, KW: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Pass 1 of the backward. Rows t of a tile are output positions: dpre[t] = dout[t] * silu'(pre[t])
    # (pre recomputed once, as in the forward), written to DPRE under SiLU for pass 2, and
    #   dweight[j] += sum_t dpre[t] * x[t - (KW - 1) + j] (live taps only), dbias += sum_t dpre[t].
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    rows = tl.arange(0, BLOCK_L)
    x_base = X + pid_b * stride_xb
    g_base = DOUT + pid_b * stride_gb
    seg_base = SEG  # unused (None) without documents
    if HAS_SEQ:
        seg_base = SEG + pid_b * stride_sb
    if HAS_BIAS:
        bias = tl.load(BIAS + offs_d, mask=mask_d, other=0.0).to(tl.float32)

    zero = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    a0, a1, a2, a3, a4, a5, a6, a7, adb = zero, zero, zero, zero, zero, zero, zero, zero, zero
    for tile in range(TILES):
        offs_t = (pid_c * TILES + tile) * BLOCK_L + rows
        mask_t = offs_t < L
        seg_t = offs_t  # placeholder without documents
        if HAS_SEQ:
            seg_t = tl.load(seg_base + offs_t, mask=mask_t, other=-1)
        g = tl.load(
            g_base + offs_t.to(tl.int64)[:, None] * stride_gl + offs_d[None, :],
            mask=mask_t[:, None] & mask_d[None, :], other=0.0,
        ).to(tl.float32)
        if SILU:
            pre = zero
            if HAS_BIAS:
                pre += bias[None, :]
            for j in tl.static_range(KW):
                xs = _tap_input(x_base, seg_base, offs_t, mask_t, seg_t, offs_d, mask_d, stride_xl, j, KW, HAS_SEQ)
                w_j = tl.load(W + offs_d * stride_wd + j * stride_ww, mask=mask_d, other=0.0).to(tl.float32)
                pre += xs * w_j[None, :]
            g = _silu_grad(g, pre)
        adb += g
        # The same tap inputs again (identical loads: L1 hits or merged by the compiler; fewer live registers than
        # keeping KW tiles across the sigmoid).
        for j in tl.static_range(KW):
            prod = g * _tap_input(x_base, seg_base, offs_t, mask_t, seg_t, offs_d, mask_d, stride_xl, j, KW, HAS_SEQ)
            a0 = _acc_tap(a0, prod, j, 0)
            a1 = _acc_tap(a1, prod, j, 1)
            a2 = _acc_tap(a2, prod, j, 2)
            a3 = _acc_tap(a3, prod, j, 3)
            a4 = _acc_tap(a4, prod, j, 4)
            a5 = _acc_tap(a5, prod, j, 5)
            a6 = _acc_tap(a6, prod, j, 6)
            a7 = _acc_tap(a7, prod, j, 7)
        if SILU:
            e_ptrs = DPRE + pid_b * stride_eb + offs_t.to(tl.int64)[:, None] * stride_el + offs_d[None, :]
            tl.store(e_ptrs, g.to(DPRE.dtype.element_ty), mask=mask_t[:, None] & mask_d[None, :])
    _store_partials(DW_PART, DB_PART, pid_b, pid_c, stride_pb, stride_pc, stride_qb, stride_qc, offs_d, mask_d,
                    a0, a1, a2, a3, a4, a5, a6, a7, adb, HAS_BIAS, KW)


@triton.jit
def _conv1d_bwd_dx_kernel(
    G, W, SEG, DX,
    L, D,
    stride_gb, stride_gl,
    stride_dxb, stride_dxl,
    stride_wd, stride_ww,
    stride_sb,
    HAS_SEQ: tl.constexpr, KW: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Pass 2 of the two-pass backward: dx[r] = sum_k weight[KW - 1 - k] * dpre[r + k] over live taps, from KW shifted
    # loads of dpre (pass 1's buffer, or dout itself without activation), like the forward's shifted loads of x.
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_r = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_r = offs_r < L
    mask_d = offs_d < D
    g_base = G + pid_b * stride_gb
    if HAS_SEQ:
        seg_base = SEG + pid_b * stride_sb
        seg_r = tl.load(seg_base + offs_r, mask=mask_r, other=-1)
    dx = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(KW):
        offs_t = offs_r + k
        valid = offs_t < L
        if HAS_SEQ:
            if k > 0:
                seg_t = tl.load(seg_base + offs_t, mask=valid, other=-2)
                valid = valid & (seg_t == seg_r)
        g = tl.load(
            g_base + offs_t.to(tl.int64)[:, None] * stride_gl + offs_d[None, :],
            mask=valid[:, None] & mask_d[None, :], other=0.0,
        ).to(tl.float32)
        w_k = tl.load(W + offs_d * stride_wd + (KW - 1 - k) * stride_ww, mask=mask_d, other=0.0).to(tl.float32)
        dx += g * w_k[None, :]
    dx_ptrs = DX + pid_b * stride_dxb + offs_r.to(tl.int64)[:, None] * stride_dxl + offs_d[None, :]
    tl.store(dx_ptrs, dx.to(DX.dtype.element_ty), mask=mask_r[:, None] & mask_d[None, :])


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
    dout: torch.Tensor, dx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of ``x``, ``weight``, ``bias``. ``dout`` needs contiguous channels; ``dx``, if given, is the view
    (contiguous channels) to write x's gradient into."""
    b, l, d = x.shape
    kw = weight.shape[1]
    if dx is None:
        dx = torch.empty((b, l, d), device=x.device, dtype=x.dtype)
    block_l = BWD_BLOCK_L
    n_tiles = triton.cdiv(l, block_l)
    tiles = max(1, min(n_tiles, BWD_ROWS_PER_PROGRAM // block_l))
    chunks = triton.cdiv(n_tiles, tiles)
    # Every (batch, chunk, channel, tap) partial is written by exactly one program: no zero fill needed. The fixed
    # tile walk makes the reduction order, hence the weight gradient, bitwise reproducible for given tile constants.
    dw_part = torch.empty((b, chunks, d, kw), device=x.device, dtype=torch.float32)
    db_part = torch.empty((b, chunks, d), device=x.device, dtype=torch.float32) if bias is not None else None
    if dx.numel() > 0:
        seg_stride = segments.stride(0) if segments is not None else 0
        db_strides = (db_part.stride(0), db_part.stride(1)) if db_part is not None else (0, 0)
        # Pass 1 writes dpre (under SiLU; without activation dpre is dout itself) and the parameter partials;
        # pass 2 turns dpre into dx. DPRE_DTYPE float32 keeps dx as exact as a single pass would.
        dpre = torch.empty((b, l, d), device=x.device, dtype=DPRE_DTYPE or x.dtype) if silu else dout
        _conv1d_bwd_dpre_kernel[(chunks, triton.cdiv(d, BWD_BLOCK_D), b)](
            x, weight, bias, segments, dout, dpre, dw_part, db_part,
            l, d, tiles,
            x.stride(0), x.stride(1),
            dout.stride(0), dout.stride(1),
            dpre.stride(0), dpre.stride(1),
            weight.stride(0), weight.stride(1),
            seg_stride, dw_part.stride(0), dw_part.stride(1), *db_strides,
            HAS_BIAS=bias is not None, HAS_SEQ=segments is not None, SILU=silu, KW=kw,
            BLOCK_L=block_l, BLOCK_D=BWD_BLOCK_D, num_warps=BWD_WARPS,
        )
        _conv1d_bwd_dx_kernel[(triton.cdiv(l, DX_BLOCK_L), triton.cdiv(d, DX_BLOCK_D), b)](
            dpre, weight, segments, dx,
            l, d,
            dpre.stride(0), dpre.stride(1),
            dx.stride(0), dx.stride(1),
            weight.stride(0), weight.stride(1),
            seg_stride,
            HAS_SEQ=segments is not None, KW=kw, BLOCK_L=DX_BLOCK_L, BLOCK_D=DX_BLOCK_D, num_warps=DX_WARPS,
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
