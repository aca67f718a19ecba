"""Triton chunked SSD scan (Mamba-2) for training: forward and a hand-written backward, documents included.

Why it exists: mamba_ssm's ``mamba_chunk_scan_combined`` spends ~2 ms of kernels and 4-6 ms of wall time on a
forward + backward at the 800M layer shape (b4, L4096, 32 heads x 64, 8 groups, d_state 128; H100), much of the wall
time launching ~25 kernels and torch ops from Python. Here the forward is three kernels and the backward six, each
doing a whole chunk's worth of work, and the B / C / x gradients are written once, in their final dtype: 1.25 ms of
kernels and 2.2 ms of wall time on the same shape and GPU (``benchmarks/README.md``).

Semantics are those of ``ops.ssd_chunk_scan_ref`` (read its docstring for the chunked form) without ``z`` (the
dispatcher applies the gate in torch) and with ``D`` of shape [h] or None. Per chunk of ``Q`` tokens, with ``dt``
processed (bias, softplus, clamp), ``a = cumsum(dt * A)`` inside the chunk and ``H_c`` the state entering chunk ``c``::

    y_t      = sum_{s <= t} (C_t . B_s) exp(a_t - a_s) dt_s x_s  +  exp(a_t) H_c C_t  +  D x_t
    L_c      = sum_s exp(a_last - a_s) dt_s x_s B_s^T                      (the chunk's own contribution)
    H_{c+1}  = exp(a_last) H_c + L_c

With documents (``seg``: monotone segment ids, ``_common.segment_ids``) a pair (t, s) counts only inside one segment,
``L_c`` only takes tokens of the segment of the chunk's last token, ``H_c`` reaches only tokens of the segment of the
previous chunk's last token, and the decay between chunks is 0 where the segment changes.

Forward kernels: ``_chunk_state_fwd`` (processed dt and the in-chunk cumsum, stored as float32 [b*h, L]; ``L_c``),
``_state_passing_fwd`` (the recurrence over chunks, ``H_c`` in the input dtype, the final state in float32),
``_chunk_scan_fwd`` (``y``). Backward: ``_chunk_dstate_bwd`` (what ``y`` sends back to ``H_c``), ``_state_passing_bwd``
(the recurrence in reverse: the gradient of each ``L_c`` and of each chunk's total decay), ``_chunk_scan_bwd_dx_db``
(x and B gradients, the dt gradient before its cumsum term; one program per block of positions of one group, looping
over its heads so B's gradient is summed in registers), ``_chunk_scan_bwd_dc`` (C's gradient, the same way) and
``_dt_bwd`` (the reverse cumsum of the log-decay gradient, then through clamp, softplus and bias). Gradients of the
log-decays arrive from several programs through float32 atomic adds into one [b*h, L] buffer.

The forward keeps ``H_c`` for the backward (b x chunks x h x p x n in the input dtype: 67 MB per layer at the 800M
shape, +1.4 GB peak in the 800M b4 training step) where mamba_ssm recomputes its states. Matmuls take operands in the
input dtype with float32 accumulation (like mamba_ssm); float32 inputs use IEEE float32 dots. Importing this module
imports triton; ``ops.backend`` only does that on CUDA tensors. Under ``TRITON_INTERPRET=1`` the same kernels run on
CPU tensors, which is how the tests check them without a GPU.
"""

from __future__ import annotations

import math

import torch

from megatron_hybrid.ops._triton_common import UNAVAILABLE_REASON, tl, triton

if triton is not None:
    from megatron_hybrid.ops._triton_common import softplus

__all__ = ["UNAVAILABLE_REASON", "ssd_chunk_scan_triton", "unsupported_reason"]

# Token block of the scan kernels (rows of the [block, block] score tiles); min(chunk_size, BLOCK_T) is used. Module
# globals read at each call so that tests can shrink them and benchmarks sweep them.
BLOCK_T = 64
PASSING_BLOCK = 1024  # state elements per program of the two state-passing kernels
# Warps and pipeline stages per kernel: the fastest of ``benchmarks/gpu_model.py --parts ssd``'s sweep on an H100 at the
# 800M layer shape (b4, L4096, bf16; 2026-12-07). Eight warps or three stages were slower for every kernel.
WARPS = {"state": 4, "passing": 4, "scan": 4, "dstate": 4, "dx_db": 4, "dc": 4, "dt": 4}
STAGES = {"state": 2, "scan": 1, "dstate": 2, "dx_db": 1, "dc": 1}
# The largest shapes run on a GPU so far (headdim 64, d_state 128: every Mamba-2 / Nemotron-H size); larger tiles may
# exceed registers or shared memory, so they go to mamba_ssm's kernels until measured.
MAX_HEADDIM = 64
MAX_DSTATE = 128
MAX_CHUNK = 256


def unsupported_reason(
    x: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int, D: torch.Tensor | None
) -> str | None:
    """Why these kernels cannot run the scan (None when they can); the dispatcher then uses mamba_ssm's kernels."""
    p, n = x.shape[-1], B.shape[-1]
    if chunk_size < 16 or chunk_size > MAX_CHUNK or chunk_size & (chunk_size - 1):
        return f"chunk_size {chunk_size} is not a power of two in [16, {MAX_CHUNK}]"
    if p > MAX_HEADDIM:
        return f"headdim {p} > {MAX_HEADDIM}"
    if n > MAX_DSTATE:
        return f"d_state {n} > {MAX_DSTATE}"
    if D is not None and D.dim() != 1:
        return "D of shape [nheads, headdim]"
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {x.dtype}"
    if B.dtype != x.dtype or C.dtype != x.dtype:
        return f"mixed dtypes (x {x.dtype}, B {B.dtype}, C {C.dtype})"
    return None


