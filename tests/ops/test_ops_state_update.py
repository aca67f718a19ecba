"""Single-token decode steps reproduce the chunked scan (and the naive recurrence) exactly in float64."""

from __future__ import annotations

import pytest
import torch
from ops_naive import naive_ssd

from megatron_hybrid.ops import ssd_chunk_scan, ssm_state_update

F64 = torch.float64


def _inputs(b=2, l=19, h=4, p=3, g=2, n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    return dict(x=rnd(b, l, h, p), dt=rnd(b, l, h), A=-torch.rand(h, generator=gen, dtype=F64) - 0.1,
                B=rnd(b, l, g, n), C=rnd(b, l, g, n), D=rnd(h), z=rnd(b, l, h, p), dt_bias=rnd(h),
                initial_states=rnd(b, h, p, n))


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_steps_equal_chunked_scan(groups):
    t = _inputs(g=groups)
    common = dict(D=t["D"], dt_bias=t["dt_bias"], dt_softplus=True, dt_limit=(0.1, 1.5))
    y_scan, final_scan = ssd_chunk_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], 8, z=t["z"],
                                        initial_states=t["initial_states"], return_final_states=True, **common)
    state = t["initial_states"].clone()
    ys = [ssm_state_update(state, t["x"][:, i], t["dt"][:, i], t["A"], t["B"][:, i], t["C"][:, i], z=t["z"][:, i],
                           **common) for i in range(t["x"].shape[1])]
    assert (torch.stack(ys, 1) - y_scan).abs().max() <= 1e-10
    assert (state - final_scan).abs().max() <= 1e-10
    y_naive, _ = naive_ssd(t["x"], t["dt"], t["A"], t["B"], t["C"], z=t["z"], initial_states=t["initial_states"],
                           **common)
    assert (torch.stack(ys, 1) - y_naive).abs().max() <= 1e-10


def test_decode_continues_prefill():
    t = _inputs(l=21)
    common = dict(D=t["D"], dt_bias=t["dt_bias"], dt_softplus=True)
    y_full = ssd_chunk_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], 8, **common)
    _, state = ssd_chunk_scan(t["x"][:, :13], t["dt"][:, :13], t["A"], t["B"][:, :13], t["C"][:, :13], 8,
                              return_final_states=True, **common)
    for i in range(13, 21):
        y = ssm_state_update(state, t["x"][:, i], t["dt"][:, i], t["A"], t["B"][:, i], t["C"][:, i], **common)
        assert (y - y_full[:, i]).abs().max() <= 1e-10


def test_mamba_ssm_per_channel_argument_forms():
    """selective_state_update's expanded forms (dt [b,h,p], A [h,p,n], dt_bias/D [h,p]) give the same step."""
    t = _inputs()
    b, _, h, p = t["x"].shape
    n = t["B"].shape[-1]
    i = 3
    state_a, state_b = t["initial_states"].clone(), t["initial_states"].clone()
    y_a = ssm_state_update(state_a, t["x"][:, i], t["dt"][:, i], t["A"], t["B"][:, i], t["C"][:, i], D=t["D"],
                           dt_bias=t["dt_bias"], dt_softplus=True)
    y_b = ssm_state_update(state_b, t["x"][:, i], t["dt"][:, i, :, None].expand(b, h, p),
                           t["A"][:, None, None].expand(h, p, n), t["B"][:, i], t["C"][:, i],
                           D=t["D"][:, None].expand(h, p), dt_bias=t["dt_bias"][:, None].expand(h, p),
                           dt_softplus=True)
    assert (y_a - y_b).abs().max() <= 1e-12 and (state_a - state_b).abs().max() <= 1e-12


def test_state_keeps_its_dtype_and_output_follows_x():
    t = _inputs()
    state = t["initial_states"].float()
    y = ssm_state_update(state, t["x"][:, 0].bfloat16(), t["dt"][:, 0].float(), t["A"].float(),
                         t["B"][:, 0].float(), t["C"][:, 0].float(), dt_softplus=True)
    assert state.dtype == torch.float32 and y.dtype == torch.bfloat16
