"""Our Triton SSD scan (``ops.triton_ssd``), forward and backward, against the float64 reference, in Triton's CPU
interpreter.

The interpreter is turned on at collection where that is safe, else the tests run in a fresh subprocess
(``triton_interpreter.py`` in this folder says how and why). Shapes are tiny but cross every boundary the kernels
have: several chunks, two token blocks per chunk (``BLOCK_T`` is shrunk to 16), a tail chunk shorter than the chunk,
two heads per group, documents that start inside a chunk, on a chunk edge and one token before it, initial states and
a gradient flowing into the final state. Skipped when triton is not installed.
"""

from __future__ import annotations

import math

import pytest
import torch
from triton_interpreter import (
    fresh_process_test,
    interpret_if_possible,
    interpreted_kernel_modules,
    interpreter_only,
)

interpret_if_possible()
triton = pytest.importorskip(
    "triton", reason="triton is not installed: the Triton SSD kernels are checked only with it (pip install triton)"
)

from megatron_hybrid.ops._common import segment_ids  # noqa: E402
from megatron_hybrid.ops.ssd import ssd_chunk_scan_ref  # noqa: E402

MODULE = "megatron_hybrid.ops.triton_ssd"
needs_interpreter = interpreter_only(triton)
NAMES = ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_states")


@pytest.fixture(scope="module")
def tssd():
    module = next(interpreted_kernel_modules(MODULE))
    saved = module.BLOCK_T
    module.BLOCK_T = 16  # two token blocks per 32-token chunk: the block loops and the diagonal blocks both run
    yield module
    module.BLOCK_T = saved


test_in_a_fresh_process = fresh_process_test(triton, __file__)


def _documents(b: int, l: int) -> torch.Tensor:
    seq_idx = torch.zeros(b, l, dtype=torch.int64)
    seq_idx[0, 20:] = 1
    seq_idx[0, 31:] = 2  # one token before the chunk edge at 32
    seq_idx[0, 64:] = 3  # on a chunk edge
    if b > 1:
        seq_idx[1, 5:] = 4  # the leading document has id 0 only for 5 tokens
        seq_idx[1, 40:] = 0  # a non-monotone id still starts a new document
    return seq_idx


def _inputs(b, l, h, g, p, n, *, D, bias, init, seed):
    gen = torch.Generator().manual_seed(seed)
    t = {
        "x": torch.randn(b, l, h, p, generator=gen),
        "dt": torch.randn(b, l, h, generator=gen) * 0.7,
        "A": -torch.rand(h, generator=gen) * 3 - 0.2,
        "B": torch.randn(b, l, g, n, generator=gen) / n**0.5,
        "C": torch.randn(b, l, g, n, generator=gen) / n**0.5,
        "D": torch.randn(h, generator=gen) if D else None,
        "dt_bias": torch.randn(h, generator=gen) * 0.5 if bias else None,
        "initial_states": torch.randn(b, h, p, n, generator=gen) if init else None,
    }
    return t, gen


def _run(tssd, *, b=2, l=75, h=4, g=2, p=16, n=16, chunk=32, documents=False, D=True, bias=True, init=False,
         final_grad=False, softplus=True, dt_limit=(0.0, math.inf), dtype=torch.float32, seed=0):
    """Kernel and float64 reference outputs and gradients for the same inputs; x, B and C are strided views into one
    buffer, as in the mixer (slices of the convolution's output)."""
    t, gen = _inputs(b, l, h, g, p, n, D=D, bias=bias, init=init, seed=seed)
    seq_idx = _documents(b, l) if documents else None
    grad_y = torch.randn(b, l, h, p, generator=gen)
    grad_final = torch.randn(b, h, p, n, generator=gen) if final_grad else None
    results = []
    for kernel in (True, False):
        leaves = {k: (v.to(dtype if k in ("x", "dt", "B", "C") else v.dtype) if kernel else v.double()).detach()
                  for k, v in t.items() if v is not None}
        packed = torch.cat([leaves["x"].flatten(2), leaves["B"].flatten(2), leaves["C"].flatten(2)], dim=-1)
        packed.requires_grad_()
        for k in leaves:
            leaves[k].requires_grad_()
        x = packed[..., :h * p].unflatten(-1, (h, p))
        B = packed[..., h * p:h * p + g * n].unflatten(-1, (g, n))
        C = packed[..., h * p + g * n:].unflatten(-1, (g, n))
        kwargs = dict(D=leaves.get("D"), dt_bias=leaves.get("dt_bias"), dt_softplus=softplus, dt_limit=dt_limit,
                      initial_states=leaves.get("initial_states"))
        if kernel:
            y, final = tssd.ssd_chunk_scan_triton(x, leaves["dt"], leaves["A"], B, C, chunk, **kwargs,
                                                  segments=segment_ids(seq_idx) if documents else None)
        else:
            y, final = ssd_chunk_scan_ref(x, leaves["dt"], leaves["A"], B, C, chunk, **kwargs, seq_idx=seq_idx,
                                          return_final_states=True)
        loss = (y.double() * grad_y.double()).sum()
        if grad_final is not None:
            loss = loss + (final.double() * grad_final.double()).sum()
        loss.backward()
        grads = {"packed": packed.grad}
        grads.update({k: v.grad for k, v in leaves.items() if k not in ("x", "B", "C")})
        results.append((y.detach(), final.detach(), grads))
    return results


