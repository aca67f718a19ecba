"""The Triton skinny GEMV (``ops.triton_gemv``) against ``x.float() @ W.float().T``, and its dispatch rules.

The kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` must be set before triton is imported, so this
module sets it at collection when triton is not imported yet and no GPU is present (see
``triton_interpreter.py``); otherwise the interpreter tests run in a fresh subprocess. The dispatch rules of the
tensor-parallel linears (``tensor_parallel._use_skinny_gemv``) are checked on CPU by letting "cpu" count as a kernel
device. Skipped when triton is not installed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import (
    fresh_process_test,
    interpret_if_possible,
    interpreted_kernel_modules,
    interpreter_only,
)

interpret_if_possible()
triton = pytest.importorskip(
    "triton", reason="triton is not installed: the Triton GEMV is checked only with it (pip install triton)"
)

from megatron_hybrid import ops  # noqa: E402
from megatron_hybrid.parallel import ParallelGroups, tensor_parallel  # noqa: E402

MODULE = "megatron_hybrid.ops.triton_gemv"
needs_interpreter = interpreter_only(triton)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture(scope="module")
def tgemv():
    yield from interpreted_kernel_modules(MODULE)


test_in_a_fresh_process = fresh_process_test(triton, __file__)


def _check_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    reference = x.float() @ w.float().T
    if b is not None:
        reference = reference + b.float()
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    err = ((y.float() - reference).abs().max() / reference.abs().max()).item()
    assert err <= TOLERANCE[x.dtype], err


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("n,k", [(100, 72), (48, 256)])  # n, k off and on the block sizes
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_reference(tgemv, dtype, m, n, k, with_bias):
    generator = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=generator).to(dtype)
    w = torch.randn(n, k, generator=generator).to(dtype)
    b = torch.randn(n, generator=generator).to(dtype) if with_bias else None
    _check_close(tgemv.gemv_triton(x, w, b), x, w, b)


@needs_interpreter
@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("with_bias", [False, True])
def test_split_k_and_small_tiles(tgemv, m, with_bias):
    """Split-K (partials + reduce kernel), uneven splits, and tiles smaller than the problem in both dims."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(m, 300, generator=generator)
    w = torch.randn(37, 300, generator=generator)
    b = torch.randn(37, generator=generator) if with_bias else None
    for config in (tgemv.GemvConfig(8, 64, split_k=3), tgemv.GemvConfig(4, 32, split_k=4), tgemv.GemvConfig(16, 64)):
        _check_close(tgemv.gemv_triton(x, w, b, config=config), x, w, b)
    even = torch.randn(m, 256, generator=generator)  # EVEN_K with split-K: 256 = 2 splits x 2 blocks of 64
    w_even = torch.randn(37, 256, generator=generator)
    _check_close(tgemv.gemv_triton(even, w_even, b, config=tgemv.GemvConfig(8, 64, split_k=2)), even, w_even, b)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_row_views(tgemv, dtype):
    """x as a slice of a wider tensor (rows strided, last dim contiguous) and in the [s, b, h] layout."""
    generator = torch.Generator().manual_seed(3)
    wide = torch.randn(4, 100, generator=generator).to(dtype)
    x = wide[:, 10:82]  # [4, 72], row stride 100
    w = torch.randn(50, 72, generator=generator).to(dtype)
    _check_close(tgemv.gemv_triton(x, w), x, w, None)
    x3 = torch.randn(2, 3, 100, generator=generator).to(dtype)[..., :72]  # [s, b, h] view
    _check_close(tgemv.gemv_triton(x3, w), x3, w, None)


@needs_interpreter
def test_gemv_or_none_declines(tgemv, monkeypatch):
    x = torch.randn(1, 72)
    w = torch.randn(100, 72)
    assert tgemv.gemv_or_none(torch.randn(17, 72), w) is None  # more rows than the kernel handles
    monkeypatch.setattr(tgemv, "CUBLAS_SHAPES", {tgemv.shape_key(1, 100, 72)})
    assert tgemv.gemv_or_none(x, w) is None
    assert tgemv.gemv_or_none(torch.randn(2, 72), w) is not None  # the dot path of the shape is not listed


