"""The fused one-row GEMV (``ops.triton_fused_gemv``) against the separate ops it replaces.

References are the unfused compositions of the decode step: ``add_rms_norm_ref`` (the residual add and the next
pre-norm) or ``gated_rms_norm_ref`` (the Mamba gated norm), then ``F.linear``, then the activation, each in the
working dtype. The kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` must be set before triton is
imported, so this module sets it at collection when triton is not imported yet and no GPU is present (see
``triton_interpreter.py``); otherwise the interpreter tests run in a fresh subprocess. Skipped without triton.
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
    "triton", reason="triton is not installed: the fused GEMV is checked only with it (pip install triton)"
)

from megatron_hybrid import ops  # noqa: E402
from megatron_hybrid.layers.mlp import squared_relu  # noqa: E402

MODULE = "megatron_hybrid.ops.triton_fused_gemv"
needs_interpreter = interpreter_only(triton)
# float32: summation order only. bfloat16: the linear's output is rounded once, so a different float32 sum order can
# move it by one bf16 step (2^-8 relative) where the two sums straddle a rounding boundary.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
ACTIVATIONS = {None: lambda t: t, "squared_relu": squared_relu, "gelu": F.gelu}


@pytest.fixture(scope="module")
def fgemv():
    yield from interpreted_kernel_modules(MODULE)


test_in_a_fresh_process = fresh_process_test(triton, __file__)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12)).item()


def _tensors(n: int, k: int, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(1, k, generator=generator).to(dtype),
        "residual": (3 * torch.randn(1, k, generator=generator)).to(dtype),
        "z": torch.randn(1, k, generator=generator).to(dtype),
        "norm_weight": (1 + 0.3 * torch.randn(k, generator=generator)).to(dtype),
        "weight": (torch.randn(n, k, generator=generator) / k**0.5).to(dtype),
        "bias": torch.randn(n, generator=generator).to(dtype),
    }


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(37, 40), (64, 128)])  # off and on the power-of-two tile / block sizes
@pytest.mark.parametrize("activation", [None, "squared_relu", "gelu"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_plain_prologue_with_activation(fgemv, dtype, n, k, activation, with_bias):
    t = _tensors(n, k, dtype, seed=n + k)
    bias = t["bias"] if with_bias else None
    got, residual = fgemv.fused_gemv_triton(t["x"], t["weight"], bias, activation=activation)
    want = ACTIVATIONS[activation](F.linear(t["x"], t["weight"], bias))
    assert residual is None and got.shape == (1, n) and got.dtype == dtype
    assert _rel(got, want) <= TOLERANCE[dtype]


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual_dtype", [None, torch.float32])
@pytest.mark.parametrize("first_layer", [False, True])
def test_add_norm_prologue(fgemv, dtype, residual_dtype, first_layer):
    """The previous layer's residual add and this layer's RMSNorm in the prologue: the new residual exactly as the
    separate add stores it (also into a float32 stream), the output as norm + linear compute it."""
    n, k = 50, 48
    t = _tensors(n, k, dtype, seed=5)
    config = fgemv.FusedGemvConfig(block_n=4, num_warps=4)  # several programs: only program 0 stores the residual
    update = None if first_layer else t["x"]
    got, residual = fgemv.fused_gemv_triton(
        update, t["weight"], t["bias"], prologue="add_norm", residual=t["residual"], norm_weight=t["norm_weight"],
        eps=1e-5, residual_dtype=residual_dtype, config=config,
    )
    if first_layer:
        normed, want_residual = ops.rms_norm_ref(t["residual"], t["norm_weight"], 1e-5), t["residual"]
        assert residual is t["residual"]
    else:
        normed, want_residual = ops.add_rms_norm_ref(t["x"], t["residual"], t["norm_weight"], 1e-5, residual_dtype)
        assert residual.dtype == (residual_dtype or dtype) and torch.equal(residual, want_residual)
    assert _rel(got, F.linear(normed, t["weight"], t["bias"])) <= TOLERANCE[dtype]


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", [1, 4])
def test_gated_norm_prologue(fgemv, dtype, groups):
    """The Mamba gated group norm (``norm_before_gate=False``) in the prologue, z read from a wider row's view."""
    n, k = 33, 64
    t = _tensors(n, k, dtype, seed=groups)
    wide = torch.randn(1, k + 24, generator=torch.Generator().manual_seed(9)).to(dtype)
    z = wide[:, :k]  # like the z columns of in_proj's output row
    got, _ = fgemv.fused_gemv_triton(
        t["x"], t["weight"], prologue="gated_norm", z=z, norm_weight=t["norm_weight"], group_size=k // groups,
        eps=1e-5,
    )
    normed = ops.gated_rms_norm_ref(t["x"], z, t["norm_weight"], 1e-5, k // groups)
    assert _rel(got, F.linear(normed, t["weight"])) <= TOLERANCE[dtype]


@needs_interpreter
def test_rejects_bad_arguments(fgemv):
    t = _tensors(8, 16, torch.float32, seed=0)
    x, w = t["x"], t["weight"]
    cases = [
        (dict(x=x, weight=w, prologue="layer_norm"), "prologue"),
        (dict(x=x, weight=w, activation="relu"), "activation"),
        (dict(x=x, weight=w.t()), "contiguous"),
        (dict(x=torch.randn(1, 8), weight=w), "one row of 16"),
        (dict(x=torch.randn(2, 16), weight=w), "one row of 16"),
        (dict(x=x, weight=torch.randn(4, 5000)), "1..4096"),
        (dict(x=x, weight=w.double()), "float32, bfloat16"),
        (dict(x=x, weight=w, bias=torch.randn(3)), "bias must be"),
        (dict(x=x, weight=w, prologue="add_norm"), "residual and norm_weight"),
        (dict(x=None, weight=w), "x is required"),
        (dict(x=x, weight=w, prologue="gated_norm", z=x, norm_weight=t["norm_weight"], group_size=3), "divide"),
        (dict(x=torch.randn(1, 34), weight=torch.randn(8, 34), prologue="gated_norm", z=torch.randn(1, 34),
              norm_weight=torch.ones(34), group_size=2), "at most 16 groups"),
        (dict(x=x, weight=w, prologue="add_norm", residual=x, norm_weight=torch.ones(3)), "norm_weight must be"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            fgemv.fused_gemv_triton(**kwargs)


def test_dispatch_declines_on_cpu(monkeypatch):
    """``ops.fused_gemv`` answers None for CPU tensors (the caller then runs the separate ops)."""
    t = _tensors(8, 16, torch.float32, seed=1)
    assert ops.fused_gemv(t["x"], t["weight"]) is None
    monkeypatch.setenv(ops.ENV_VAR, "torch")
    assert ops.fused_gemv(None, t["weight"], prologue="add_norm", residual=t["residual"],
                          norm_weight=t["norm_weight"]) is None
