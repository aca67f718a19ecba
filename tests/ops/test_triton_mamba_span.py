"""The mixer's fused training span (``ops.triton_mamba_span``: conv -> SSD scan -> gated norm as one autograd node
writing every gradient of ``in_proj``'s output into one buffer), in Triton's CPU interpreter.

Two oracles: the float64 composition of the reference ops (conv, scan, gated norm), and the same Triton kernels
composed as separate autograd nodes, which the span must reproduce bit for bit (it only moves where the gradients are
written). ``in_proj``'s output is a strided view, as under sequence parallelism.
"""

from __future__ import annotations

import math

import pytest
import torch
from triton_interpreter import fresh_process_test, interpret_if_possible, interpreted_kernel_modules, interpreter_only

interpret_if_possible()
triton = pytest.importorskip(
    "triton", reason="triton is not installed: the Triton kernels are checked only with it (pip install triton)"
)

from megatron_hybrid.ops._common import segment_ids  # noqa: E402
from megatron_hybrid.ops.conv1d import causal_conv1d_ref  # noqa: E402
from megatron_hybrid.ops.norm import gated_rms_norm_ref  # noqa: E402
from megatron_hybrid.ops.ssd import ssd_chunk_scan_ref  # noqa: E402

needs_interpreter = interpreter_only(triton)
test_in_a_fresh_process = fresh_process_test(triton, __file__)

H, P, G, N, KW = 4, 8, 2, 8, 4  # heads, headdim, groups, d_state, conv width
D_INNER, GW = H * P, G * N
CONV = D_INNER + 2 * GW
WIDTH = D_INNER + CONV + H


@pytest.fixture(scope="module")
def kernels():
    yield from interpreted_kernel_modules(
        "megatron_hybrid.ops.triton_conv1d", "megatron_hybrid.ops.triton_norm", "megatron_hybrid.ops.triton_ssd",
        "megatron_hybrid.ops.triton_mamba_span",
    )