def _check(got, want, rel):
    (y, final, grads), (y_r, final_r, grads_r) = got, want
    for name, a, b in [("y", y, y_r), ("final", final, final_r)] + [(k, grads[k], grads_r[k]) for k in grads_r]:
        assert a is not None, name
        err = ((a.double() - b).norm() / b.norm()).item()
        assert err <= rel, f"{name}: relative error {err:.2e} > {rel}"


@needs_interpreter
@pytest.mark.parametrize("documents", [False, True], ids=["one_document", "documents"])
@pytest.mark.parametrize("init", [False, True], ids=["zero_state", "initial_states"])
def test_scan_forward_and_backward_match_float64_reference(tssd, documents, init):
    # float32 kernels (IEEE dots) against float64: the error is float32 rounding over a few hundred terms.
    _check(*_run(tssd, documents=documents, init=init, final_grad=init), rel=2e-5)


@needs_interpreter
def test_options_without_D_bias_softplus_and_with_a_dt_limit(tssd):
    # dt is clamped into [0.05, 1.5] from raw values both sides of it; no softplus, so negative raw dt are clamped too
    _check(*_run(tssd, D=False, bias=False, softplus=False, dt_limit=(0.05, 1.5), documents=True), rel=2e-5)
    _check(*_run(tssd, dt_limit=(0.1, 0.6), seed=1), rel=2e-5)


@needs_interpreter
def test_shapes_that_are_not_powers_of_two_and_one_group(tssd):
    # headdim 12 and d_state 20 are padded to 16 and 32 inside the kernels; one group of three heads; chunk 16 = one
    # token block; a sequence shorter than one chunk
    _check(*_run(tssd, h=3, g=1, p=12, n=20, chunk=16, l=53, documents=True, init=True, final_grad=True), rel=2e-5)
    _check(*_run(tssd, h=2, g=2, l=9, chunk=32, seed=2), rel=2e-5)


@needs_interpreter
def test_half_precision_inputs_round_like_the_kernels_of_mamba_ssm(tssd):
    # float16 operands and products (float32 accumulation): within half-precision rounding of the float64 truth of the
    # same inputs. (bfloat16 is checked on the GPU: Triton 3.9's interpreter computes bfloat16 dots wrongly.)
    _check(*_run(tssd, dtype=torch.float16, documents=True), rel=3e-3)


@needs_interpreter
def test_final_state_only_gradient(tssd):
    """A loss on the final state alone (the output's gradient is absent, not zeros)."""
    t, _ = _inputs(1, 40, 2, 1, 16, 16, D=True, bias=True, init=False, seed=3)
    outs = []
    for kernel in (True, False):
        leaves = {k: (v.clone() if kernel else v.double()).detach().requires_grad_()
                  for k, v in t.items() if v is not None}
        fn = tssd.ssd_chunk_scan_triton if kernel else ssd_chunk_scan_ref
        extra = {} if kernel else {"return_final_states": True}
        _, final = fn(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], 16, D=leaves["D"],
                      dt_bias=leaves["dt_bias"], dt_softplus=True, **extra)
        final.double().square().sum().backward()
        outs.append({k: v.grad for k, v in leaves.items()})
    for k, ref in outs[1].items():
        got = outs[0][k] if outs[0][k] is not None else torch.zeros_like(ref)
        err = ((got.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        assert err <= 2e-5 or ref.norm() == 0, f"{k}: {err:.2e}"


@needs_interpreter
def test_inputs_with_a_strided_last_dimension(tssd):
    """x with a strided headdim (a transposed view): copied to a contiguous last dimension, same results."""
    t, _ = _inputs(1, 40, 2, 1, 16, 16, D=True, bias=True, init=False, seed=4)
    x_strided = t["x"].transpose(-1, -2).contiguous().transpose(-1, -2)
    assert x_strided.stride(-1) != 1
    args = (t["dt"], t["A"], t["B"], t["C"], 16)
    kwargs = dict(D=t["D"], dt_bias=t["dt_bias"], dt_softplus=True)
    y, final = tssd.ssd_chunk_scan_triton(x_strided, *args, **kwargs)
    y_ref, final_ref = tssd.ssd_chunk_scan_triton(t["x"].contiguous(), *args, **kwargs)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(final, final_ref, rtol=0, atol=0)


def test_unsupported_arguments_are_named():
    from megatron_hybrid.ops.triton_ssd import unsupported_reason

    x = torch.zeros(1, 8, 2, 64)
    B = torch.zeros(1, 8, 1, 128)
    assert unsupported_reason(x, B, B, 128, torch.zeros(2)) is None
    assert "chunk_size 96" in unsupported_reason(x, B, B, 96, None)
    assert "chunk_size 512" in unsupported_reason(x, B, B, 512, None)
    assert "headdim 128" in unsupported_reason(torch.zeros(1, 8, 2, 128), B, B, 128, None)
    assert "d_state 256" in unsupported_reason(x, torch.zeros(1, 8, 1, 256), torch.zeros(1, 8, 1, 256), 128, None)
    assert "D of shape" in unsupported_reason(x, B, B, 128, torch.zeros(2, 64))
    assert "mixed dtypes" in unsupported_reason(x, B.bfloat16(), B, 128, None)
    assert "float64" in unsupported_reason(x.double(), B.double(), B.double(), 128, None)
