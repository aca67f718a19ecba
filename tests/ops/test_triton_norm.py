"""Our Triton RMSNorm / grouped gated RMSNorm (``ops.triton_norm``) against the float64 reference, in Triton's CPU
interpreter (``triton_interpreter.py`` says how; a fresh process runs them where this one cannot).

Crossed boundaries: rows that do not fill the last tile, groups that are not a power of two (masked columns), one and
several groups, several row tiles per backward program, and ``z`` / gradients read and written in place inside a
wider buffer (how the mixer's fused span uses them).
"""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import fresh_process_test, interpret_if_possible, interpreted_kernel_modules, interpreter_only

interpret_if_possible()
triton = pytest.importorskip(
    "triton", reason="triton is not installed: the Triton norm kernels are checked only with it (pip install triton)"
)

from megatron_hybrid.ops.norm import gated_rms_norm_ref  # noqa: E402

needs_interpreter = interpreter_only(triton)
test_in_a_fresh_process = fresh_process_test(triton, __file__)


@pytest.fixture(scope="module")
def tnorm():
    yield from interpreted_kernel_modules("megatron_hybrid.ops.triton_norm")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _compare(tnorm, b, l, width, group, gated, dtype, rel, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, width, generator=gen)
    z = torch.randn(b, l, width, generator=gen) * 2 if gated else None
    w = 1 + 0.3 * torch.randn(width, generator=gen)
    grad = torch.randn(b, l, width, generator=gen)
    results = []
    for kernel in (True, False):
        cast = (lambda t: t.to(dtype)) if kernel else (lambda t: t.double())
        leaves = [cast(t).detach().clone().requires_grad_() if t is not None else None for t in (x, z, w)]
        fn = tnorm.group_rms_norm_triton if kernel else gated_rms_norm_ref
        out = fn(leaves[0], leaves[1], leaves[2], 1e-5, group)
        (out.double() * grad.double()).sum().backward()
        results.append([out] + [t.grad for t in leaves if t is not None])
    for got, want in zip(*results):
        assert got.dtype in (dtype, torch.float32), got.dtype
        assert _relative(got, want) <= rel, _relative(got, want)


@needs_interpreter
@pytest.mark.parametrize(("b", "l", "width", "group"), [(2, 37, 64, 16), (1, 5, 36, 12), (3, 11, 40, 40)],
                         ids=["4_groups", "non_power_of_two_groups", "one_group"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_forward_and_gradients_match_float64(tnorm, b, l, width, group, gated):
    _compare(tnorm, b, l, width, group, gated, torch.float32, rel=2e-6)


@needs_interpreter
def test_half_precision(tnorm):
    _compare(tnorm, 2, 9, 32, 16, True, torch.float16, rel=2e-3)


@needs_interpreter
def test_several_row_tiles_per_backward_program(tnorm, monkeypatch):
    # 100 rows of two 8-wide groups in tiles of 4 rows (25 tiles; the default tile would hold all of them), about 3
    # programs wanted: 16 tiles per program, so each program's loop runs several tiles and the second runs past the end
    monkeypatch.setattr(tnorm, "TILE_ELEMENTS", 32)
    monkeypatch.setattr(tnorm, "BWD_PROGRAMS", 3)
    _compare(tnorm, 2, 50, 16, 8, True, torch.float32, rel=2e-6, seed=1)


@needs_interpreter
def test_views_into_a_wider_buffer_are_read_and_written_in_place(tnorm):
    """z read from, and dx / dz written into, slices of [b, l, width + extra] buffers; nothing else is touched."""
    gen = torch.Generator().manual_seed(2)
    b, l, width, group = 2, 13, 24, 8
    packed = torch.randn(b, l, 3 * width, generator=gen)
    x, z = torch.randn(b, l, width, generator=gen), packed[..., width:2 * width]
    w = torch.rand(width, generator=gen) + 0.5
    out, rstd = tnorm.group_rms_norm_fwd(x, z, w, 1e-6, group)
    out_c, rstd_c = tnorm.group_rms_norm_fwd(x, z.contiguous(), w, 1e-6, group)
    assert torch.equal(out, out_c) and torch.equal(rstd, rstd_c)
    dout = torch.randn(b, l, width, generator=gen)
    grads = torch.full((b, l, 3 * width), 7.0)
    dx, dz, dw = tnorm.group_rms_norm_bwd(dout, x, z, w, rstd, group, dx=grads[..., :width],
                                          dz=grads[..., 2 * width:])
    dx_c, dz_c, dw_c = tnorm.group_rms_norm_bwd(dout, x, z.contiguous(), w, rstd, group)
    assert torch.equal(grads[..., :width], dx_c) and torch.equal(grads[..., 2 * width:], dz_c)
    assert torch.equal(dw, dw_c)
    assert (grads[..., width:2 * width] == 7.0).all()
    want = gated_rms_norm_ref(x.double(), z.double(), w.double(), 1e-6, group)
    assert _relative(out, want) <= 2e-6