def test_dispatch_rules(monkeypatch):
    w = torch.nn.Parameter(torch.randn(8, 16))
    x = torch.randn(1, 1, 16)
    assert not tensor_parallel._use_skinny_gemv(x, w)  # CPU tensors: never
    monkeypatch.setattr(tensor_parallel, "_SKINNY_GEMV_DEVICES", ("cpu",))
    with torch.no_grad():  # the default: one row only (the tl.dot path for more rows lost to cuBLAS on the H200)
        assert not tensor_parallel._use_skinny_gemv(torch.randn(1, 2, 16), w)
    monkeypatch.setattr(tensor_parallel, "SKINNY_GEMV_MAX_ROWS", 16)
    with torch.no_grad():
        assert tensor_parallel._use_skinny_gemv(x, w)
        assert tensor_parallel._use_skinny_gemv(torch.randn(4, 4, 16), w)  # 16 rows
        assert not tensor_parallel._use_skinny_gemv(torch.randn(17, 1, 16), w)  # too many rows
        assert not tensor_parallel._use_skinny_gemv(x, torch.randn(16, 8).t())  # non-contiguous weight
        assert not tensor_parallel._use_skinny_gemv(x.double(), w)  # dtype mismatch
        monkeypatch.setattr(tensor_parallel, "SKINNY_GEMV_ENABLED", False)
        assert not tensor_parallel._use_skinny_gemv(x, w)
        monkeypatch.setattr(tensor_parallel, "SKINNY_GEMV_ENABLED", True)
    assert not tensor_parallel._use_skinny_gemv(x, w)  # grad enabled and the weight needs a gradient
    assert tensor_parallel._use_skinny_gemv(x, w.detach())  # grad enabled, nothing needs one


def test_ops_entry_declines_on_cpu(monkeypatch):
    """``ops.skinny_gemv`` answers None for CPU tensors under "auto" and under MEGATRON_HYBRID_KERNELS=torch."""
    x, w = torch.randn(1, 16), torch.randn(8, 16)
    assert ops.skinny_gemv(x, w) is None
    monkeypatch.setenv(ops.ENV_VAR, "torch")
    assert ops.skinny_gemv(x, w, backend="auto") is None


@needs_interpreter
@pytest.mark.parametrize("with_bias", [False, True])
def test_parallel_linears_use_it_in_inference(tgemv, monkeypatch, with_bias):
    """Column/Row-parallel forward route decode-sized inputs through the GEMV (an interpreted one here), and only
    under inference with few rows; results match F.linear."""
    calls = []

    def counting(x, weight, bias=None):
        calls.append(x.shape)
        return tgemv.gemv_or_none(x, weight, bias)

    monkeypatch.setattr(tensor_parallel, "_SKINNY_GEMV_DEVICES", ("cpu",))
    monkeypatch.setattr(tensor_parallel, "SKINNY_GEMV_MAX_ROWS", 16)
    monkeypatch.setattr(tensor_parallel, "skinny_gemv", counting)
    groups = ParallelGroups.single()
    torch.manual_seed(0)
    column = tensor_parallel.ColumnParallelLinear(72, 100, groups=groups, bias=with_bias)
    row = tensor_parallel.RowParallelLinear(100, 72, groups=groups, bias=with_bias)
    if with_bias:
        with torch.no_grad():
            column.bias.normal_()
            row.bias.normal_()
    x = torch.randn(1, 3, 72)
    with torch.inference_mode():
        hidden = column(x)
        out = row(hidden)
    assert len(calls) == 2
    _check_close(hidden, x, column.weight.detach(), column.bias.detach() if with_bias else None)
    expected = F.linear(hidden, row.weight.detach(), row.bias.detach() if with_bias else None)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    column(x)  # autograd on (parameters need gradients): F.linear
    with torch.inference_mode():
        column(torch.randn(17, 1, 72))  # more than 16 rows: F.linear
    assert len(calls) == 2
