"""Pure-PyTorch chunked SSD scan (Mamba-2), the reference for ``mamba_chunk_scan_combined``.

The recurrence per head, with ``dt`` already processed (bias, softplus, clamp) and ``g(h)`` the group of head ``h``::

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T        (h_t: [p, n])
    y_t = h_t C_t + D * x_t ;  y_t *= silu(z_t) when z is given

is evaluated chunk-parallel, as in the SSD paper: inside a chunk of ``T`` tokens it is a masked "attention"
``y = (C B^T * L) (dt x)`` with the decay matrix ``L[i, j] = exp(cumsum(dt A)_i - cumsum(dt A)_j)`` (``i >= j``); across
chunks a small state recurrence carries ``h`` from one chunk boundary to the next. Everything is batched matmuls on
a ``[b, chunks, groups, heads_per_group, ...]`` layout, so B and C are never repeated per head.

Documents (``seq_idx``) are handled by masking: a token only sees tokens and carried states of its own segment
(see ``_common.segment_ids``), so packing documents is equivalent to running them one by one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megatron_hybrid.ops._common import compute_dtype, process_dt, segment_ids

# Up to this many chunks the inter-chunk recurrence is one masked [chunks+1, chunks+1] matmul (few kernels, good for
# GPUs); beyond it a loop over chunks is cheaper, because the matmul form costs chunks^2 * state size. On the CPU the
# loop (one multiply-add per chunk, written in place) is cheaper at any length: STATE_PASSING_MATMUL_MAX_CHUNKS_CPU.
STATE_PASSING_MATMUL_MAX_CHUNKS = 64
STATE_PASSING_MATMUL_MAX_CHUNKS_CPU = 0

# The scan is exact for any block length, so the reference evaluates blocks of min(chunk_size, MAX_BLOCK) tokens: the
# per-head [T, T] decay matrices dominate its time and memory, and shorter blocks shrink them (results agree to
# rounding with any chunk_size).
MAX_BLOCK = 64


# Decays exp(x) with x below this are flushed to exactly 0 (see _exp_flushed).
_LOG_DECAY_FLOOR = {torch.float32: -40.0, torch.float64: -300.0}


def _log_floor(dtype: torch.dtype) -> float:
    return _LOG_DECAY_FLOOR.get(dtype, -40.0)


def _flush_tiny_(log_decay: torch.Tensor) -> torch.Tensor:
    """In place: log-decays below the floor become -inf, so that their exp is exactly 0.

    A decay under exp(-40) ~ 4e-18 (float32) is ten orders of magnitude below float32 resolution next to a token's own,
    undecayed term, so dropping it does not change results; keeping it would feed the matmuls of the forward and,
    multiplied by small gradients, of the backward with subnormal floats, which x86 CPUs process 10-100x slower than
    normal ones (whole layers ran 2-3x slower). float64 keeps decays down to exp(-300).
    """
    return F.threshold_(log_decay, _log_floor(log_decay.dtype), -math.inf)


def _exp_flushed(log_decay: torch.Tensor) -> torch.Tensor:
    return _flush_tiny_(log_decay.clone()).exp_()


def check_ssd_shapes(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    initial_states: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
) -> None:
    """Raise one ValueError listing every shape problem (shared by the reference and the Triton dispatch)."""
    if x.dim() != 4:
        raise ValueError(f"x must be [batch, seqlen, nheads, headdim], got shape {tuple(x.shape)}")
    b, l, h, p = x.shape
    if B.dim() != 4 or B.shape[:2] != (b, l):
        raise ValueError(f"B must be [batch, seqlen, ngroups, dstate] matching x {tuple(x.shape)}, "
                         f"got {tuple(B.shape)}")
    g, n = B.shape[2], B.shape[3]
    problems = []
    if h % g:
        problems.append(f"nheads {h} is not divisible by ngroups {g}")
    if C.shape != B.shape:
        problems.append(f"C shape {tuple(C.shape)} != B shape {tuple(B.shape)}")
    if dt.shape != (b, l, h):
        problems.append(f"dt must be {(b, l, h)}, got {tuple(dt.shape)}")
    if A.shape != (h,):
        problems.append(f"A must be {(h,)}, got {tuple(A.shape)}")
    if D is not None and D.shape not in ((h,), (h, p)):
        problems.append(f"D must be {(h,)} or {(h, p)}, got {tuple(D.shape)}")
    if z is not None and z.shape != x.shape:
        problems.append(f"z must have the shape of x {tuple(x.shape)}, got {tuple(z.shape)}")
    if dt_bias is not None and dt_bias.shape != (h,):
        problems.append(f"dt_bias must be {(h,)}, got {tuple(dt_bias.shape)}")
    if initial_states is not None and initial_states.shape != (b, h, p, n):
        problems.append(f"initial_states must be {(b, h, p, n)}, got {tuple(initial_states.shape)}")
    if seq_idx is not None and seq_idx.shape != (b, l):
        problems.append(f"seq_idx must be {(b, l)}, got {tuple(seq_idx.shape)}")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        problems.append(f"chunk_size must be a positive int, got {chunk_size!r}")
    if problems:
        raise ValueError("ssd_chunk_scan: " + "; ".join(problems))


def _masked_exp(log_decay: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """exp where ``keep`` (flushed like ``_exp_flushed``), exactly 0 elsewhere; masking before exp keeps both the
    value and its gradient finite."""
    return _flush_tiny_(log_decay.masked_fill(~keep, -math.inf)).exp_()


class _ChunkedScan(torch.autograd.Function):
    """The chunked scan proper on token-major inputs, with a hand-written backward.

    x [b, L, h, p] (L a multiple of the block T), dt [b, L, h] (processed), A [h], B and C [b, L, g, n], D [h] or [h, p]
    or None, initial_states [b, g, hg, p, n] or None, masks None or (intra_keep [b, c, 1, 1, T, T] bool, end_keep and
    start_keep [b, c, 1, 1, T], boundary [b, c + 1]) for documents. Returns y [b, L, h, p] (``D * x`` included) and the
    final state [b, g, hg, p, n].

    Internally everything is "head-major" blocks ``[b, c, g, hg, T, ...]``. Per block, with ``u = dt * x``,
    ``cum = cumsum(dt * A)`` and ``L[i, j] = exp(cum_i - cum_j)`` (``i >= j``)::

        y      = ((C B^T) * L) u                       within the block (M = (C B^T) * L)
        state  = u^T (B * exp(cum_T - cum))             what the block adds to the state at its end
        y     += (C * exp(cum)) entering^T              the state carried in from earlier blocks

    The scaled copies of B and C are per head, so no [T, T] or [T, p] tensor is ever broadcast into a matmul. The
    backward is written out (including the recurrence between blocks, run in reverse): it makes about a third of the
    passes over [T, T]- and [T, p]-sized tensors that autograd of the same forward would, and reuses the forward's
    decay, product and scaled matrices instead of recomputing them.
    """

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, initial_states, block, masks):
        b, L, h, p = x.shape
        g, n = B.shape[2], B.shape[3]
        hg, T = h // g, block
        nc = L // T
        intra_keep, end_keep, start_keep, boundary = masks if masks is not None else (None, None, None, None)

        x_h = x.reshape(b, nc, T, g, hg, p).permute(0, 1, 3, 4, 2, 5)  # head-major view [b, c, g, hg, T, p]
        dt_h = dt.reshape(b, nc, T, g, hg).permute(0, 1, 3, 4, 2).contiguous()  # [b, c, g, hg, T]
        B_h = B.reshape(b, nc, T, g, n).permute(0, 1, 3, 2, 4).contiguous()  # [b, c, g, T, n]
        C_h = C.reshape(b, nc, T, g, n).permute(0, 1, 3, 2, 4).contiguous()
        u = torch.empty((b, nc, g, hg, T, p), dtype=x.dtype, device=x.device)
        torch.mul(x_h, dt_h.unsqueeze(-1), out=u)
        cum = torch.cumsum(dt_h * A.reshape(g, hg, 1), dim=-1)  # [b, c, g, hg, T]

        # Within blocks.
        scores = C_h @ B_h.transpose(-1, -2)  # [b, c, g, T, T]
        decay = cum[..., :, None] - cum[..., None, :]  # [b, c, g, hg, T, T]
        _flush_tiny_(decay).exp_()
        if intra_keep is None:
            decay.tril_()  # also clears the overflowed entries above the diagonal
        else:
            decay.masked_fill_(~intra_keep, 0.0)
        mixed = decay * scores.unsqueeze(3)
        y = mixed @ u  # [b, c, g, hg, T, p]

        # What each block adds to the state at its end, and the states carried across blocks.
        to_end = _exp_flushed(cum[..., -1:] - cum)  # [b, c, g, hg, T]
        if end_keep is not None:
            to_end = to_end * end_keep
        B_scaled = B_h.unsqueeze(3) * to_end.unsqueeze(-1)  # [b, c, g, hg, T, n]
        states = u.transpose(-1, -2) @ B_scaled  # [b, c, g, hg, p, n]
        entering, final = _pass_states(states, cum[..., -1], initial_states, boundary)
        entering = entering.contiguous()

        # The carried state's contribution, accumulated into y.
        from_start = _exp_flushed(cum)
        if start_keep is not None:
            from_start = from_start * start_keep
        C_scaled = C_h.unsqueeze(3) * from_start.unsqueeze(-1)  # [b, c, g, hg, T, n]
        y.view(-1, T, p).baddbmm_(C_scaled.view(-1, T, n), entering.reshape(-1, p, n).transpose(1, 2))

        # Back to token-major in one pass (with the skip connection D * x when there is one).
        out = torch.empty((b, L, h, p), dtype=y.dtype, device=y.device)
        out_h = out.view(b, nc, T, g, hg, p).permute(0, 1, 3, 4, 2, 5)
        if D is None:
            out_h.copy_(y)
        else:
            torch.addcmul(y, x_h, _per_head(D, g, hg), out=out_h)
        ctx.save_for_backward(x, dt_h, A, B_h, C_h, D, initial_states, u, cum, scores, decay, mixed, to_end,
                              B_scaled, states, from_start, C_scaled, entering)
        ctx.block, ctx.boundary = block, boundary
        return out, final

    @staticmethod
    def backward(ctx, grad_out, grad_final):
        (x, dt_h, A, B_h, C_h, D, initial_states, u, cum, scores, decay, mixed, to_end, B_scaled, states, from_start,
         C_scaled, entering) = ctx.saved_tensors
        b, L, h, p = x.shape
        g, n = B_h.shape[2], B_h.shape[4]
        hg, T = h // g, ctx.block
        nc = L // T
        x_h = x.reshape(b, nc, T, g, hg, p).permute(0, 1, 3, 4, 2, 5)
        grad_y = grad_out.reshape(b, nc, T, g, hg, p).permute(0, 1, 3, 4, 2, 5).contiguous()  # head-major

        # Carried-state term: y += C_scaled @ entering^T.
        grad_C_scaled = grad_y @ entering  # [b, c, g, hg, T, n]
        grad_entering = grad_y.transpose(-1, -2) @ C_scaled  # [b, c, g, hg, p, n]
        grad_C = (grad_C_scaled * from_start.unsqueeze(-1)).sum(dim=3)  # [b, c, g, T, n]
        grad_cum = (grad_C_scaled * C_h.unsqueeze(3)).sum(dim=-1) * from_start  # d exp(cum) = exp(cum)

        # State passing across blocks, H[k + 1] = a[k] H[k] + states[k] (H[0] the initial state, H[c] the final one),
        # run backwards: G = dL/dH[k + 1] gives d states[k] = G and d a[k] = <G, H[k]>.
        log_decay = cum[..., -1]  # [b, c, g, hg]
        a = _exp_flushed(log_decay)
        if ctx.boundary is not None:
            a = a * (ctx.boundary[:, 1:] == ctx.boundary[:, :-1]).to(a.dtype)[:, :, None, None]
        grad_states = torch.empty_like(states)  # grad_states[:, k] = dL/dH[k + 1]
        grad_states[:, nc - 1] = grad_final
        a_b = a[..., None, None]
        for k in range(nc - 1, 0, -1):
            torch.addcmul(grad_entering[:, k], grad_states[:, k], a_b[:, k], out=grad_states[:, k - 1])
        grad_init = None
        if initial_states is not None:
            grad_init = torch.addcmul(grad_entering[:, 0], grad_states[:, 0], a_b[:, 0])
        grad_a = (grad_states * entering).sum(dim=(-2, -1))  # <dL/dH[k + 1], H[k]>
        grad_cum[..., -1] += grad_a * a

        # Block states: states = u^T @ B_scaled.
        grad_u = B_scaled @ grad_states.transpose(-1, -2)  # [b, c, g, hg, T, p]
        grad_B_scaled = u @ grad_states  # [b, c, g, hg, T, n]
        grad_B = (grad_B_scaled * to_end.unsqueeze(-1)).sum(dim=3)
        through_end = (grad_B_scaled * B_h.unsqueeze(3)).sum(dim=-1) * to_end  # to_end = exp(cum_T - cum)
        grad_cum -= through_end
        grad_cum[..., -1] += through_end.sum(dim=-1)

        # Within blocks: y = M @ u with M = (C B^T) * L.
        grad_u.view(-1, T, p).baddbmm_(mixed.view(-1, T, T).transpose(1, 2), grad_y.view(-1, T, p))
        prod = (grad_y @ u.transpose(-1, -2)).mul_(decay)  # dM * L
        grad_scores = prod.sum(dim=3)  # the heads of a group share C B^T
        prod.mul_(scores.unsqueeze(3))  # dM * M: d/dcum_i of L[i, j] is L[i, j], d/dcum_j is -L[i, j]
        grad_cum += prod.sum(dim=-1)
        grad_cum -= prod.sum(dim=-2)
        grad_C += grad_scores @ B_h
        grad_B += grad_scores.transpose(-1, -2) @ C_h

        # cum = cumsum(dt * A); u = dt * x.
        grad_dtA = grad_cum.flip(-1).cumsum(-1).flip(-1)
        grad_dt_h = (grad_u * x_h).sum(dim=-1) + grad_dtA * A.reshape(g, hg, 1)
        grad_A = (grad_dtA * dt_h).sum(dim=(0, 1, 4)).reshape(h)
        grad_D = None
        grad_x = torch.empty((b, L, h, p), dtype=grad_u.dtype, device=grad_u.device)
        grad_x_h = grad_x.view(b, nc, T, g, hg, p).permute(0, 1, 3, 4, 2, 5)
        torch.mul(grad_u, dt_h.unsqueeze(-1), out=grad_x_h)
        if D is not None:
            grad_x.addcmul_(grad_out, D if D.dim() == 2 else D[:, None])
            grad_D = (grad_out * x).sum(dim=(0, 1))
            if D.dim() == 1:
                grad_D = grad_D.sum(dim=-1)
        grad_dt = grad_dt_h.permute(0, 1, 4, 2, 3).reshape(b, L, h)
        grad_B = grad_B.permute(0, 1, 3, 2, 4).reshape(b, L, g, n)
        grad_C = grad_C.permute(0, 1, 3, 2, 4).reshape(b, L, g, n)
        return grad_x, grad_dt, grad_A, grad_B, grad_C, grad_D, grad_init, None, None


def _per_head(D: torch.Tensor, g: int, hg: int) -> torch.Tensor:
    """D [h] or [h, p] as a factor broadcasting over head-major blocks [..., g, hg, T, p]."""
    return D.reshape(g, hg, 1, -1)


def _pass_states(
    chunk_states: torch.Tensor,
    chunk_log_decay: torch.Tensor,
    initial_states: torch.Tensor | None,
    boundary_segments: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Carry states across chunk boundaries.

    chunk_states [b, c, g, hg, p, n]: what each chunk adds, already decayed to its end and restricted to the segment of
    its last token. chunk_log_decay [b, c, g, hg]: total log-decay of each chunk. boundary_segments [b, c + 1]: segment
    of the token just before each boundary (index 0 is the virtual token before the sequence, segment 0).
    Returns the state entering each chunk [b, c, g, hg, p, n] and the final state [b, g, hg, p, n].
    """
    b, c, g, hg, p, n = chunk_states.shape
    on_cpu = chunk_states.device.type == "cpu"
    if c <= (STATE_PASSING_MATMUL_MAX_CHUNKS_CPU if on_cpu else STATE_PASSING_MATMUL_MAX_CHUNKS):
        # S[k] = sum_{j <= k} exp(P[k] - P[j]) * s[j] with s[0] = initial state, s[j] = chunk j - 1's state, P the
        # running sum of chunk decays; terms whose segment differs from the boundary's are masked away.
        log_decay = chunk_log_decay.permute(0, 2, 3, 1)  # [b, g, hg, c]
        prefix = F.pad(torch.cumsum(log_decay, dim=-1), (1, 0))  # [b, g, hg, c + 1]
        keep = torch.ones(c + 1, c + 1, dtype=torch.bool, device=chunk_states.device).tril()
        if boundary_segments is not None:
            same = boundary_segments[:, :, None] == boundary_segments[:, None, :]  # [b, c + 1, c + 1]
            keep = (keep & same)[:, None, None]
        weights = _masked_exp(prefix[..., :, None] - prefix[..., None, :], keep)  # [b, g, hg, c + 1, c + 1]
        flat = chunk_states.permute(0, 2, 3, 1, 4, 5).reshape(b, g, hg, c, p * n)
        if initial_states is None:
            carried = weights[..., 1:] @ flat
        else:
            flat = torch.cat([initial_states.reshape(b, g, hg, 1, p * n), flat], dim=3)
            carried = weights @ flat
        carried = carried.reshape(b, g, hg, c + 1, p, n)
        return carried[:, :, :, :c].permute(0, 3, 1, 2, 4, 5), carried[:, :, :, c]

    decay = _exp_flushed(chunk_log_decay)  # [b, c, g, hg]
    if boundary_segments is not None:
        same = (boundary_segments[:, 1:] == boundary_segments[:, :-1]).to(decay.dtype)  # [b, c]
        decay = decay * same[:, :, None, None]
    decay = decay[..., None, None]
    # H[k + 1] = decay[k] * H[k] + states[k], each written straight into its slot (the scan's autograd Function
    # differentiates this recurrence by hand, so no graph is recorded here).
    entering = chunk_states.new_empty(chunk_states.shape)
    if initial_states is not None:
        entering[:, 0] = initial_states
    else:
        entering[:, 0].zero_()
    for k in range(c - 1):
        torch.addcmul(chunk_states[:, k], entering[:, k], decay[:, k], out=entering[:, k + 1])
    return entering, torch.addcmul(chunk_states[:, c - 1], entering[:, c - 1], decay[:, c - 1])


