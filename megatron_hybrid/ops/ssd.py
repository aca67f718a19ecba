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
# autograd and GPUs); beyond it a loop over chunks is cheaper, because the matmul form costs chunks^2 * state size.
STATE_PASSING_MATMUL_MAX_CHUNKS = 64


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
    """exp where ``keep``, exactly 0 elsewhere; masking before exp keeps both the value and its gradient finite."""
    return log_decay.masked_fill(~keep, -math.inf).exp()


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
    if c <= STATE_PASSING_MATMUL_MAX_CHUNKS:
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

    state = initial_states if initial_states is not None else chunk_states.new_zeros(b, g, hg, p, n)
    decay = chunk_log_decay.exp()  # [b, c, g, hg]
    if boundary_segments is not None:
        same = (boundary_segments[:, 1:] == boundary_segments[:, :-1]).to(decay.dtype)  # [b, c]
        decay = decay * same[:, :, None, None]
    entering = []
    # unbind (not indexing) so that autograd stacks the per-chunk gradients once instead of scattering each one into
    # a zero tensor of the full size.
    for decay_k, added_k in zip(decay[..., None, None].unbind(1), chunk_states.unbind(1), strict=True):
        entering.append(state)
        state = state * decay_k + added_k
    return torch.stack(entering, dim=1), state


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
    T = chunk_size
    nc = max(1, -(-l // T))
    pad = nc * T - l
    cdt = compute_dtype(x, dt, A, B, C)

    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit, cdt)
    xc, Bc, Cc = x.to(cdt), B.to(cdt), C.to(cdt)
    seg = segment_ids(seq_idx) if seq_idx is not None else None
    if pad:
        xc_p = F.pad(xc, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        Bc = F.pad(Bc, (0, 0, 0, 0, 0, pad))
        Cc = F.pad(Cc, (0, 0, 0, 0, 0, pad))
        if seg is not None:
            seg = torch.cat([seg, seg[:, -1:].expand(b, pad)], dim=1)
    else:
        xc_p = xc

    # [b, c, g, hg, T, ...] layout: heads of one group share B and C through broadcasting of the hg axis.
    xg = xc_p.reshape(b, nc, T, g, hg, p).permute(0, 1, 3, 4, 2, 5)
    dtg = dt.reshape(b, nc, T, g, hg).permute(0, 1, 3, 4, 2)
    Bg = Bc.reshape(b, nc, T, g, n).permute(0, 1, 3, 2, 4).unsqueeze(3)  # [b, c, g, 1, T, n]
    Cg = Cc.reshape(b, nc, T, g, n).permute(0, 1, 3, 2, 4).unsqueeze(3)
    cum = torch.cumsum(dtg * A.to(cdt).reshape(g, hg, 1), dim=-1)  # [b, c, g, hg, T]
    xdt = xg * dtg.unsqueeze(-1)  # [b, c, g, hg, T, p]

    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    if seg is not None:
        segc = seg.reshape(b, nc, T)
        intra_keep = (causal & (segc[..., :, None] == segc[..., None, :]))[:, :, None, None]  # [b, c, 1, 1, T, T]
        boundary = F.pad(segc[:, :, -1], (1, 0), value=0)  # [b, c + 1]
        end_keep = (segc == segc[..., -1:])[:, :, None, None]  # [b, c, 1, 1, T]
        start_keep = (segc == boundary[:, :-1, None])[:, :, None, None]
    else:
        intra_keep, boundary, end_keep, start_keep = causal, None, None, None

    # 1. Within chunks: masked attention-like form.
    scores = Cg @ Bg.transpose(-1, -2)  # [b, c, g, 1, T, T]
    decay = _masked_exp(cum[..., :, None] - cum[..., None, :], intra_keep)  # [b, c, g, hg, T, T]
    y = (scores * decay) @ xdt  # [b, c, g, hg, T, p]

    # 2. What each chunk adds to the state at its end.
    to_end = torch.exp(cum[..., -1:] - cum)
    if end_keep is not None:
        to_end = to_end * end_keep
    # One [hg * p, T] x [T, n] matmul per group and chunk (B is not expanded over the group's heads).
    weighted = (xdt * to_end.unsqueeze(-1)).transpose(-1, -2).reshape(b, nc, g, hg * p, T)
    chunk_states = (weighted @ Bg.squeeze(3)).view(b, nc, g, hg, p, n)

    # 3. Carry states across chunks.
    init = None
    if initial_states is not None:
        init = initial_states.to(cdt).reshape(b, g, hg, p, n)
    entering, final = _pass_states(chunk_states, cum[..., -1], init, boundary)

    # 4. Contribution of the carried state to every token of the chunk.
    from_start = torch.exp(cum)
    if start_keep is not None:
        from_start = from_start * start_keep
    # One [T, n] x [n, hg * p] matmul per group and chunk (C is not expanded over the group's heads).
    carried = entering.permute(0, 1, 2, 5, 3, 4).reshape(b, nc, g, n, hg * p)
    y_carried = (Cg.squeeze(3) @ carried).view(b, nc, g, T, hg, p).transpose(3, 4)
    y = y + y_carried * from_start.unsqueeze(-1)

    y = y.permute(0, 1, 4, 2, 3, 5).reshape(b, nc * T, h, p)
    if pad:
        y = y[:, :l]
    if D is not None:
        Dc = D.to(cdt)
        y = y + xc * (Dc[:, None] if Dc.dim() == 1 else Dc)
    if z is not None:
        y = y * F.silu(z.to(cdt))
    y = y.to(x.dtype)
    if return_final_states:
        return y, final.reshape(b, h, p, n)
    return y
