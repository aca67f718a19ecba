"""Naive, obviously-correct loops that the ops tests compare the kernels against.

Written independently of megatron_hybrid.ops (token-by-token recurrences, tap-by-tap convolution, the norm formula),
so that a shared misunderstanding cannot make a kernel and its oracle agree. Documents follow the contract: state
resets wherever ``seq_idx`` changes between neighbouring tokens, and the initial state behaves like the state of a
virtual token before position 0 with document id 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def naive_dt(dt, dt_bias=None, dt_softplus=False, dt_limit=(0.0, math.inf)):
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = torch.log1p(torch.exp(dt))
    return dt.clamp(min=dt_limit[0], max=dt_limit[1])


def naive_ssd(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, math.inf),
              initial_states=None, seq_idx=None):
    """Token-by-token recurrence: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T ; y_t = h_t C_t + D x_t (* silu(z_t))."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    dt = naive_dt(dt, dt_bias, dt_softplus, dt_limit)
    state = initial_states.clone() if initial_states is not None else x.new_zeros(b, h, p, n)
    previous_doc = torch.zeros(b, dtype=torch.long)
    ys = []
    for t in range(l):
        if seq_idx is not None:
            doc = seq_idx[:, t].long()
            state = torch.where((doc != previous_doc)[:, None, None, None], torch.zeros_like(state), state)
            previous_doc = doc
        new_state = torch.empty_like(state)
        y = x.new_empty(b, h, p)
        for head in range(h):
            group = head // (h // g)
            decay = torch.exp(dt[:, t, head] * A[head])  # [b]
            outer = x[:, t, head, :, None] * B[:, t, group, None, :]  # [b, p, n]
            new_state[:, head] = decay[:, None, None] * state[:, head] + dt[:, t, head, None, None] * outer
            y[:, head] = (new_state[:, head] * C[:, t, group, None, :]).sum(-1)
        state = new_state
        if D is not None:
            y = y + x[:, t] * (D[:, None] if D.dim() == 1 else D)
        if z is not None:
            y = y * F.silu(z[:, t])
        ys.append(y)
    return torch.stack(ys, dim=1), state


def naive_conv(x, weight, bias=None, activation=None, *, seq_idx=None, initial_states=None):
    """out[t] = bias + sum_k weight[:, w-1-k] * x[t-k], reading only same-document inputs; also the final window."""
    b, d, l = x.shape
    w = weight.shape[1]
    init = initial_states if initial_states is not None else x.new_zeros(b, d, w - 1)

    def tap(row, pos):
        """Input at position pos (negative positions read the initial state)."""
        return x[row, :, pos] if pos >= 0 else init[row, :, w - 1 + pos]

    def same_document(row, src, dst):
        if seq_idx is None:
            return True
        docs = [0 if q < 0 else int(seq_idx[row, q]) for q in range(src, dst + 1)]
        return all(doc == docs[-1] for doc in docs)  # no change of document id between src and dst

    out = x.new_zeros(b, d, l)
    for row in range(b):
        for t in range(l):
            acc = bias.clone() if bias is not None else x.new_zeros(d)
            for k in range(w):
                if same_document(row, t - k, t):
                    acc = acc + weight[:, w - 1 - k] * tap(row, t - k)
            out[row, :, t] = acc
    if activation in ("silu", "swish"):
        out = F.silu(out)
    final = x.new_zeros(b, d, w - 1)
    for row in range(b):
        for j in range(w - 1):
            pos = l - (w - 1) + j
            if same_document(row, pos, l - 1):
                final[row, :, j] = tap(row, pos)
    return out, final


def naive_gated_rms_norm(x, z, weight, eps, group_size, norm_before_gate):
    """The formula, one group at a time."""
    chunks = []
    for start in range(0, x.shape[-1], group_size):
        part = x[..., start:start + group_size]
        gate = z[..., start:start + group_size] * torch.sigmoid(z[..., start:start + group_size]) if z is not None \
            else None
        if gate is not None and not norm_before_gate:
            part = part * gate
        normed = part / torch.sqrt((part * part).mean(-1, keepdim=True) + eps) * weight[start:start + group_size]
        if gate is not None and norm_before_gate:
            normed = normed * gate
        chunks.append(normed)
    return torch.cat(chunks, dim=-1)
