"""Pure-PyTorch causal depthwise conv1d, the reference for causal_conv1d's ``causal_conv1d_fn``.

``out[:, c, t] = bias[c] + sum_j weight[c, j] * x[:, c, t - (w - 1) + j]`` with positions before 0 taken from
``initial_states`` (zeros when absent), then optional SiLU. With ``seq_idx`` a tap only reads tokens of the same
document segment as the output token (``_common.segment_ids``), so the window never mixes documents; the initial
states count as segment 0, i.e. they only feed the leading document when its id is 0 (the rule of the SSD scan, so
that conv and scan agree on what "the first document" is).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_hybrid.ops._common import check_activation, compute_dtype, segment_ids


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [b, d, l], weight [d, w], bias [d], initial_states [b, d, w - 1], seq_idx [b, l] -> out [b, d, l].

    With ``return_final_states`` also returns the last ``w - 1`` inputs [b, d, w - 1] (what a continuation needs as
    ``initial_states``); under ``seq_idx`` inputs of other documents than the last token's are zeroed there, so the
    final state is the one the last document would have alone. Computes in float32 (float64 for float64 inputs) and
    returns x's dtype.
    """
    silu = check_activation(activation)
    if x.dim() != 3:
        raise ValueError(f"x must be [batch, dim, seqlen], got shape {tuple(x.shape)}")
    b, d, l = x.shape
    if weight.dim() != 2 or weight.shape[0] != d:
        raise ValueError(f"weight must be [{d}, width], got shape {tuple(weight.shape)}")
    w = weight.shape[1]
    if bias is not None and bias.shape != (d,):
        raise ValueError(f"bias must be [{d}], got shape {tuple(bias.shape)}")
    if initial_states is not None and initial_states.shape != (b, d, w - 1):
        raise ValueError(f"initial_states must be {(b, d, w - 1)}, got shape {tuple(initial_states.shape)}")
    if seq_idx is not None and seq_idx.shape != (b, l):
        raise ValueError(f"seq_idx must be {(b, l)}, got shape {tuple(seq_idx.shape)}")

    cdt = compute_dtype(x, weight)
    xc, wc = x.to(cdt), weight.to(cdt)
    bc = bias.to(cdt) if bias is not None else None
    if initial_states is not None:
        padded = torch.cat([initial_states.to(cdt), xc], dim=-1)
    else:
        padded = F.pad(xc, (w - 1, 0))
    final = padded[..., l:] if return_final_states else None  # [b, d, w - 1]

    if seq_idx is None:
        out = F.conv1d(padded, wc.unsqueeze(1), bc, groups=d)
    else:
        seg = segment_ids(seq_idx)
        seg_padded = F.pad(seg, (w - 1, 0), value=0)
        out = padded[..., w - 1:] * wc[:, w - 1, None]  # the current token always belongs to its own segment
        for j in range(w - 1):
            same = (seg_padded[:, j:j + l] == seg).unsqueeze(1)
            out = out + padded[..., j:j + l] * same * wc[:, j, None]
        if bc is not None:
            out = out + bc[:, None]
        if final is not None:
            final = final * (seg_padded[:, l:] == seg[:, -1:]).unsqueeze(1)
    if silu:
        out = F.silu(out)
    out = out.to(x.dtype)
    if return_final_states:
        return out, final.to(x.dtype)
    return out