def ssd_chunk_scan_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    *,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    return_final_states: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan in plain PyTorch; same arguments and semantics as ``mamba_chunk_scan_combined``.

    Shapes: x [b, l, h, p], dt [b, l, h], A [h], B and C [b, l, g, n], D [h] or [h, p], z [b, l, h, p], dt_bias [h],
    initial_states [b, h, p, n], seq_idx [b, l] (integer document ids). ``l`` need not be a multiple of
    ``chunk_size`` (the tail chunk is zero-padded with dt = 0, which neither adds to nor decays the state).

    Computes in float32 (float64 when any input is float64). Returns y [b, l, h, p] in x's dtype, and with
    ``return_final_states`` also the state after the last token [b, h, p, n] in the compute dtype (float32, like
    mamba_ssm). With ``seq_idx`` the final state is that of the last document; ``initial_states`` only reach the
    leading document, and only when its id is 0 (mamba_ssm's rule).
    """
    check_ssd_shapes(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx)
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    hg = h // g
    T = min(chunk_size, MAX_BLOCK)
    nc = max(1, -(-l // T))
    pad = nc * T - l
    cdt = compute_dtype(x, dt, A, B, C)

    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit, cdt)
    xc, Bc, Cc = x.to(cdt), B.to(cdt), C.to(cdt)
    seg = segment_ids(seq_idx) if seq_idx is not None else None
    if pad:
        xc_p = F.pad(xc, (0, 0, 0, 0, 0, pad))  # padded tokens have dt = 0: they neither add to nor decay the state
        dt = F.pad(dt, (0, 0, 0, pad))
        Bc = F.pad(Bc, (0, 0, 0, 0, 0, pad))
        Cc = F.pad(Cc, (0, 0, 0, 0, 0, pad))
        if seg is not None:
            seg = torch.cat([seg, seg[:, -1:].expand(b, pad)], dim=1)
    else:
        xc_p = xc

    masks = None
    if seg is not None:
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        segc = seg.reshape(b, nc, T)
        intra_keep = (causal & (segc[..., :, None] == segc[..., None, :]))[:, :, None, None]  # [b, c, 1, 1, T, T]
        boundary = F.pad(segc[:, :, -1], (1, 0), value=0)  # [b, c + 1]
        end_keep = (segc == segc[..., -1:])[:, :, None, None].to(cdt)  # [b, c, 1, 1, T]
        start_keep = (segc == boundary[:, :-1, None])[:, :, None, None].to(cdt)
        masks = (intra_keep, end_keep, start_keep, boundary)
    init = None
    if initial_states is not None:
        init = initial_states.to(cdt).reshape(b, g, hg, p, n)
    Dc = D.to(cdt) if D is not None else None
    # The scan computes in ``cdt`` by design; under autocast its matmuls would otherwise be re-cast to bf16 and meet
    # float32 operands (baddbmm_ refuses mixed dtypes), so autocast is switched off around it.
    with torch.autocast(device_type=xc_p.device.type, enabled=False):
        y, final = _ChunkedScan.apply(xc_p, dt, A.to(cdt), Bc, Cc, Dc, init, T, masks)
    if pad:
        y = y[:, :l]
    if z is not None:
        y = y * F.silu(z.to(cdt))
    y = y.to(x.dtype)
    if return_final_states:
        return y, final.reshape(b, h, p, n)
    return y
