"""Pure-PyTorch causal depthwise conv1d, the reference for causal_conv1d's ``causal_conv1d_fn``.

``out[:, c, t] = bias[c] + sum_j weight[c, j] * x[:, c, t - (w - 1) + j]`` with positions before 0 taken from
``initial_states`` (zeros when absent), then optional SiLU. With ``seq_idx`` a tap only reads tokens of the same
document segment as the output token (``_common.segment_ids``), so the window never mixes documents; the initial
states count as segment 0, i.e. they only feed the leading document when its id is 0 (the rule of the SSD scan, so
that conv and scan agree on what "the first document" is).

On the CPU (and whenever ``seq_idx`` is given) the convolution is computed as ``w`` shifted multiply-adds over a
``[b, l, d]`` view, channels fastest, by :class:`_ShiftedDepthwiseConv`, whose hand-written backward accumulates the
input gradient in place. oneDNN's depthwise ``conv1d`` backward is slow and erratic there (0.02 to 2 s for one
``[4, 768, 512]`` call), and a Mamba mixer hands the conv a channel-last view anyway. On other devices the native
``F.conv1d`` (cuDNN) stays the fallback of causal_conv1d's kernel.
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
    # Padded input as [b, l + w - 1, d], channels fastest (the layout the shifted taps want; a free transpose of the
    # mixer's activations). A cat rather than F.pad, which would first fill its whole output with zeros.
    if initial_states is not None:
        head = initial_states.to(cdt).transpose(1, 2)
    else:
        head = xc.new_zeros(b, w - 1, d)
    padded = torch.cat([head, xc.transpose(1, 2)], dim=1)
    final = padded[:, l:].transpose(1, 2) if return_final_states else None  # [b, d, w - 1]

    if seq_idx is None and x.device.type != "cpu":
        out = F.conv1d(padded.transpose(1, 2), wc.unsqueeze(1), bc, groups=d)
    else:
        masks = None
        if seq_idx is not None:
            seg = segment_ids(seq_idx)
            seg_padded = F.pad(seg, (w - 1, 0), value=0)
            # Tap j of output t reads input t - (w - 1) + j; it counts only inside the output token's segment (the
            # current token, tap w - 1, always does).
            masks = torch.stack([seg_padded[:, j:j + l] == seg for j in range(w - 1)], dim=-1).to(cdt)  # [b, l, w-1]
            if final is not None:
                final = final * (seg_padded[:, l:] == seg[:, -1:]).unsqueeze(1)
        out = _ShiftedDepthwiseConv.apply(padded, wc, bc, masks).transpose(1, 2)
    if silu:
        out = F.silu(out)
    out = out.to(x.dtype)
    if return_final_states:
        return out, final.to(x.dtype)
    return out


# Time steps per block of the weight-gradient reduction (32 steps x batch 4 x 768 channels x 4 taps: 1.5 MB).
_WEIGHT_GRAD_ROWS = 32


class _ShiftedDepthwiseConv(torch.autograd.Function):
    """``out[:, t] = bias + sum_j weight[:, j] * padded[:, t + j] * masks[:, t, j]`` on ``[b, L, d]`` views.

    ``padded`` [b, l + w - 1, d] (best with d contiguous), ``weight`` [d, w], ``bias`` [d] or None, ``masks``
    [b, l, w - 1] (0/1, taps ``0 .. w - 2``; the last tap is never masked) or None. Returns [b, l, d]. The backward
    scatters the input gradient tap by tap into one buffer instead of letting autograd materialise a full-size zero
    tensor per shifted slice, and saves only the padded input.
    """

    @staticmethod
    def forward(ctx, padded: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                masks: torch.Tensor | None) -> torch.Tensor:
        w = weight.shape[1]
        l = padded.shape[1] - (w - 1)
        taps = weight.t().contiguous()  # [w, d]: each tap's weights contiguous, like the channels they scale
        last = padded[:, w - 1:]
        out = torch.addcmul(bias, last, taps[w - 1]) if bias is not None else last * taps[w - 1]
        for j in range(w - 1):
            tap = padded[:, j:j + l]
            if masks is not None:
                tap = tap * masks[:, :, j, None]
            out.addcmul_(tap, taps[j])
        ctx.save_for_backward(padded, taps, masks)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        padded, taps, masks = ctx.saved_tensors
        w = taps.shape[0]
        l = padded.shape[1] - (w - 1)
        grad_out = grad_out.contiguous()
        grad_padded = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # The last tap covers rows w - 1 .. end: it initialises them, only the first w - 1 rows need zeros.
            grad_padded = torch.empty_like(padded, memory_format=torch.contiguous_format)
            grad_padded[:, :w - 1].zero_()
            torch.mul(grad_out, taps[w - 1], out=grad_padded[:, w - 1:])
        grad_taps = []
        for j in range(w):
            grad_tap = grad_out
            if masks is not None and j < w - 1:
                grad_tap = grad_out * masks[:, :, j, None]
            grad_taps.append(grad_tap)
            if grad_padded is not None and j < w - 1:
                grad_padded[:, j:j + l].addcmul_(grad_tap, taps[j])
        if ctx.needs_input_grad[1]:
            # dweight[j] = sum over batch and time of grad * input shifted by j, accumulated over row blocks small
            # enough that a block of grad and input is read from memory once for all w taps (then from cache).
            grad_weight = taps.new_zeros(taps.shape)
            rows = _WEIGHT_GRAD_ROWS
            for start in range(0, l, rows):
                end = min(start + rows, l)
                if masks is None:
                    # All taps at once: the block's inputs as a [w, b, rows, d] window view times the block's grad.
                    window = padded[:, start:end + w - 1].unfold(1, w, 1).permute(3, 0, 1, 2)
                    grad_weight += (grad_out[:, start:end].unsqueeze(0) * window).sum(dim=(1, 2))
                else:
                    for j in range(w):
                        grad_weight[j] += (grad_taps[j][:, start:end] * padded[:, start + j:end + j]).sum(dim=(0, 1))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum(dim=(0, 1))
        return grad_padded, None if grad_weight is None else grad_weight.t(), grad_bias, None
