"""Fused single-token decode of the Mamba-2 mixer in two Triton kernels (between ``in_proj`` and ``out_proj``).

Why it exists: on a GPU a decode step at batch 1 is bound by kernel launches, not by bytes. The unfused mixer step
(split copies, the conv-state update as ~10 elementwise kernels, dt processing, ``selective_state_update``, the
gated norm with its ``.contiguous()`` copies) launches about 30 kernels per Mamba layer for ~2 MB of state traffic.
Here the whole span ``zxbcdt -> normalised, gated y`` is two launches:

* ``_ssm_decode_kernel``, grid ``(batch, head, headdim block)``: reads the ``in_proj`` output row ``zxbcdt``
  ``[z | x | B | C | dt]`` in place (no split copies); the depthwise causal conv update + SiLU of the program's x
  channels and of its group's B and C channels (the B/C conv is recomputed by every program of the group, it is
  ``2 * d_state`` channels of ``d_conv`` taps); ``dt = clamp(softplus(dt + dt_bias), dt_limit)``;
  ``dA = exp(dt * -exp(A_log))``; ``state = state * dA + dt * x (outer) B`` in place; ``y = state . C + D * x``.
  Last, it advances the conv state of its own x channels (and of nothing else).
* ``_gated_norm_kernel``, grid ``(batch, norm group)``: ``rmsnorm_groupwise(y * silu(z)) * weight`` with ``z`` read
  from the same row, written in the activation dtype for ``out_proj``; and the B/C channels' conv-state shift, split
  evenly over its programs.

Races: a conv state row is shifted in place (``state[k] = state[k + 1]``, newest input appended). The B and C rows
are read by every program of a group in the first kernel, so they are only written by the second kernel, which the
stream orders after the first one finished (no reader left). With ``normalize=False`` (one kernel; the caller applies
the gated norm, e.g. in ``triton_fused_gemv``'s prologue) the last program of a group to arrive writes them instead:
each program loads its shifted rows up front, then counts itself in on an atomic counter per (row, group) after all
its loads; the program that completes the count stores the B/C rows and resets the counter for the next step.
Within one program the threads that store a shifted element are not the ones that loaded it, so every shift loads all
it needs, then ``tl.debug_barrier()`` (a CTA-wide barrier: all loads of the program are performed), then stores. Each
x channel belongs to exactly one program.

Semantics are those of the unfused reference composition ``causal_conv1d_update_ref`` (conv state
``[b, conv_dim, state_len >= d_conv - 1]``, oldest input first) + ``ssm_state_update_ref`` (dt processed as
``_common.process_dt``) + ``gated_rms_norm_ref`` (norm_before_gate=False), including where they round: the conv
outputs and ``y`` are rounded to the activation dtype as the unfused path does, the SSM state (float32, bfloat16 or
float16) is updated in float32 and rounded once when stored, ``y`` reads the unrounded new state. Nothing here
synchronises with the host or depends on data for shapes, so a CUDA graph can capture it (any batch size).

Importing this module never fails: without triton ``UNAVAILABLE_REASON`` says why and the entry point raises
``KernelUnavailableError``; ``ops.backend`` imports it lazily, on CUDA tensors only. Under ``TRITON_INTERPRET=1``
(set before triton is imported) the kernels run on CPU tensors, which is how the tests check them.
"""

from __future__ import annotations

import math

import torch

from megatron_hybrid.ops.mamba_ssm_loader import KernelUnavailableError

__all__ = ["UNAVAILABLE_REASON", "mamba_decode_step_triton"]

from megatron_hybrid.ops._triton_common import ROUND_KIND as _ROUND_KIND
from megatron_hybrid.ops._triton_common import UNAVAILABLE_REASON, launch_options, pdl_mode, tl, triton

# Tile heuristics (module globals, read at every call, so a benchmark can sweep them). One program updates a
# [BLOCK_P, d_state] slice of a head's state; 1K elements gives 256 programs for the 800M shape (32 heads x 64 x 128)
# at batch 1, two per SM, which keeps more state loads in flight: the whole 800M decode step (benchmarks/gpu_decode.py
# --parts fused_step, H200) took 0.620 ms with it against 0.626 ms at 2K and 0.647-0.657 ms at 4K elements.
STATE_TILE_ELEMENTS = 1024
SSM_WARPS = 4
NORM_WARPS = 4