def _shape(kernels, chunk=16, dt_limit=(0.0, math.inf)):
    return kernels[3].MambaSpanShape(nheads=H, headdim=P, ngroups=G, d_state=N, chunk_size=chunk,
                                     norm_group_size=D_INNER // G, norm_eps=1e-5, dt_limit=dt_limit)


def _inputs(b, l, *, seed, bias=True, D=True):
    gen = torch.Generator().manual_seed(seed)
    # in_proj's output as a [b, l, width] view of a sequence-first [l, b, width] tensor
    zxbcdt = (torch.randn(l, b, WIDTH, generator=gen) * 0.5).transpose(0, 1)
    return {
        "zxbcdt": zxbcdt,
        "conv_weight": torch.randn(CONV, KW, generator=gen) * 0.5,
        "conv_bias": torch.randn(CONV, generator=gen) * 0.1 if bias else None,
        "A": -torch.rand(H, generator=gen) * 2 - 0.5,
        "D": torch.randn(H, generator=gen) if D else None,
        "dt_bias": torch.randn(H, generator=gen) * 0.5 if bias else None,
        "norm_weight": 1 + 0.2 * torch.randn(D_INNER, generator=gen),
    }, torch.randn(b, l, D_INNER, generator=gen)


def _composed(t, shape, seq_idx, conv, scan, norm):
    """The mixer's composed path with the given op implementations."""
    b, l, _ = t["zxbcdt"].shape
    z, xbc, dt = torch.split(t["zxbcdt"], [D_INNER, CONV, H], dim=-1)
    xbc = conv(xbc, t["conv_weight"], t["conv_bias"], seq_idx)
    x, B, C = torch.split(xbc, [D_INNER, GW, GW], dim=-1)
    y = scan(x.unflatten(-1, (H, P)), dt, t["A"], B.unflatten(-1, (G, N)), C.unflatten(-1, (G, N)), shape, t,
             seq_idx)
    return norm(y.reshape(b, l, D_INNER), z, t["norm_weight"], shape)


def _reference_ops():
    def conv(x, w, bias, seq_idx):
        return causal_conv1d_ref(x.transpose(1, 2), w, bias, "silu", seq_idx=seq_idx).transpose(1, 2)

    def scan(x, dt, A, B, C, shape, t, seq_idx):
        return ssd_chunk_scan_ref(x, dt, A, B, C, shape.chunk_size, D=t["D"], dt_bias=t["dt_bias"], dt_softplus=True,
                                  dt_limit=shape.dt_limit, seq_idx=seq_idx)

    def norm(y, z, w, shape):
        return gated_rms_norm_ref(y, z, w, shape.norm_eps, shape.norm_group_size)

    return conv, scan, norm


def _triton_ops(kernels):
    tconv, tnorm, tssd, _ = kernels

    def conv(x, w, bias, seq_idx):
        return tconv.causal_conv1d_channel_last_triton(x, w, bias, "silu", seq_idx=seq_idx)

    def scan(x, dt, A, B, C, shape, t, seq_idx):
        segments = segment_ids(seq_idx) if seq_idx is not None else None
        return tssd.ssd_chunk_scan_triton(x, dt, A, B, C, shape.chunk_size, D=t["D"], dt_bias=t["dt_bias"],
                                          dt_softplus=True, dt_limit=shape.dt_limit, segments=segments)[0]

    def norm(y, z, w, shape):
        return tnorm.group_rms_norm_triton(y, z, w, shape.norm_eps, shape.norm_group_size)

    return conv, scan, norm


def _run(fn, t, grad_out, dtype):
    # .to and .clone keep the layout: zxbcdt stays a sequence-first [b, l, width] view
    leaves = {k: v.to(dtype).detach().clone().requires_grad_() if v is not None else None for k, v in t.items()}
    assert leaves["zxbcdt"].stride() == t["zxbcdt"].stride()
    out = fn(leaves)
    (out.double() * grad_out.double()).sum().backward()
    return out.detach(), {k: v.grad for k, v in leaves.items() if v is not None}


def _documents(b, l):
    seq_idx = torch.zeros(b, l, dtype=torch.int64)
    seq_idx[0, 9:] = 1
    seq_idx[0, 31:] = 2  # one token before a chunk edge
    seq_idx[-1, 16:] = 3  # on a chunk edge
    return seq_idx


@needs_interpreter
@pytest.mark.parametrize("documents", [False, True], ids=["one_document", "documents"])
@pytest.mark.parametrize(("bias", "D", "dt_limit"), [(True, True, (0.0, math.inf)), (False, False, (0.02, 0.8))],
                         ids=["bias_and_D", "no_bias_no_D_dt_clamped"])
def test_span_matches_float64_reference_and_composed_kernels_bitwise(kernels, documents, bias, D, dt_limit):
    b, l = 2, 45  # three chunks of 16, the last one short
    t, grad_out = _inputs(b, l, seed=int(documents) + 2 * int(bias), bias=bias, D=D)
    shape = _shape(kernels, dt_limit=dt_limit)
    seq_idx = _documents(b, l) if documents else None
    span = kernels[3]
    segments = segment_ids(seq_idx).to(torch.int32) if documents else None

    def fused(v):
        return span.mamba_span_triton(v["zxbcdt"], v["conv_weight"], v["conv_bias"], v["A"], v["D"], v["dt_bias"],
                                      v["norm_weight"], shape, segments)

    out, grads = _run(fused, t, grad_out, torch.float32)
    # a sequence-first in_proj output gives a sequence-first output and gradient (no transposes around the matmuls)
    assert out.stride()[:2] == (D_INNER, b * D_INNER) and grads["zxbcdt"].stride()[:2] == (WIDTH, b * WIDTH)
    want, want_grads = _run(lambda v: _composed(v, shape, seq_idx, *_reference_ops()), t, grad_out, torch.float64)
    same, same_grads = _run(lambda v: _composed(v, shape, seq_idx, *_triton_ops(kernels)), t, grad_out,
                            torch.float32)
    assert torch.equal(out, same)
    assert ((out.double() - want).norm() / want.norm()).item() <= 2e-5
    assert set(grads) == set(want_grads) == set(same_grads)
    for name, grad in grads.items():
        assert torch.equal(grad, same_grads[name]), name
        err = ((grad.double() - want_grads[name]).norm() / want_grads[name].norm()).item()
        assert err <= 2e-5, f"{name}: relative error {err:.2e}"


@needs_interpreter
def test_unsupported_arguments_are_named(kernels):
    span = kernels[3]
    shape = _shape(kernels)
    z = torch.zeros(1, 4, WIDTH)
    w = torch.zeros(CONV, KW)
    assert span.unsupported_reason(z, w, None, shape) is None
    assert "in_proj output" in span.unsupported_reason(torch.zeros(1, 4, WIDTH + 1), w, None, shape)
    assert "conv weight" in span.unsupported_reason(z, torch.zeros(CONV, 9), None, shape)
    assert "chunk_size 24" in span.unsupported_reason(z, w, None, _shape(kernels, chunk=24))
    assert "D of shape" in span.unsupported_reason(z, w, torch.zeros(H, P), shape)
