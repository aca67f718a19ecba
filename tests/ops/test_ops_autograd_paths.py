"""The hand-written backwards of the CPU training paths (SSD scan, conv, norms, squared ReLU) against autograd.

The ops' own tests compare values with naive loops; these check gradients in float64 on the shapes that exercise
every branch of the custom autograd Functions: several scan blocks, D per head or per channel, documents, initial
and final states, several row blocks of the conv's weight gradient, and the norms with and without a gate.
"""

from __future__ import annotations

import pytest
import torch
from ops_naive import naive_ssd

import megatron_hybrid.ops.conv1d as conv_module
import megatron_hybrid.ops.ssd as ssd_module
from megatron_hybrid.layers.mlp import squared_relu
from megatron_hybrid.ops import causal_conv1d, gated_rms_norm, rms_norm, ssd_chunk_scan

F64 = torch.float64


def _rnd(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=F64)


@pytest.mark.parametrize(
    "l, chunk, max_block, d_shape, use_init, use_seq, final",
    [
        (9, 4, 64, None, False, False, False),
        (9, 4, 64, "hp", True, False, True),
        (10, 4, 64, "h", False, True, False),
        (12, 8, 4, "h", True, True, True),  # the block length is capped below chunk_size
        (7, 16, 64, "hp", True, True, True),
    ],
)
def test_ssd_gradients(monkeypatch, l, chunk, max_block, d_shape, use_init, use_seq, final):
    monkeypatch.setattr(ssd_module, "MAX_BLOCK", max_block)
    gen = torch.Generator().manual_seed(l + chunk)
    b, h, p, g, n = 2, 2, 2, 1, 2  # small: gradcheck differentiates every input element numerically
    x, dt, B, C = _rnd(gen, b, l, h, p), _rnd(gen, b, l, h), _rnd(gen, b, l, g, n), _rnd(gen, b, l, g, n)
    A = -torch.rand(h, generator=gen, dtype=F64) - 0.1
    D = None if d_shape is None else _rnd(gen, *((h,) if d_shape == "h" else (h, p)))
    init = _rnd(gen, b, h, p, n) if use_init else None
    dt_bias = _rnd(gen, h) * 0.5
    third = l // 3
    seq_idx = None
    if use_seq:
        rows = [[0] * third + [1] * (l - third), [2] * (l // 2) + [3] * (l - l // 2)]
        seq_idx = torch.tensor(rows, dtype=torch.int32)
    candidates = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, init=init, dt_bias=dt_bias)
    values = {k: v for k, v in candidates.items() if v is not None}
    names = list(values)

    def f(*args):
        kw = dict(zip(names, args, strict=True))
        return ssd_chunk_scan(kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], chunk, D=kw.get("D"),
                              dt_bias=kw["dt_bias"], dt_softplus=True, initial_states=kw.get("init"), seq_idx=seq_idx,
                              return_final_states=final, backend="torch")

    inputs = [values[k].clone().requires_grad_() for k in names]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)
    # and the values still match the token-by-token recurrence with several blocks
    out = f(*[values[k] for k in names])
    y = out[0] if final else out
    y_ref, _ = naive_ssd(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True, initial_states=init, seq_idx=seq_idx)
    assert (y - y_ref).abs().max() <= 1e-10


def test_ssd_strongly_decaying_inputs_stay_finite_and_exact():
    """Decays far below float32's range (flushed to 0) change nothing visible and produce no NaN / inf."""
    gen = torch.Generator().manual_seed(3)
    b, l, h, p, g, n = 1, 150, 2, 4, 1, 4
    x, B, C = _rnd(gen, b, l, h, p), _rnd(gen, b, l, g, n), _rnd(gen, b, l, g, n)
    dt = torch.full((b, l, h), 3.0, dtype=F64)  # dt * A = -30 per token: decays of exp(-1900) inside a block
    A = torch.tensor([-10.0, -0.01], dtype=F64)
    y = ssd_chunk_scan(x.float(), dt.float(), A.float(), B.float(), C.float(), 64)
    y_ref, _ = naive_ssd(x, dt, A, B, C)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("use_seq_idx", [False, True])
def test_conv_gradients_over_several_row_blocks(monkeypatch, use_seq_idx):
    monkeypatch.setattr(conv_module, "_WEIGHT_GRAD_ROWS", 3)
    gen = torch.Generator().manual_seed(5)
    x, weight, bias = _rnd(gen, 2, 3, 10), _rnd(gen, 3, 4), _rnd(gen, 3)
    seq_idx = torch.tensor([[0] * 4 + [1] * 6, [2] * 10], dtype=torch.int32) if use_seq_idx else None
    inputs = [t.clone().requires_grad_() for t in (x, weight, bias)]
    assert torch.autograd.gradcheck(lambda a, w, c: causal_conv1d(a, w, c, "silu", seq_idx=seq_idx), inputs)
    # channel-last input (the Mamba mixer's layout) gives the same result as a contiguous one
    channel_last = x.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(causal_conv1d(channel_last, weight, bias, "silu"), causal_conv1d(x, weight, bias, "silu"))


@pytest.mark.parametrize("group_size", [3, 6])
def test_norm_gradients(group_size):
    gen = torch.Generator().manual_seed(7)
    x, z, w = (_rnd(gen, 4, 3, 6).requires_grad_(), _rnd(gen, 4, 3, 6).requires_grad_(),
               _rnd(gen, 6).requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b, c: gated_rms_norm(a, b, c, 1e-5, group_size=group_size), (x, z, w))
    assert torch.autograd.gradcheck(lambda a, c: gated_rms_norm(a, None, c, 1e-5, group_size=group_size), (x, w))
    assert torch.autograd.gradcheck(lambda a, c: rms_norm(a, c, 1e-5), (x, w))
    # training (autograd Function) and inference (plain ops) paths agree
    with torch.no_grad():
        y_inference = gated_rms_norm(x, z, w, 1e-5, group_size=group_size)
    torch.testing.assert_close(gated_rms_norm(x, z, w, 1e-5, group_size=group_size), y_inference)


def test_squared_relu_gradient_and_value():
    x = torch.randn(5, 7, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(squared_relu, (x,))
    assert torch.equal(squared_relu(x), torch.relu(x) ** 2)
