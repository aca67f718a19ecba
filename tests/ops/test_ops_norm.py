"""RMSNorm and the grouped gated RMSNorm against their formulas, autograd and transformers' NemotronH norms."""

from __future__ import annotations

import pytest
import torch
from ops_naive import naive_gated_rms_norm

from megatron_hybrid.ops import gated_rms_norm, rms_norm

F64 = torch.float64


@pytest.mark.parametrize("group_size", [4, 12, None])
@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("gated", [True, False])
def test_gated_rms_norm_matches_formula(group_size, norm_before_gate, gated):
    gen = torch.Generator().manual_seed(0)
    x, z = torch.randn(2, 5, 12, generator=gen, dtype=F64), torch.randn(2, 5, 12, generator=gen, dtype=F64)
    weight = torch.randn(12, generator=gen, dtype=F64)
    z = z if gated else None
    y = gated_rms_norm(x, z, weight, 1e-5, group_size=group_size, norm_before_gate=norm_before_gate)
    y_ref = naive_gated_rms_norm(x, z, weight, 1e-5, group_size or 12, norm_before_gate)
    assert (y - y_ref).abs().max() <= 1e-12


def test_rms_norm_matches_formula_and_keeps_dtype():
    x, weight = torch.randn(3, 7, 16, dtype=F64), torch.randn(16, dtype=F64)
    y_ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    assert (rms_norm(x, weight, 1e-6) - y_ref).abs().max() <= 1e-12
    y16 = rms_norm(x.bfloat16(), weight.float(), 1e-6)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y_ref.float(), rtol=1e-2, atol=1e-2)


def test_gradcheck_gated_rms_norm():
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(*s, generator=gen, dtype=F64).requires_grad_() for s in ((2, 3, 6), (2, 3, 6), (6,))]
    assert torch.autograd.gradcheck(lambda x, z, w: gated_rms_norm(x, z, w, 1e-5, group_size=3), inputs)
    assert torch.autograd.gradcheck(lambda x, z, w: rms_norm(x * z, w, 1e-5), inputs)


def test_bad_group_size_raises():
    with pytest.raises(ValueError, match="group_size"):
        gated_rms_norm(torch.randn(2, 10), torch.randn(2, 10), torch.ones(10), 1e-5, group_size=4)


def test_matches_transformers_nemotron_h_norms():
    nemotron = pytest.importorskip("transformers.models.nemotron_h.modeling_nemotron_h")
    torch.manual_seed(0)
    x, z = torch.randn(2, 9, 32), torch.randn(2, 9, 32)
    gated = nemotron.NemotronHRMSNormGated(32, group_size=8, eps=1e-5)
    plain = nemotron.NemotronHRMSNorm(32, eps=1e-5)
    with torch.no_grad():
        gated.weight.normal_()
        plain.weight.normal_()
    torch.testing.assert_close(gated_rms_norm(x, z, gated.weight, 1e-5, group_size=8), gated(x, z))
    torch.testing.assert_close(rms_norm(x, plain.weight, 1e-5), plain(x))
