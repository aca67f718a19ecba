"""Single-token decode steps: the SSM state update (``selective_state_update``) and the conv state update
(``causal_conv1d_update``), in plain PyTorch.

Conv state convention (same as mamba_ssm's ``Mamba2`` and transformers' NemotronH cache): ``conv_state`` is
``[b, d, state_len]`` holding the most recent ``state_len`` conv *inputs*, oldest first, newest last. Caches are
allocated with ``state_len = d_conv`` (the kernel width ``w``); any ``state_len >= w - 1`` works, since only the
newest ``w - 1`` entries are read. A prefill fills it with the last ``state_len`` inputs of the prompt (left-padded
with zeros); ``causal_conv1d(..., return_final_states=True)`` returns the newest ``w - 1`` of them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megatron_hybrid.ops._common import check_activation, compute_dtype, process_dt


def causal_conv1d_update_ref(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """Conv output for the new token(s) x [b, d] (or [b, d, l]) given the previous inputs in ``conv_state``.

    ``conv_state`` [b, d, state_len >= w - 1] is shifted left in place and the new inputs are appended.
    Returns [b, d] (or [b, d, l]) in x's dtype.
    """
    silu = check_activation(activation)
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(-1)
    b, d, l = x.shape
    w = weight.shape[-1]
    state_len = conv_state.shape[-1]
    if conv_state.shape[:2] != (b, d) or state_len < w - 1:
        raise ValueError(f"conv_state must be [{b}, {d}, >= {w - 1}], got shape {tuple(conv_state.shape)}")
    if weight.shape != (d, w):
        raise ValueError(f"weight must be [{d}, width], got shape {tuple(weight.shape)}")
    cdt = compute_dtype(x, weight)
    window = torch.cat([conv_state.to(cdt), x.to(cdt)], dim=-1)  # [b, d, state_len + l]
    if state_len:
        conv_state.copy_(window[..., -state_len:])
    bc = bias.to(cdt) if bias is not None else None
    if l == 1:
        # One token (decode): a width-w dot product per channel; a conv call costs far more than it computes.
        out = (window[..., -w:] * weight.to(cdt)).sum(dim=-1, keepdim=True)
        if bc is not None:
            out = out + bc[:, None]
    else:
        out = F.conv1d(window[..., window.shape[-1] - (l + w - 1):], weight.to(cdt).unsqueeze(1), bc, groups=d)
    if silu:
        out = F.silu(out)
    out = out.to(x.dtype)
    return out.squeeze(-1) if squeeze else out


def ssm_state_update_ref(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
) -> torch.Tensor:
    """One recurrence step; ``state`` [b, h, p, n] is updated in place, returns y [b, h, p] in x's dtype.

    x [b, h, p], dt [b, h], A [h], B and C [b, g, n], D [h] or [h, p], z [b, h, p], dt_bias [h]. The per-channel
    forms of mamba_ssm's ``selective_state_update`` (dt [b, h, p], A [h, p, n], dt_bias [h, p]) are accepted too.
    ``dt`` is processed exactly as in the chunked scan (bias, softplus, clamp to ``dt_limit``), so stepping token by
    token reproduces ``ssd_chunk_scan``.
    """
    b, h, p, n = state.shape
    g = B.shape[1]
    if x.shape != (b, h, p) or B.shape != (b, g, n) or C.shape != B.shape or h % g:
        raise ValueError(
            f"ssm_state_update: shapes state {tuple(state.shape)}, x {tuple(x.shape)}, B {tuple(B.shape)}, "
            f"C {tuple(C.shape)} are inconsistent (want x [b,h,p], B/C [b,g,n] with g dividing h)"
        )
    hg = h // g
    cdt = compute_dtype(state, x, dt, A, B, C)
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit, cdt)
    dt = dt.unsqueeze(-1) if dt.dim() == 2 else dt  # [b, h, 1 or p]
    Ac = A.to(cdt)
    Ac = Ac[:, None, None] if Ac.dim() == 1 else Ac  # [h, 1, 1] or [h, p, n]
    decay = torch.exp(dt.unsqueeze(-1) * Ac)  # [b, h, 1 or p, 1 or n]
    xc = x.to(cdt)
    # Grouped view [b, g, hg, ...]: the heads of a group share B and C by broadcasting.
    dt_x = (dt * xc).reshape(b, g, hg, p, 1)
    B_g = B.to(cdt).reshape(b, g, 1, 1, n)
    if state.dtype == cdt and state.is_contiguous():
        # In place: two passes over the state instead of four (decode is bound by reading and writing it).
        new_state = state.view(b, g, hg, p, n)
        new_state.mul_(decay.view(b, g, hg, *decay.shape[2:]))
        new_state.addcmul_(dt_x, B_g)
    else:
        new_state = (state.to(cdt) * decay).reshape(b, g, hg, p, n) + dt_x * B_g
        state.copy_(new_state.reshape(b, h, p, n))
    y = (new_state @ C.to(cdt).reshape(b, g, 1, n, 1)).reshape(b, h, p)
    if D is not None:
        Dc = D.to(cdt)
        y = y + xc * (Dc[:, None] if Dc.dim() == 1 else Dc)
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y.to(x.dtype)