if triton is not None:

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        """``tl.dot`` with float32 accumulation; IEEE float32 products for float32 inputs (else TF32 on GPUs)."""
        if IEEE:
            out = tl.dot(a, b, input_precision="ieee")
        else:
            out = tl.dot(a, b)
        return out

    @triton.jit
    def _rows(base, pos, valid, stride_l, cols, ncols):
        """The [positions, columns] tile at ``base + pos * stride_l + col`` (columns contiguous), 0 where masked.
        Offsets in int64: a position times the row stride of the conv output passes 2**31 beyond ~200K tokens."""
        return tl.load(base + pos.to(tl.int64)[:, None] * stride_l + cols[None, :],
                       mask=valid[:, None] & (cols[None, :] < ncols), other=0.0)

    @triton.jit
    def _rows_t(base, pos, valid, stride_l, cols, ncols):
        """The same tile transposed: [columns, positions]."""
        return tl.load(base + pos.to(tl.int64)[None, :] * stride_l + cols[:, None],
                       mask=valid[None, :] & (cols[:, None] < ncols), other=0.0)

    @triton.jit
    def _segment_before(seg_row, start):
        """Segment of the token before position ``start``: the one the state entering there belongs to (0 before the
        sequence, mamba_ssm's rule)."""
        return tl.where(start > 0, tl.load(seg_row + tl.maximum(start - 1, 0)), 0)

    @triton.jit
    def _segment_of_last(seg_row, start, Q, seqlen):
        """Segment of the last token of the chunk that starts at ``start``: the one its outgoing state belongs to."""
        return tl.load(seg_row + tl.minimum(start + Q, seqlen) - 1)

    @triton.jit
    def _processed_dt(DT, DT_BIAS, dt_base, pos, valid, stride_dtl, hh,
                      dt_min, dt_max, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
        """Raw dt at ``pos`` (+ bias), it after the softplus (before the clamp), and the processed dt (clamped; 0 where
        not valid)."""
        raw = tl.load(DT + dt_base + pos.to(tl.int64) * stride_dtl, mask=valid, other=0.0).to(tl.float32)
        if HAS_BIAS:
            raw += tl.load(DT_BIAS + hh).to(tl.float32)
        unclamped = raw
        if SOFTPLUS:
            unclamped = softplus(raw)
        dt = tl.minimum(tl.maximum(unclamped, dt_min), dt_max)
        return raw, unclamped, tl.where(valid, dt, 0.0)

    @triton.jit
    def _chunk_state_fwd(
        X, DT, A, DT_BIAS, B, SEG, DTP, ACS, STATES,
        seqlen, nheads, heads_per_group, padded_len,
        stride_xb, stride_xl, stride_xh, stride_dtb, stride_dtl, stride_dth,
        stride_bb, stride_bl, stride_bg, stride_segb,
        dt_min, dt_max,
        P: tl.constexpr, N: tl.constexpr, Q: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK: tl.constexpr,
        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEG: tl.constexpr, IEEE: tl.constexpr,
    ):
        pid_c = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // nheads).to(tl.int64)
        hh = pid_bh % nheads
        g = hh // heads_per_group
        start = pid_c * Q
        A_h = tl.load(A + hh).to(tl.float32)
        dt_base = b * stride_dtb + hh * stride_dth
        row = pid_bh.to(tl.int64) * padded_len + start
        offs_p = tl.arange(0, BLOCK_P)
        offs_n = tl.arange(0, BLOCK_N)

        # Pass 1: processed dt and the running log-decay inside the chunk.
        a_last = 0.0
        for t0 in range(0, Q, BLOCK):
            offs = t0 + tl.arange(0, BLOCK)
            pos = start + offs
            _, _, dt = _processed_dt(DT, DT_BIAS, dt_base, pos, pos < seqlen, stride_dtl, hh, dt_min, dt_max,
                                     HAS_BIAS, SOFTPLUS)
            a = a_last + tl.cumsum(dt * A_h, 0)
            tl.store(DTP + row + offs, dt)
            tl.store(ACS + row + offs, a)
            a_last += tl.sum(dt * A_h, 0)

        # Pass 2: L_c = sum_s exp(a_last - a_s) dt_s x_s B_s^T over the tokens of the last token's segment.
        if HAS_SEG:
            seg_last = _segment_of_last(SEG + b * stride_segb, start, Q, seqlen)
        acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
        a_run = 0.0
        for t0 in range(0, Q, BLOCK):
            offs = t0 + tl.arange(0, BLOCK)
            pos = start + offs
            valid = pos < seqlen
            _, _, dt = _processed_dt(DT, DT_BIAS, dt_base, pos, valid, stride_dtl, hh, dt_min, dt_max,
                                  HAS_BIAS, SOFTPLUS)
            a = a_run + tl.cumsum(dt * A_h, 0)
            a_run += tl.sum(dt * A_h, 0)
            scale = dt * tl.exp(a_last - a)
            if HAS_SEG:
                seg = tl.load(SEG + b * stride_segb + pos, mask=valid, other=-1)
                scale = tl.where(seg == seg_last, scale, 0.0)
            x = _rows(X + b * stride_xb + hh * stride_xh, pos, valid, stride_xl, offs_p, P)
            bm = _rows(B + b * stride_bb + g * stride_bg, pos, valid, stride_bl, offs_n, N)
            xs = (x.to(tl.float32) * scale[:, None]).to(X.dtype.element_ty)
            acc += _dot(tl.trans(xs), bm, IEEE)
        out = STATES + ((b * tl.num_programs(0) + pid_c) * nheads + hh) * (P * N)
        tl.store(out + offs_p[:, None] * N + offs_n[None, :], acc,
                 mask=(offs_p[:, None] < P) & (offs_n[None, :] < N))

    @triton.jit
    def _state_passing_fwd(
        STATES, ACS, SEG, INIT, H, FINAL,
        seqlen, nheads, nchunks, padded_len, stride_segb,
        PN: tl.constexpr, Q: tl.constexpr, BLOCK: tl.constexpr,
        HAS_SEG: tl.constexpr, HAS_INIT: tl.constexpr,
    ):
        pid = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // nheads).to(tl.int64)
        hh = pid_bh % nheads
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < PN
        if HAS_INIT:
            running = tl.load(INIT + pid_bh.to(tl.int64) * PN + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            running = tl.zeros((BLOCK,), dtype=tl.float32)
        seg_prev = 0
        for c in range(nchunks):
            slot = ((b * nchunks + c) * nheads + hh) * PN
            tl.store(H + slot + offs, running.to(H.dtype.element_ty), mask=mask)
            alpha = tl.exp(tl.load(ACS + pid_bh.to(tl.int64) * padded_len + c * Q + Q - 1))
            if HAS_SEG:
                seg_last = _segment_of_last(SEG + b * stride_segb, c * Q, Q, seqlen)
                alpha = tl.where(seg_last == seg_prev, alpha, 0.0)
                seg_prev = seg_last
            running = alpha * running + tl.load(STATES + slot + offs, mask=mask, other=0.0)
        tl.store(FINAL + pid_bh.to(tl.int64) * PN + offs, running, mask=mask)

    @triton.jit
    def _chunk_scan_fwd(
        X, B, C, D, SEG, DTP, ACS, H, Y,
        seqlen, nheads, heads_per_group, padded_len,
        stride_xb, stride_xl, stride_xh, stride_bb, stride_bl, stride_bg,
        stride_cb, stride_cl, stride_cg, stride_yb, stride_yl, stride_yh, stride_segb,
        P: tl.constexpr, N: tl.constexpr, Q: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK: tl.constexpr,
        HAS_D: tl.constexpr, HAS_SEG: tl.constexpr, IEEE: tl.constexpr,
    ):
        pid_t = tl.program_id(0)
        pid_c = tl.program_id(1)
        pid_bh = tl.program_id(2)
        nchunks = tl.num_programs(1)
        b = (pid_bh // nheads).to(tl.int64)
        hh = pid_bh % nheads
        g = hh // heads_per_group
        start = pid_c * Q
        row = pid_bh.to(tl.int64) * padded_len + start
        offs_p = tl.arange(0, BLOCK_P)
        offs_n = tl.arange(0, BLOCK_N)
        offs_t = pid_t * BLOCK + tl.arange(0, BLOCK)
        pos_t = start + offs_t
        valid_t = pos_t < seqlen
        a_t = tl.load(ACS + row + offs_t)
        c_t = _rows(C + b * stride_cb + g * stride_cg, pos_t, valid_t, stride_cl, offs_n, N)
        if HAS_SEG:
            seg_t = tl.load(SEG + b * stride_segb + pos_t, mask=valid_t, other=-1)

        # The carried state: exp(a_t) H_c C_t for tokens of the previous chunk's last segment.
        h = tl.load(H + ((b * nchunks + pid_c) * nheads + hh) * (P * N) + offs_p[None, :] * N + offs_n[:, None],
                    mask=(offs_p[None, :] < P) & (offs_n[:, None] < N), other=0.0)  # H_c^T [n, p]
        scale_t = tl.exp(a_t)
        if HAS_SEG:
            scale_t = tl.where(seg_t == _segment_before(SEG + b * stride_segb, start), scale_t, 0.0)
        acc = _dot(c_t, h, IEEE) * scale_t[:, None]

        # Within the chunk, blocks of source tokens up to the diagonal.
        for s0 in range(0, (pid_t + 1) * BLOCK, BLOCK):
            offs_s = s0 + tl.arange(0, BLOCK)
            pos_s = start + offs_s
            valid_s = pos_s < seqlen
            b_s = _rows_t(B + b * stride_bb + g * stride_bg, pos_s, valid_s, stride_bl, offs_n, N)  # B_s^T [n, s]
            x_s = _rows(X + b * stride_xb + hh * stride_xh, pos_s, valid_s, stride_xl, offs_p, P)
            a_s = tl.load(ACS + row + offs_s)
            dt_s = tl.load(DTP + row + offs_s)
            cb = _dot(c_t, b_s, IEEE)
            keep = offs_t[:, None] >= offs_s[None, :]
            if HAS_SEG:
                seg_s = tl.load(SEG + b * stride_segb + pos_s, mask=valid_s, other=-2)
                keep = keep & (seg_t[:, None] == seg_s[None, :])
            decay = tl.exp(tl.where(keep, a_t[:, None] - a_s[None, :], float("-inf")))
            m = (cb * decay * dt_s[None, :]).to(X.dtype.element_ty)
            acc += _dot(m, x_s, IEEE)

        x_t = _rows(X + b * stride_xb + hh * stride_xh, pos_t, valid_t, stride_xl, offs_p, P)
        if HAS_D:
            acc += tl.load(D + hh).to(tl.float32) * x_t.to(tl.float32)
        tl.store(Y + b * stride_yb + pos_t.to(tl.int64)[:, None] * stride_yl + hh * stride_yh + offs_p[None, :],
                 acc.to(Y.dtype.element_ty), mask=valid_t[:, None] & (offs_p[None, :] < P))

    @triton.jit
    def _chunk_dstate_bwd(
        DY, C, SEG, ACS, DSY,
        seqlen, nheads, heads_per_group, padded_len,
        stride_dyb, stride_dyl, stride_dyh, stride_cb, stride_cl, stride_cg, stride_segb,
        P: tl.constexpr, N: tl.constexpr, Q: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK: tl.constexpr,
        HAS_SEG: tl.constexpr, IEEE: tl.constexpr,
    ):
        """dL/dH_c from y: sum_t exp(a_t) dy_t^T C_t over the tokens that see H_c."""
        pid_c = tl.program_id(0)
        pid_bh = tl.program_id(1)
        nchunks = tl.num_programs(0)
        b = (pid_bh // nheads).to(tl.int64)
        hh = pid_bh % nheads
        g = hh // heads_per_group
        start = pid_c * Q
        row = pid_bh.to(tl.int64) * padded_len + start
        offs_p = tl.arange(0, BLOCK_P)
        offs_n = tl.arange(0, BLOCK_N)
        if HAS_SEG:
            seg_prev = _segment_before(SEG + b * stride_segb, start)
        acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
        for t0 in range(0, Q, BLOCK):
            offs = t0 + tl.arange(0, BLOCK)
            pos = start + offs
            valid = pos < seqlen
            scale = tl.exp(tl.load(ACS + row + offs))
            if HAS_SEG:
                seg = tl.load(SEG + b * stride_segb + pos, mask=valid, other=-1)
                scale = tl.where(seg == seg_prev, scale, 0.0)
            dy = _rows_t(DY + b * stride_dyb + hh * stride_dyh, pos, valid, stride_dyl, offs_p, P)  # dy^T [p, t]
            c = _rows(C + b * stride_cb + g * stride_cg, pos, valid, stride_cl, offs_n, N)
            cs = (c.to(tl.float32) * scale[:, None]).to(C.dtype.element_ty)
            acc += _dot(dy, cs, IEEE)
        out = DSY + ((b * nchunks + pid_c) * nheads + hh) * (P * N)
        tl.store(out + offs_p[:, None] * N + offs_n[None, :], acc,
                 mask=(offs_p[:, None] < P) & (offs_n[None, :] < N))

    @triton.jit
    def _state_passing_bwd(
        DSY, H, ACS, SEG, DFINAL, DL, DA, DINIT,
        seqlen, nheads, nchunks, padded_len, stride_segb,
        PN: tl.constexpr, Q: tl.constexpr, BLOCK: tl.constexpr,
        HAS_SEG: tl.constexpr, HAS_DFINAL: tl.constexpr, HAS_INIT: tl.constexpr,
    ):
        """Reverse of H_{c+1} = alpha_c H_c + L_c: dL_c = G_{c+1}, d alpha_c = <G_{c+1}, H_c>,
        G_c = dL/dH_c (from y) + alpha_c G_{c+1}; G_0 is the initial state's gradient."""
        pid = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // nheads).to(tl.int64)
        hh = pid_bh % nheads
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < PN
        if HAS_DFINAL:
            running = tl.load(DFINAL + pid_bh.to(tl.int64) * PN + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            running = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in range(nchunks):
            c = nchunks - 1 - i
            slot = ((b * nchunks + c) * nheads + hh) * PN
            tl.store(DL + slot + offs, running.to(DL.dtype.element_ty), mask=mask)
            last = pid_bh.to(tl.int64) * padded_len + c * Q + Q - 1
            alpha = tl.exp(tl.load(ACS + last))
            if HAS_SEG:
                seg_row = SEG + b * stride_segb
                same = _segment_of_last(seg_row, c * Q, Q, seqlen) == _segment_before(seg_row, c * Q)
                alpha = tl.where(same, alpha, 0.0)
            h = tl.load(H + slot + offs, mask=mask, other=0.0).to(tl.float32)
            tl.atomic_add(DA + last, tl.sum(running * h, 0) * alpha)
            running = tl.load(DSY + slot + offs, mask=mask, other=0.0) + alpha * running
        if HAS_INIT:
            tl.store(DINIT + pid_bh.to(tl.int64) * PN + offs, running, mask=mask)

    @triton.jit
    def _chunk_scan_bwd_dx_db(
        X, B, C, DY, D, SEG, DTP, ACS, DL, DX, DB, DA, DDT, DD,
        seqlen, nheads, heads_per_group, padded_len,
        stride_xb, stride_xl, stride_xh, stride_bb, stride_bl, stride_bg, stride_cb, stride_cl, stride_cg,
        stride_dyb, stride_dyl, stride_dyh, stride_dxb, stride_dxl, stride_dxh,
        stride_dbb, stride_dbl, stride_dbg, stride_segb,
        P: tl.constexpr, N: tl.constexpr, Q: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK: tl.constexpr,
        HAS_D: tl.constexpr, HAS_SEG: tl.constexpr, IEEE: tl.constexpr,
    ):
        """One block of source positions s of one chunk and group, looping over the group's heads: dx_s, dB_s (summed
        over heads), the dt gradient without its cumsum term, and the log-decay gradients (atomics into DA)."""
        pid_s = tl.program_id(0)
        pid_c = tl.program_id(1)
        pid_bg = tl.program_id(2)
        nchunks = tl.num_programs(1)
        ngroups = nheads // heads_per_group
        b = (pid_bg // ngroups).to(tl.int64)
        g = pid_bg % ngroups
        start = pid_c * Q
        offs_p = tl.arange(0, BLOCK_P)
        offs_n = tl.arange(0, BLOCK_N)
        offs_s = pid_s * BLOCK + tl.arange(0, BLOCK)
        pos_s = start + offs_s
        valid_s = pos_s < seqlen
        mask_sp = valid_s[:, None] & (offs_p[None, :] < P)
        b_s = _rows(B + b * stride_bb + g * stride_bg, pos_s, valid_s, stride_bl, offs_n, N)
        if HAS_SEG:
            seg_s = tl.load(SEG + b * stride_segb + pos_s, mask=valid_s, other=-1)
            seg_last = _segment_of_last(SEG + b * stride_segb, start, Q, seqlen)
        db_acc = tl.zeros((BLOCK, BLOCK_N), dtype=tl.float32)
        for hi in range(heads_per_group):
            hh = g * heads_per_group + hi
            bh = b * nheads + hh
            row = bh * padded_len + start
            a_s = tl.load(ACS + row + offs_s)
            dt_s = tl.load(DTP + row + offs_s)
            a_last = tl.load(ACS + row + Q - 1)
            x_s = _rows(X + b * stride_xb + hh * stride_xh, pos_s, valid_s, stride_xl, offs_p, P)
            dl = tl.load(DL + ((b * nchunks + pid_c) * nheads + hh) * (P * N) + offs_p[:, None] * N
                         + offs_n[None, :], mask=(offs_p[:, None] < P) & (offs_n[None, :] < N), other=0.0)
            # The chunk's own state L_c = sum_s e_s dt_s x_s B_s^T, e_s = exp(a_last - a_s).
            e_s = tl.exp(a_last - a_s)
            if HAS_SEG:
                e_s = tl.where(seg_s == seg_last, e_s, 0.0)
            bdl = _dot(b_s, tl.trans(dl), IEEE)  # [s, p] = B_s dL^T
            xdl = _dot(x_s, dl, IEEE)  # [s, n]
            dxu = bdl * e_s[:, None]
            db_acc += xdl * (dt_s * e_s)[:, None]
            through_state = dt_s * tl.sum(x_s.to(tl.float32) * dxu, 1)
            da_s = -through_state
            da_last = tl.sum(through_state, 0)
            # Within the chunk: target blocks t from this block's diagonal on.
            for t0 in range(pid_s * BLOCK, Q, BLOCK):
                offs_t = t0 + tl.arange(0, BLOCK)
                pos_t = start + offs_t
                valid_t = pos_t < seqlen
                dy_t = _rows(DY + b * stride_dyb + hh * stride_dyh, pos_t, valid_t, stride_dyl, offs_p, P)
                c_t = _rows(C + b * stride_cb + g * stride_cg, pos_t, valid_t, stride_cl, offs_n, N)
                a_t = tl.load(ACS + row + offs_t)
                keep = offs_t[None, :] >= offs_s[:, None]
                if HAS_SEG:
                    seg_t = tl.load(SEG + b * stride_segb + pos_t, mask=valid_t, other=-2)
                    keep = keep & (seg_t[None, :] == seg_s[:, None])
                decay = tl.exp(tl.where(keep, a_t[None, :] - a_s[:, None], float("-inf")))  # [s, t]
                cb = _dot(b_s, tl.trans(c_t), IEEE)  # [s, t] = B_s . C_t
                w = _dot(x_s, tl.trans(dy_t), IEEE)  # [s, t] = x_s . dy_t
                m = cb * decay
                wd = w * decay * dt_s[:, None]
                dxu += _dot(m.to(X.dtype.element_ty), dy_t, IEEE)
                db_acc += _dot(wd.to(X.dtype.element_ty), c_t, IEEE)
                pair = wd * cb  # d/da_t of the pair's term, and minus its d/da_s
                da_s -= tl.sum(pair, 1)
                tl.atomic_add(DA + row + offs_t, tl.sum(pair, 0), mask=valid_t)
            dy_s = _rows(DY + b * stride_dyb + hh * stride_dyh, pos_s, valid_s, stride_dyl, offs_p, P).to(tl.float32)
            dx = dxu * dt_s[:, None]
            if HAS_D:
                dx += tl.load(D + hh).to(tl.float32) * dy_s
                tl.store(DD + (bh * nchunks + pid_c) * tl.num_programs(0) + pid_s,
                         tl.sum(tl.sum(dy_s * x_s.to(tl.float32), 1), 0))
            tl.store(DX + b * stride_dxb + pos_s.to(tl.int64)[:, None] * stride_dxl + hh * stride_dxh + offs_p[None, :],
                     dx.to(DX.dtype.element_ty), mask=mask_sp)
            tl.store(DDT + row + offs_s, tl.sum(dxu * x_s.to(tl.float32), 1))
            tl.atomic_add(DA + row + offs_s, da_s, mask=valid_s)
            tl.atomic_add(DA + row + Q - 1, da_last)
        tl.store(DB + b * stride_dbb + pos_s.to(tl.int64)[:, None] * stride_dbl + g * stride_dbg + offs_n[None, :],
                 db_acc.to(DB.dtype.element_ty), mask=valid_s[:, None] & (offs_n[None, :] < N))

    @triton.jit
    def _chunk_scan_bwd_dc(
        X, B, C, DY, SEG, DTP, ACS, H, DC, DA,
        seqlen, nheads, heads_per_group, padded_len,
        stride_xb, stride_xl, stride_xh, stride_bb, stride_bl, stride_bg, stride_cb, stride_cl, stride_cg,
        stride_dyb, stride_dyl, stride_dyh, stride_dcb, stride_dcl, stride_dcg, stride_segb,
        P: tl.constexpr, N: tl.constexpr, Q: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK: tl.constexpr,
        HAS_SEG: tl.constexpr, IEEE: tl.constexpr,
    ):
        """One block of target positions t of one chunk and group, looping over the group's heads: dC_t (summed over
        heads) and the carried state's log-decay gradient (atomics into DA)."""
        pid_t = tl.program_id(0)
        pid_c = tl.program_id(1)
        pid_bg = tl.program_id(2)
        nchunks = tl.num_programs(1)
        ngroups = nheads // heads_per_group
        b = (pid_bg // ngroups).to(tl.int64)
        g = pid_bg % ngroups
        start = pid_c * Q
        offs_p = tl.arange(0, BLOCK_P)
        offs_n = tl.arange(0, BLOCK_N)
        offs_t = pid_t * BLOCK + tl.arange(0, BLOCK)
        pos_t = start + offs_t
        valid_t = pos_t < seqlen
        c_t = _rows(C + b * stride_cb + g * stride_cg, pos_t, valid_t, stride_cl, offs_n, N).to(tl.float32)
        if HAS_SEG:
            seg_t = tl.load(SEG + b * stride_segb + pos_t, mask=valid_t, other=-1)
            seg_prev = _segment_before(SEG + b * stride_segb, start)
        dc_acc = tl.zeros((BLOCK, BLOCK_N), dtype=tl.float32)
        for hi in range(heads_per_group):
            hh = g * heads_per_group + hi
            bh = b * nheads + hh
            row = bh * padded_len + start
            a_t = tl.load(ACS + row + offs_t)
            dy_t = _rows(DY + b * stride_dyb + hh * stride_dyh, pos_t, valid_t, stride_dyl, offs_p, P)
            h = tl.load(H + ((b * nchunks + pid_c) * nheads + hh) * (P * N) + offs_p[:, None] * N
                        + offs_n[None, :], mask=(offs_p[:, None] < P) & (offs_n[None, :] < N), other=0.0)
            scale = tl.exp(a_t)
            if HAS_SEG:
                scale = tl.where(seg_t == seg_prev, scale, 0.0)
            carried = _dot(dy_t, h, IEEE) * scale[:, None]  # [t, n]
            dc_acc += carried
            tl.atomic_add(DA + row + offs_t, tl.sum(carried * c_t, 1), mask=valid_t)
            for s0 in range(0, (pid_t + 1) * BLOCK, BLOCK):
                offs_s = s0 + tl.arange(0, BLOCK)
                pos_s = start + offs_s
                valid_s = pos_s < seqlen
                x_s = _rows_t(X + b * stride_xb + hh * stride_xh, pos_s, valid_s, stride_xl, offs_p, P)  # x_s^T [p, s]
                b_s = _rows(B + b * stride_bb + g * stride_bg, pos_s, valid_s, stride_bl, offs_n, N)
                a_s = tl.load(ACS + row + offs_s)
                dt_s = tl.load(DTP + row + offs_s)
                keep = offs_t[:, None] >= offs_s[None, :]
                if HAS_SEG:
                    seg_s = tl.load(SEG + b * stride_segb + pos_s, mask=valid_s, other=-2)
                    keep = keep & (seg_t[:, None] == seg_s[None, :])
                decay = tl.exp(tl.where(keep, a_t[:, None] - a_s[None, :], float("-inf")))
                w = _dot(dy_t, x_s, IEEE)  # [t, s]
                wd = (w * decay * dt_s[None, :]).to(X.dtype.element_ty)
                dc_acc += _dot(wd, b_s, IEEE)
        tl.store(DC + b * stride_dcb + pos_t.to(tl.int64)[:, None] * stride_dcl + g * stride_dcg + offs_n[None, :],
                 dc_acc.to(DC.dtype.element_ty), mask=valid_t[:, None] & (offs_n[None, :] < N))

    @triton.jit
    def _dt_bwd(
        DT, DT_BIAS, A, DTP, DA, DDT, DDT_RAW, DA_PART, DBIAS_PART,
        seqlen, nheads, padded_len,
        stride_dtb, stride_dtl, stride_dth, stride_ddb, stride_ddl, stride_ddh,
        dt_min, dt_max,
        Q: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    ):
        """d a (log-decay) -> d(dt * A) by a reverse cumsum inside the chunk; then dt's gradient through the clamp,
        the softplus and the bias; per-(b, chunk, head) partial sums of the A and bias gradients."""
        pid_c = tl.program_id(0)
        pid_bh = tl.program_id(1)
        nchunks = tl.num_programs(0)
        b = (pid_bh // nheads).to(tl.int64)
        hh = pid_bh % nheads
        start = pid_c * Q
        offs = tl.arange(0, Q)
        pos = start + offs
        valid = pos < seqlen
        row = pid_bh.to(tl.int64) * padded_len + start
        da = tl.load(DA + row + offs)
        d_dta = tl.sum(da, 0) - tl.cumsum(da, 0) + da  # sum over t >= r of d a_t
        dt = tl.load(DTP + row + offs)
        A_h = tl.load(A + hh).to(tl.float32)
        grad = tl.load(DDT + row + offs) + d_dta * A_h
        raw, unclamped, _ = _processed_dt(DT, DT_BIAS, b * stride_dtb + hh * stride_dth, pos, valid, stride_dtl, hh,
                                          dt_min, dt_max, HAS_BIAS, SOFTPLUS)
        grad = tl.where((unclamped >= dt_min) & (unclamped <= dt_max), grad, 0.0)  # the clamp's gradient
        if SOFTPLUS:
            grad = tl.where(raw > 20.0, grad, grad * tl.sigmoid(raw))
        grad = tl.where(valid, grad, 0.0)
        tl.store(DDT_RAW + b * stride_ddb + pos.to(tl.int64) * stride_ddl + hh * stride_ddh,
                 grad.to(DDT_RAW.dtype.element_ty), mask=valid)
        part = (b * nchunks + pid_c) * nheads + hh
        tl.store(DA_PART + part, tl.sum(d_dta * dt, 0))
        if HAS_BIAS:
            tl.store(DBIAS_PART + part, tl.sum(grad, 0))


def _dims(x: torch.Tensor, B: torch.Tensor, chunk_size: int) -> dict:
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    nchunks = -(-l // chunk_size)
    return dict(b=b, l=l, h=h, p=p, g=g, n=n, hg=h // g, nc=nchunks, Lp=nchunks * chunk_size, Q=chunk_size,
                block=min(chunk_size, BLOCK_T), BLOCK_P=max(16, triton.next_power_of_2(p)),
                BLOCK_N=max(16, triton.next_power_of_2(n)))


def _seg_args(seg: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, int]:
    if seg is None:
        return torch.empty(1, dtype=torch.int32, device=like.device), 0
    return seg, seg.stride(0)


def _forward(x, dt, A, B, C, D, dt_bias, seg, init, chunk_size, softplus, dt_limit):
    k = _dims(x, B, chunk_size)
    b, l, h, p, n, nc, Lp, Q = k["b"], k["l"], k["h"], k["p"], k["n"], k["nc"], k["Lp"], k["Q"]
    dev = x.device
    ieee = x.dtype == torch.float32
    seg_t, stride_seg = _seg_args(seg, x)
    bias = dt_bias if dt_bias is not None else A
    dtp = torch.empty(b * h, Lp, device=dev, dtype=torch.float32)
    acs = torch.empty(b * h, Lp, device=dev, dtype=torch.float32)
    states = torch.empty(b, nc, h, p, n, device=dev, dtype=torch.float32)
    _chunk_state_fwd[(nc, b * h)](
        x, dt, A, bias, B, seg_t, dtp, acs, states,
        l, h, k["hg"], Lp,
        x.stride(0), x.stride(1), x.stride(2), dt.stride(0), dt.stride(1), dt.stride(2),
        B.stride(0), B.stride(1), B.stride(2), stride_seg,
        float(dt_limit[0]), float(dt_limit[1]),
        P=p, N=n, Q=Q, BLOCK_P=k["BLOCK_P"], BLOCK_N=k["BLOCK_N"], BLOCK=k["block"],
        HAS_BIAS=dt_bias is not None, SOFTPLUS=softplus, HAS_SEG=seg is not None, IEEE=ieee,
        num_warps=WARPS["state"], num_stages=STAGES["state"],
    )
    entering = torch.empty(b, nc, h, p, n, device=dev, dtype=x.dtype)
    final = torch.empty(b, h, p, n, device=dev, dtype=torch.float32)
    init_t = init.float().contiguous() if init is not None else final
    _state_passing_fwd[(triton.cdiv(p * n, PASSING_BLOCK), b * h)](
        states, acs, seg_t, init_t, entering, final,
        l, h, nc, Lp, stride_seg,
        PN=p * n, Q=Q, BLOCK=PASSING_BLOCK, HAS_SEG=seg is not None, HAS_INIT=init is not None,
        num_warps=WARPS["passing"],
    )
    y = torch.empty(b, l, h, p, device=dev, dtype=x.dtype)
    _chunk_scan_fwd[(Q // k["block"], nc, b * h)](
        x, B, C, D if D is not None else A, seg_t, dtp, acs, entering, y,
        l, h, k["hg"], Lp,
        x.stride(0), x.stride(1), x.stride(2), B.stride(0), B.stride(1), B.stride(2),
        C.stride(0), C.stride(1), C.stride(2), y.stride(0), y.stride(1), y.stride(2), stride_seg,
        P=p, N=n, Q=Q, BLOCK_P=k["BLOCK_P"], BLOCK_N=k["BLOCK_N"], BLOCK=k["block"],
        HAS_D=D is not None, HAS_SEG=seg is not None, IEEE=ieee,
        num_warps=WARPS["scan"], num_stages=STAGES["scan"],
    )
    return y, final, dtp, acs, entering


def _backward(dy, dfinal, x, dt, A, B, C, D, dt_bias, seg, init, chunk_size, softplus, dt_limit, dtp, acs,
              entering, out=None):
    """The gradients; ``out`` = (dx, ddt, dB, dC) views to write into (the fused mixer span hands slices of one
    buffer shaped like in_proj's output), else new tensors."""
    k = _dims(x, B, chunk_size)
    b, l, h, p, g, n, nc, Lp, Q = (k[key] for key in ("b", "l", "h", "p", "g", "n", "nc", "Lp", "Q"))
    dev = x.device
    ieee = x.dtype == torch.float32
    seg_t, stride_seg = _seg_args(seg, x)
    has_seg = seg is not None
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    dsy = torch.empty(b, nc, h, p, n, device=dev, dtype=torch.float32)
    _chunk_dstate_bwd[(nc, b * h)](
        dy, C, seg_t, acs, dsy,
        l, h, k["hg"], Lp,
        dy.stride(0), dy.stride(1), dy.stride(2), C.stride(0), C.stride(1), C.stride(2), stride_seg,
        P=p, N=n, Q=Q, BLOCK_P=k["BLOCK_P"], BLOCK_N=k["BLOCK_N"], BLOCK=k["block"],
        HAS_SEG=has_seg, IEEE=ieee, num_warps=WARPS["dstate"], num_stages=STAGES["dstate"],
    )
    dl = torch.empty(b, nc, h, p, n, device=dev, dtype=x.dtype)
    da = torch.zeros(b * h, Lp, device=dev, dtype=torch.float32)
    dinit = torch.empty(b, h, p, n, device=dev, dtype=torch.float32) if init is not None else None
    dfinal_t = dfinal.float().contiguous() if dfinal is not None else dsy
    _state_passing_bwd[(triton.cdiv(p * n, PASSING_BLOCK), b * h)](
        dsy, entering, acs, seg_t, dfinal_t, dl, da, dinit if dinit is not None else dsy,
        l, h, nc, Lp, stride_seg,
        PN=p * n, Q=Q, BLOCK=PASSING_BLOCK, HAS_SEG=has_seg, HAS_DFINAL=dfinal is not None,
        HAS_INIT=init is not None, num_warps=WARPS["passing"],
    )
    if out is None:
        out = (torch.empty(b, l, h, p, device=dev, dtype=x.dtype), torch.empty(b, l, h, device=dev, dtype=dt.dtype),
               torch.empty(b, l, g, n, device=dev, dtype=B.dtype), torch.empty(b, l, g, n, device=dev, dtype=C.dtype))
    dx, ddt, dB, dC = out
    ddt_part = torch.empty(b * h, Lp, device=dev, dtype=torch.float32)
    n_sblocks = Q // k["block"]
    dd_part = torch.empty(b * h, nc, n_sblocks, device=dev, dtype=torch.float32) if D is not None else da
    _chunk_scan_bwd_dx_db[(n_sblocks, nc, b * g)](
        x, B, C, dy, D if D is not None else A, seg_t, dtp, acs, dl, dx, dB, da, ddt_part, dd_part,
        l, h, k["hg"], Lp,
        x.stride(0), x.stride(1), x.stride(2), B.stride(0), B.stride(1), B.stride(2),
        C.stride(0), C.stride(1), C.stride(2), dy.stride(0), dy.stride(1), dy.stride(2),
        dx.stride(0), dx.stride(1), dx.stride(2), dB.stride(0), dB.stride(1), dB.stride(2), stride_seg,
        P=p, N=n, Q=Q, BLOCK_P=k["BLOCK_P"], BLOCK_N=k["BLOCK_N"], BLOCK=k["block"],
        HAS_D=D is not None, HAS_SEG=has_seg, IEEE=ieee, num_warps=WARPS["dx_db"], num_stages=STAGES["dx_db"],
    )
    _chunk_scan_bwd_dc[(n_sblocks, nc, b * g)](
        x, B, C, dy, seg_t, dtp, acs, entering, dC, da,
        l, h, k["hg"], Lp,
        x.stride(0), x.stride(1), x.stride(2), B.stride(0), B.stride(1), B.stride(2),
        C.stride(0), C.stride(1), C.stride(2), dy.stride(0), dy.stride(1), dy.stride(2),
        dC.stride(0), dC.stride(1), dC.stride(2), stride_seg,
        P=p, N=n, Q=Q, BLOCK_P=k["BLOCK_P"], BLOCK_N=k["BLOCK_N"], BLOCK=k["block"],
        HAS_SEG=has_seg, IEEE=ieee, num_warps=WARPS["dc"], num_stages=STAGES["dc"],
    )
    da_part = torch.empty(b, nc, h, device=dev, dtype=torch.float32)
    dbias_part = torch.empty(b, nc, h, device=dev, dtype=torch.float32) if dt_bias is not None else da_part
    _dt_bwd[(nc, b * h)](
        dt, dt_bias if dt_bias is not None else A, A, dtp, da, ddt_part, ddt, da_part, dbias_part,
        l, h, Lp,
        dt.stride(0), dt.stride(1), dt.stride(2), ddt.stride(0), ddt.stride(1), ddt.stride(2),
        float(dt_limit[0]), float(dt_limit[1]),
        Q=Q, HAS_BIAS=dt_bias is not None, SOFTPLUS=softplus, num_warps=WARPS["dt"],
    )
    dA = da_part.sum(dim=(0, 1)).to(A.dtype)
    dbias = dbias_part.sum(dim=(0, 1)).to(dt_bias.dtype) if dt_bias is not None else None
    dD = dd_part.reshape(b, h, -1).sum(dim=(0, 2)).to(D.dtype) if D is not None else None
    return dx, ddt, dA, dB, dC, dD, dbias, dinit


class _TritonChunkScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, dt_bias, seg, init, chunk_size, softplus, dt_limit):
        y, final, dtp, acs, entering = _forward(x, dt, A, B, C, D, dt_bias, seg, init, chunk_size, softplus,
                                                dt_limit)
        ctx.save_for_backward(x, dt, A, B, C, D, dt_bias, seg, init, dtp, acs, entering)
        ctx.config = (chunk_size, softplus, dt_limit)
        ctx.set_materialize_grads(False)  # the final state's gradient is usually absent: no zeros to read
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, dt_bias, seg, init, dtp, acs, entering = ctx.saved_tensors
        chunk_size, softplus, dt_limit = ctx.config
        dy = torch.zeros_like(x) if dy is None else dy.to(x.dtype)
        dx, ddt, dA, dB, dC, dD, dbias, dinit = _backward(
            dy, dfinal, x, dt, A, B, C, D, dt_bias, seg, init, chunk_size, softplus, dt_limit, dtp, acs, entering)
        return dx, ddt, dA, dB, dC, dD, dbias, None, dinit, None, None, None


def ssd_chunk_scan_triton(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    *,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    initial_states: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scan without ``z``: y [b, l, h, p] (x's dtype) and the final state [b, h, p, n] (float32).

    ``segments``: int32 [b, l] monotone segment ids (``_common.segment_ids``), or None. Shapes are checked by the
    caller (``ops.backend.ssd_chunk_scan``); ``unsupported_reason`` must be None for these arguments.
    """
    # The kernels read headdim and d_state rows as contiguous vectors (any other strides are fine).
    x, B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, B, C))
    if segments is not None:
        segments = segments.to(torch.int32).contiguous()
    return _TritonChunkScan.apply(x, dt, A, B, C, D, dt_bias, segments, initial_states, int(chunk_size),
                                  bool(dt_softplus), (float(dt_limit[0]), float(dt_limit[1])))