if triton is not None:
    from megatron_hybrid.ops._triton_common import let_next_kernel_launch_early, softplus, wait_for_previous_kernel
    from megatron_hybrid.ops._triton_common import round_to_storage as _round


    @triton.jit
    def _conv_silu(
        zx_row, cs_row, W, CB, chan, mask_c,
        stride_cs_c, stride_cs_k, stride_w_c, stride_w_k,
        D_INNER: tl.constexpr, STATE_LEN: tl.constexpr, KW: tl.constexpr, KW_PAD: tl.constexpr,
        HAS_CONV_BIAS: tl.constexpr,
    ):
        """silu(conv) of conv channels ``chan`` for the new input, from the OLD conv state (float32, not rounded)."""
        j = tl.arange(0, KW_PAD)
        # Tap j reads entry STATE_LEN + 1 - KW + j of (old state ++ [new input]); STATE_LEN >= KW - 1 so it is >= 0.
        src = STATE_LEN + 1 - KW + j
        x_new = tl.load(zx_row + D_INNER + chan, mask=mask_c, other=0.0).to(tl.float32)
        in_state = (j < KW) & (src < STATE_LEN)
        old = tl.load(
            cs_row + chan[:, None] * stride_cs_c + src[None, :] * stride_cs_k,
            mask=mask_c[:, None] & in_state[None, :], other=0.0,
        ).to(tl.float32)
        window = tl.where((src == STATE_LEN)[None, :], x_new[:, None], old)
        w = tl.load(
            W + chan[:, None] * stride_w_c + j[None, :] * stride_w_k,
            mask=mask_c[:, None] & (j < KW)[None, :], other=0.0,
        ).to(tl.float32)
        acc = tl.sum(window * w, axis=1)
        if HAS_CONV_BIAS:
            acc += tl.load(CB + chan, mask=mask_c, other=0.0).to(tl.float32)
        return acc * tl.sigmoid(acc)

    @triton.jit
    def _conv_state_next(
        zx_row, cs_row, chan, mask_c, stride_cs_c, stride_cs_k,
        D_INNER: tl.constexpr, STATE_LEN: tl.constexpr, SL_PAD: tl.constexpr, CS_ROUND: tl.constexpr,
    ):
        """The advanced conv-state rows of channels ``chan``: ``state[c, k + 1]`` for ``k < STATE_LEN - 1``, then the
        new input (loaded now; ``_conv_state_store`` writes them back later)."""
        k = tl.arange(0, SL_PAD)
        x_new = tl.load(zx_row + D_INNER + chan, mask=mask_c, other=0.0).to(tl.float32)
        x_new = _round(x_new, CS_ROUND).to(cs_row.dtype.element_ty)
        nxt = tl.load(
            cs_row + chan[:, None] * stride_cs_c + (k + 1)[None, :] * stride_cs_k,
            mask=mask_c[:, None] & (k + 1 < STATE_LEN)[None, :], other=0.0,
        )
        return tl.where((k == STATE_LEN - 1)[None, :], x_new[:, None], nxt)

    @triton.jit
    def _conv_state_store(
        cs_row, chan, mask_c, new, stride_cs_c, stride_cs_k, STATE_LEN: tl.constexpr, SL_PAD: tl.constexpr,
    ):
        k = tl.arange(0, SL_PAD)
        tl.store(
            cs_row + chan[:, None] * stride_cs_c + k[None, :] * stride_cs_k, new,
            mask=mask_c[:, None] & (k < STATE_LEN)[None, :],
        )

    @triton.jit
    def _conv_state_shift(
        zx_row, cs_row, chan, mask_c, stride_cs_c, stride_cs_k,
        D_INNER: tl.constexpr, STATE_LEN: tl.constexpr, SL_PAD: tl.constexpr, CS_ROUND: tl.constexpr,
    ):
        """``state[c, k] = state[c, k + 1]``, ``state[c, -1] = new input`` for the channels ``chan`` of this program.

        Must be the program's last access to these rows: everything is loaded, then a barrier, then stored."""
        new = _conv_state_next(zx_row, cs_row, chan, mask_c, stride_cs_c, stride_cs_k, D_INNER, STATE_LEN, SL_PAD,
                               CS_ROUND)
        tl.debug_barrier()  # every thread's loads of these rows are performed before any thread overwrites them
        _conv_state_store(cs_row, chan, mask_c, new, stride_cs_c, stride_cs_k, STATE_LEN, SL_PAD)

    @triton.jit
    def _ssm_decode_kernel(
        ZX, CONV_STATE, CONV_W, CONV_B, SSM, A_LOG, DT_BIAS, D, Y, ARRIVALS,
        dt_low, dt_high,
        stride_zx_b,
        stride_cs_b, stride_cs_c, stride_cs_k,
        stride_w_c, stride_w_k,
        stride_s_b, stride_s_h, stride_s_p, stride_s_n,
        stride_y_b,
        HEADDIM: tl.constexpr, DSTATE: tl.constexpr, D_INNER: tl.constexpr, GN: tl.constexpr,
        HEADS_PER_GROUP: tl.constexpr, STATE_LEN: tl.constexpr, KW: tl.constexpr,
        HAS_CONV_BIAS: tl.constexpr, HAS_DT_BIAS: tl.constexpr, HAS_D: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
        DT_CLAMP: tl.constexpr,
        ACT_ROUND: tl.constexpr, Y_ROUND: tl.constexpr, STATE_ROUND: tl.constexpr, CS_ROUND: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, KW_PAD: tl.constexpr, SL_PAD: tl.constexpr,
        SHIFT_BC: tl.constexpr, PROGRAMS_PER_GROUP: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        let_next_kernel_launch_early(USE_PDL)
        pid_b = tl.program_id(0).to(tl.int64)
        pid_h = tl.program_id(1)
        pid_p = tl.program_id(2)
        group = pid_h // HEADS_PER_GROUP
        zx_row = ZX + pid_b * stride_zx_b
        cs_row = CONV_STATE + pid_b * stride_cs_b

        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < HEADDIM
        offs_n = tl.arange(0, BLOCK_N)
        mask_n = offs_n < DSTATE

        # Every load is issued before the first barrier (in the conv-state shift at the end), so the state, dt and
        # conv reads are in flight together: a decode step is latency-bound, not bandwidth-bound. The SSM state and
        # the parameters load before the wait for the previous kernel (PDL): only this kernel writes them.
        s_ptrs = (SSM + pid_b * stride_s_b + pid_h * stride_s_h
                  + offs_p[:, None] * stride_s_p + offs_n[None, :] * stride_s_n)
        s_mask = mask_p[:, None] & mask_n[None, :]
        state = tl.load(s_ptrs, mask=s_mask, other=0.0).to(tl.float32)
        A = -tl.exp(tl.load(A_LOG + pid_h).to(tl.float32))
        if HAS_DT_BIAS:
            dt_bias = tl.load(DT_BIAS + pid_h).to(tl.float32)
        wait_for_previous_kernel(USE_PDL)
        dt = tl.load(zx_row + 2 * D_INNER + 2 * GN + pid_h).to(tl.float32)
        if HAS_DT_BIAS:
            dt += dt_bias

        # Conv outputs are rounded to the activation dtype, as the unfused conv update returns them.
        x_chan = pid_h * HEADDIM + offs_p
        b_chan = D_INNER + group * DSTATE + offs_n
        c_chan = b_chan + GN
        # The advanced conv-state rows are loaded now, with everything else, and stored at the end: the stores then
        # wait on no load (the end of a step is on the critical path of the decode step).
        x_next = _conv_state_next(zx_row, cs_row, x_chan, mask_p, stride_cs_c, stride_cs_k, D_INNER, STATE_LEN,
                                  SL_PAD, CS_ROUND)
        if SHIFT_BC:
            b_next = _conv_state_next(zx_row, cs_row, b_chan, mask_n, stride_cs_c, stride_cs_k, D_INNER, STATE_LEN,
                                      SL_PAD, CS_ROUND)
            c_next = _conv_state_next(zx_row, cs_row, c_chan, mask_n, stride_cs_c, stride_cs_k, D_INNER, STATE_LEN,
                                      SL_PAD, CS_ROUND)
        x = _round(_conv_silu(zx_row, cs_row, CONV_W, CONV_B, x_chan, mask_p, stride_cs_c, stride_cs_k, stride_w_c,
                              stride_w_k, D_INNER, STATE_LEN, KW, KW_PAD, HAS_CONV_BIAS), ACT_ROUND)
        Bv = _round(_conv_silu(zx_row, cs_row, CONV_W, CONV_B, b_chan, mask_n, stride_cs_c, stride_cs_k,
                               stride_w_c, stride_w_k, D_INNER, STATE_LEN, KW, KW_PAD, HAS_CONV_BIAS), ACT_ROUND)
        Cv = _round(_conv_silu(zx_row, cs_row, CONV_W, CONV_B, c_chan, mask_n, stride_cs_c, stride_cs_k,
                               stride_w_c, stride_w_k, D_INNER, STATE_LEN, KW, KW_PAD, HAS_CONV_BIAS), ACT_ROUND)

        if DT_SOFTPLUS:
            dt = softplus(dt)
        if DT_CLAMP:
            dt = tl.minimum(tl.maximum(dt, dt_low), dt_high)
        dA = tl.exp(dt * A)
        state = state * dA + (dt * x)[:, None] * Bv[None, :]
        tl.store(s_ptrs, _round(state, STATE_ROUND).to(SSM.dtype.element_ty), mask=s_mask)
        y = tl.sum(state * Cv[None, :], axis=1)
        if HAS_D:
            y += x * tl.load(D + pid_h).to(tl.float32)
        tl.store(Y + pid_b * stride_y_b + x_chan, _round(y, Y_ROUND).to(Y.dtype.element_ty), mask=mask_p)

        # Last: this program's own x rows of the conv state (their window was read above). B and C rows are read by
        # every program of the group: the norm kernel shifts them after all of these finished, or (SHIFT_BC) the last
        # program of the group to arrive stores the rows it loaded above, counted on an arrival counter that it
        # resets for the next step.
        tl.debug_barrier()  # every thread's loads of the conv-state rows are performed before any store to them
        _conv_state_store(cs_row, x_chan, mask_p, x_next, stride_cs_c, stride_cs_k, STATE_LEN, SL_PAD)
        if SHIFT_BC:
            counter = ARRIVALS + pid_b * (GN // DSTATE) + group
            arrived = tl.atomic_add(counter, 1, sem="acq_rel")  # release: our reads happen before; acquire: theirs
            if arrived == PROGRAMS_PER_GROUP - 1:
                _conv_state_store(cs_row, b_chan, mask_n, b_next, stride_cs_c, stride_cs_k, STATE_LEN, SL_PAD)
                _conv_state_store(cs_row, c_chan, mask_n, c_next, stride_cs_c, stride_cs_k, STATE_LEN, SL_PAD)
                tl.store(counter, 0)

    @triton.jit
    def _gated_norm_kernel(
        ZX, Y, NORM_W, OUT, CONV_STATE,
        eps,
        stride_zx_b, stride_y_b, stride_o_b,
        stride_cs_b, stride_cs_c, stride_cs_k,
        GROUP_SIZE: tl.constexpr, D_INNER: tl.constexpr, BC_CHANNELS: tl.constexpr, BC_PER_PROGRAM: tl.constexpr,
        STATE_LEN: tl.constexpr, OUT_ROUND: tl.constexpr, CS_ROUND: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_BC: tl.constexpr, SL_PAD: tl.constexpr,
    ):
        pid_b = tl.program_id(0).to(tl.int64)
        pid_g = tl.program_id(1)
        zx_row = ZX + pid_b * stride_zx_b

        offs = tl.arange(0, BLOCK_G)
        mask = offs < GROUP_SIZE
        cols = pid_g * GROUP_SIZE + offs
        y = tl.load(Y + pid_b * stride_y_b + cols, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(zx_row + cols, mask=mask, other=0.0).to(tl.float32)  # z is the row's first D_INNER columns
        xg = y * (z * tl.sigmoid(z))
        rstd = tl.rsqrt(tl.sum(xg * xg, axis=0) / GROUP_SIZE + eps)
        w = tl.load(NORM_W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + pid_b * stride_o_b + cols, _round(xg * rstd * w, OUT_ROUND).to(OUT.dtype.element_ty),
                 mask=mask)

        # The B/C conv-state rows, which every SSM program of a group read: shifted here, after all of them ran.
        local = tl.arange(0, BLOCK_BC)
        rel = pid_g * BC_PER_PROGRAM + local
        mask_c = (local < BC_PER_PROGRAM) & (rel < BC_CHANNELS)
        _conv_state_shift(zx_row, CONV_STATE + pid_b * stride_cs_b, D_INNER + rel, mask_c, stride_cs_c, stride_cs_k,
                          D_INNER, STATE_LEN, SL_PAD, CS_ROUND)




_ARRIVALS: dict[torch.device, torch.Tensor] = {}
_MIN_ARRIVAL_COUNTERS = 4096  # batch x groups; allocated once so that a CUDA graph capture never has to grow it


def _arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """Zeroed int32 counters for the SHIFT_BC rendezvous (the kernel leaves them zero again), one per (row, group),
    shared by every layer (their kernels run one after another)."""
    found = _ARRIVALS.get(device)
    if found is None or found.numel() < count:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the fused Mamba decode needs more arrival counters than it allocated before this "
                               "CUDA graph capture: run one eager step of this batch size first")
        found = _ARRIVALS[device] = torch.zeros(max(count, _MIN_ARRIVAL_COUNTERS), device=device, dtype=torch.int32)
    return found


def _round_kind(dtype: torch.dtype) -> int:
    if dtype not in _ROUND_KIND:
        raise ValueError(f"the fused decode supports float32, bfloat16 and float16 tensors, got {dtype}")
    return _ROUND_KIND[dtype]


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def mamba_decode_step_triton(
    zxbcdt: torch.Tensor,
    conv_state: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    ssm_state: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor | None,
    D: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    *,
    norm_group_size: int,
    eps: float,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    dt_softplus: bool = True,
    y_dtype: torch.dtype | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """One Mamba-2 mixer decode step from ``in_proj``'s output to ``out_proj``'s input; states advance in place.

    ``normalize=False`` stops before the gated norm and returns ``y`` itself (for a consumer that normalises, like
    ``triton_fused_gemv``'s ``gated_norm`` prologue): then one kernel does the whole step, conv state included, and
    ``norm_weight`` may be None.

    ``zxbcdt`` [b, 2*d_inner + 2*G*N + H] (the local shard's ``[z | x | B | C | dt]``, last dim contiguous, rows
    any stride); ``conv_state`` [b, d_inner + 2*G*N, state_len >= w - 1] (oldest input first); ``conv_weight``
    [d_inner + 2*G*N, w] (or nn.Conv1d's [.., 1, w]); ``conv_bias`` [d_inner + 2*G*N]; ``ssm_state`` [b, H, P, N]
    (float32/bfloat16/float16, any strides); ``A_log``, ``dt_bias``, ``D`` [H]; ``norm_weight`` [d_inner], normalised
    over groups of ``norm_group_size`` channels. Local (tensor-parallel shard) sizes throughout: H, P, N come from
    ``ssm_state``, G from the conv width. Returns ``rmsnorm_groupwise(y * silu(z)) * norm_weight`` [b, d_inner] in
    ``zxbcdt``'s dtype; ``y`` itself is kept in ``y_dtype`` (default: ``zxbcdt``'s dtype, as the unfused path does).
    """
    if UNAVAILABLE_REASON is not None:
        raise KernelUnavailableError(f"the fused Triton Mamba decode is unavailable: {UNAVAILABLE_REASON}")
    if conv_weight.dim() == 3:
        conv_weight = conv_weight.squeeze(1)
    batch, nheads, headdim, dstate = ssm_state.shape
    d_inner = nheads * headdim
    conv_dim, kw = conv_weight.shape
    gn2 = conv_dim - d_inner
    if gn2 <= 0 or gn2 % (2 * dstate):
        raise ValueError(f"conv width {conv_dim} must be d_inner {d_inner} + 2 * ngroups * d_state ({dstate})")
    ngroups = gn2 // (2 * dstate)
    width = 2 * d_inner + gn2 + nheads
    if zxbcdt.dim() != 2 or zxbcdt.shape != (batch, width):
        raise ValueError(f"zxbcdt must be [{batch}, {width}], got shape {tuple(zxbcdt.shape)}")
    state_len = conv_state.shape[-1]
    if conv_state.shape[:2] != (batch, conv_dim) or state_len < max(kw - 1, 1):
        raise ValueError(f"conv_state must be [{batch}, {conv_dim}, >= {max(kw - 1, 1)}], "
                         f"got shape {tuple(conv_state.shape)}")
    if nheads % ngroups:
        raise ValueError(f"nheads {nheads} must be a multiple of ngroups {ngroups}")
    for name, param in (("A_log", A_log), ("dt_bias", dt_bias), ("D", D)):
        if param is not None and param.shape != (nheads,):  # per-head only (no [h, p] forms): one scalar a program
            raise ValueError(f"{name} must be [{nheads}], got shape {tuple(param.shape)}")
    if normalize and (norm_weight is None or norm_weight.shape != (d_inner,)
                      or norm_group_size <= 0 or d_inner % norm_group_size):
        raise ValueError(f"norm_weight [{d_inner}] with group size {norm_group_size} dividing it, "
                         f"got {None if norm_weight is None else tuple(norm_weight.shape)} and {norm_group_size}")
    act_round, cs_round = _round_kind(zxbcdt.dtype), _round_kind(conv_state.dtype)
    if zxbcdt.stride(-1) != 1:
        zxbcdt = zxbcdt.contiguous()
    out = torch.empty(batch, d_inner, device=zxbcdt.device, dtype=zxbcdt.dtype)
    if batch == 0:
        return out
    y = torch.empty(batch, d_inner, device=zxbcdt.device, dtype=y_dtype or zxbcdt.dtype)
    low, high = float(dt_limit[0]), float(dt_limit[1])
    # Same rule as process_dt: softplus is never negative, so the default limit (0, inf) needs no clamp.
    dt_clamp = not (dt_softplus and low <= 0.0 and high == math.inf)

    block_n = _pow2(dstate)
    block_p = min(_pow2(headdim), max(1, STATE_TILE_ELEMENTS // block_n))
    kw_pad, sl_pad = _pow2(kw), _pow2(state_len)
    dummy = A_log  # never read: the HAS_* flags compile the loads out
    p_blocks = triton.cdiv(headdim, block_p)
    arrivals = _arrival_counters(zxbcdt.device, batch * ngroups) if not normalize else dummy
    use_pdl = pdl_mode(zxbcdt.device)
    _ssm_decode_kernel[(batch, nheads, p_blocks)](
        zxbcdt, conv_state, conv_weight, conv_bias if conv_bias is not None else dummy, ssm_state, A_log,
        dt_bias if dt_bias is not None else dummy, D if D is not None else dummy, y, arrivals,
        low, high,
        zxbcdt.stride(0),
        conv_state.stride(0), conv_state.stride(1), conv_state.stride(2),
        conv_weight.stride(0), conv_weight.stride(1),
        ssm_state.stride(0), ssm_state.stride(1), ssm_state.stride(2), ssm_state.stride(3),
        y.stride(0),
        HEADDIM=headdim, DSTATE=dstate, D_INNER=d_inner, GN=gn2 // 2, HEADS_PER_GROUP=nheads // ngroups,
        STATE_LEN=state_len, KW=kw,
        HAS_CONV_BIAS=conv_bias is not None, HAS_DT_BIAS=dt_bias is not None, HAS_D=D is not None,
        DT_SOFTPLUS=dt_softplus, DT_CLAMP=dt_clamp,
        ACT_ROUND=act_round, Y_ROUND=_round_kind(y.dtype), STATE_ROUND=_round_kind(ssm_state.dtype),
        CS_ROUND=cs_round,
        BLOCK_P=block_p, BLOCK_N=block_n, KW_PAD=kw_pad, SL_PAD=sl_pad,
        SHIFT_BC=not normalize, PROGRAMS_PER_GROUP=(nheads // ngroups) * p_blocks, USE_PDL=use_pdl,
        num_warps=SSM_WARPS, **launch_options(use_pdl),
    )
    if not normalize:
        return y
    norm_groups = d_inner // norm_group_size
    bc_per_program = triton.cdiv(gn2, norm_groups)
    _gated_norm_kernel[(batch, norm_groups)](
        zxbcdt, y, norm_weight, out, conv_state,
        float(eps),
        zxbcdt.stride(0), y.stride(0), out.stride(0),
        conv_state.stride(0), conv_state.stride(1), conv_state.stride(2),
        GROUP_SIZE=norm_group_size, D_INNER=d_inner, BC_CHANNELS=gn2, BC_PER_PROGRAM=bc_per_program,
        STATE_LEN=state_len, OUT_ROUND=act_round, CS_ROUND=cs_round,
        BLOCK_G=_pow2(norm_group_size), BLOCK_BC=_pow2(bc_per_program), SL_PAD=sl_pad,
        num_warps=NORM_WARPS,
    )
    return out
