"""The causal depthwise conv and its decode-time update against naive loops, documents and autograd."""

from __future__ import annotations

import pytest
import torch
from ops_naive import naive_conv

from megatron_hybrid.ops import causal_conv1d, causal_conv1d_update

F64 = torch.float64


def _inputs(b=2, d=3, l=13, w=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, d, l, generator=gen, dtype=F64), torch.randn(d, w, generator=gen, dtype=F64),
            torch.randn(d, generator=gen, dtype=F64), torch.randn(b, d, w - 1, generator=gen, dtype=F64))


SEQ_IDX = torch.tensor([[0, 0, 1, 1, 1, 1, 2, 3, 3, 3, 3, 3, 3], [2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 4, 4]],
                       dtype=torch.int32)


@pytest.mark.parametrize("w", [2, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("use_seq_idx", [False, True])
@pytest.mark.parametrize("use_initial", [False, True])
def test_conv_matches_naive(w, activation, use_seq_idx, use_initial):
    x, weight, bias, init = _inputs(w=w)
    kwargs = dict(seq_idx=SEQ_IDX if use_seq_idx else None, initial_states=init if use_initial else None)
    out, final = causal_conv1d(x, weight, bias, activation, return_final_states=True, backend="torch", **kwargs)
    out_ref, final_ref = naive_conv(x, weight, bias, activation, **kwargs)
    assert out.shape == x.shape and final.shape == (2, 3, w - 1)
    assert (out - out_ref).abs().max() <= 1e-12
    assert (final - final_ref).abs().max() <= 1e-12


def test_sequence_shorter_than_kernel_and_no_bias():
    x, weight, _, init = _inputs(l=2, w=4)
    out, final = causal_conv1d(x, weight, None, "swish", initial_states=init, return_final_states=True)
    out_ref, final_ref = naive_conv(x, weight, None, "silu", initial_states=init)
    assert (out - out_ref).abs().max() <= 1e-12 and (final - final_ref).abs().max() <= 1e-12
    assert torch.equal(final, torch.cat([init[..., 2:], x], dim=-1))  # the last w - 1 inputs, oldest first


def test_packed_documents_equal_separate_runs():
    x, weight, bias, init = _inputs(b=1, l=12)
    lengths = [5, 1, 2, 4]
    seq_idx = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)])[None]
    out, final = causal_conv1d(x, weight, bias, "silu", seq_idx=seq_idx, initial_states=init,
                               return_final_states=True)
    start = 0
    for i, n in enumerate(lengths):
        doc = x[..., start:start + n]
        out_doc, final_doc = causal_conv1d(doc, weight, bias, "silu", initial_states=init if i == 0 else None,
                                           return_final_states=True)
        assert (out[..., start:start + n] - out_doc).abs().max() <= 1e-12
        start += n
    assert (final - final_doc).abs().max() <= 1e-12


def test_continuation_from_final_states():
    x, weight, bias, _ = _inputs(l=11)
    out = causal_conv1d(x, weight, bias, "silu")
    out1, state = causal_conv1d(x[..., :6], weight, bias, "silu", return_final_states=True)
    out2 = causal_conv1d(x[..., 6:], weight, bias, "silu", initial_states=state)
    assert (torch.cat([out1, out2], -1) - out).abs().max() <= 1e-12


def test_gradcheck_conv():
    x, weight, bias, init = _inputs(b=1, d=2, l=6, w=3, seed=1)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1]], dtype=torch.int32)
    inputs = [t.clone().requires_grad_() for t in (x, weight, bias, init)]

    def f(x, weight, bias, init):
        return causal_conv1d(x, weight, bias, "silu", seq_idx=seq_idx, initial_states=init, return_final_states=True)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("state_len", [3, 4, 6])  # w - 1, w (the mamba_ssm / transformers cache width), wider
def test_update_step_by_step_equals_full_conv(state_len):
    x, weight, bias, _ = _inputs(l=9, w=4)
    full = causal_conv1d(x, weight, bias, "silu")
    conv_state = torch.zeros(2, 3, state_len, dtype=F64)
    steps = [causal_conv1d_update(x[..., t], conv_state, weight, bias, "silu") for t in range(9)]
    assert (torch.stack(steps, -1) - full).abs().max() <= 1e-12
    assert torch.equal(conv_state, x[..., -state_len:])  # newest input last


def test_update_continues_a_prefill_and_takes_several_tokens():
    x, weight, bias, _ = _inputs(l=10, w=4)
    full = causal_conv1d(x, weight, bias, None)
    _, final = causal_conv1d(x[..., :7], weight, bias, None, return_final_states=True)
    conv_state = torch.cat([torch.zeros(2, 3, 1, dtype=F64), final], dim=-1)  # width w, as caches are allocated
    out = causal_conv1d_update(x[..., 7:], conv_state, weight, bias, None)  # [b, d, 3]
    assert out.shape == (2, 3, 3) and (out - full[..., 7:]).abs().max() <= 1e-12


def test_bad_activation_and_shapes_raise():
    x, weight, bias, init = _inputs()
    with pytest.raises(NotImplementedError):
        causal_conv1d(x, weight, bias, "relu")
    with pytest.raises(ValueError, match="initial_states"):
        causal_conv1d(x, weight, bias, initial_states=init[..., :1])
    with pytest.raises(ValueError, match="conv_state"):
        causal_conv1d_update(x[..., 0], torch.zeros(2, 3, 2, dtype=F64), weight, bias)
