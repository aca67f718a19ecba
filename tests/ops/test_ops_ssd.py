"""The chunked SSD scan against a token-by-token recurrence, packed documents, autograd and transformers."""

from __future__ import annotations

import math

import pytest
import torch
from ops_naive import naive_ssd

import megatron_hybrid.ops.ssd as ssd_module
from megatron_hybrid.ops import ssd_chunk_scan

F64 = torch.float64


def _inputs(b=2, l=37, h=4, p=3, g=2, n=5, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    return dict(
        x=rnd(b, l, h, p), dt=rnd(b, l, h), A=-torch.rand(h, generator=gen, dtype=dtype) * 2 - 0.1,
        B=rnd(b, l, g, n), C=rnd(b, l, g, n), D=rnd(h), z=rnd(b, l, h, p), dt_bias=rnd(h) * 0.5,
        initial_states=rnd(b, h, p, n),
    )


# Row 0 starts with document 0 (initial states apply to it), row 1 with document 3 (they do not);
# boundaries fall inside and on chunk edges for the chunk sizes below.
SEQ_IDX = torch.tensor([[0] * 5 + [1] * 11 + [2] * 1 + [5] * 20, [3] * 16 + [4] * 21], dtype=torch.int32)


@pytest.fixture(params=["matmul", "loop"])
def state_passing(request, monkeypatch):
    """Run each test with both inter-chunk implementations (one matmul, or a loop over chunks)."""
    limit = 10_000 if request.param == "matmul" else 0
    monkeypatch.setattr(ssd_module, "STATE_PASSING_MATMUL_MAX_CHUNKS", limit)
    monkeypatch.setattr(ssd_module, "STATE_PASSING_MATMUL_MAX_CHUNKS_CPU", limit)
    return request.param


@pytest.mark.parametrize("chunk_size", [1, 4, 8, 16, 64])
@pytest.mark.parametrize("features", ["plain", "all", "all_seq_idx"])
def test_scan_matches_recurrence(chunk_size, features, state_passing):
    t = _inputs()
    kwargs = {}
    if features != "plain":
        kwargs = dict(D=t["D"], z=t["z"], dt_bias=t["dt_bias"], dt_softplus=True, dt_limit=(0.05, 2.0),
                      initial_states=t["initial_states"])
    else:
        t["dt"] = t["dt"].abs()  # no softplus: keep the time steps positive
    if features == "all_seq_idx":
        kwargs["seq_idx"] = SEQ_IDX
    y, final = ssd_chunk_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size, return_final_states=True,
                              backend="torch", **kwargs)
    y_ref, final_ref = naive_ssd(t["x"], t["dt"], t["A"], t["B"], t["C"], **kwargs)
    assert y.dtype == F64 and final.dtype == F64
    assert (y - y_ref).abs().max() <= 1e-10
    assert (final - final_ref).abs().max() <= 1e-10


@pytest.mark.parametrize("groups", [1, 4])
def test_scan_groups_and_per_channel_D(groups):
    t = _inputs(l=23, g=groups)
    D = torch.randn(4, 3, dtype=F64)
    y = ssd_chunk_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], 8, D=D, dt_softplus=True, backend="torch")
    y_ref, _ = naive_ssd(t["x"], t["dt"], t["A"], t["B"], t["C"], D=D, dt_softplus=True)
    assert (y - y_ref).abs().max() <= 1e-10


def test_non_monotone_document_ids_reset_on_change():
    t = _inputs(b=1, l=20)
    seq_idx = torch.tensor([[0] * 6 + [1] * 7 + [0] * 7], dtype=torch.int32)  # id 0 comes back: a new document
    kwargs = dict(dt_softplus=True, initial_states=t["initial_states"], seq_idx=seq_idx)
    y, final = ssd_chunk_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], 4, return_final_states=True, **kwargs)
    y_ref, final_ref = naive_ssd(t["x"], t["dt"], t["A"], t["B"], t["C"], **kwargs)
    assert (y - y_ref).abs().max() <= 1e-10 and (final - final_ref).abs().max() <= 1e-10


def test_packed_documents_equal_separate_runs(state_passing):
    t = _inputs(b=1, l=41)
    lengths = [9, 1, 17, 14]
    seq_idx = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)])[None]
    common = dict(D=t["D"], dt_bias=t["dt_bias"], dt_softplus=True)
    y, final = ssd_chunk_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], 8, z=t["z"], seq_idx=seq_idx,
                              initial_states=t["initial_states"], return_final_states=True, **common)
    start = 0
    for i, n in enumerate(lengths):
        sl = slice(start, start + n)
        init = t["initial_states"] if i == 0 else None  # only the first document continues the initial state
        y_doc, final_doc = ssd_chunk_scan(t["x"][:, sl], t["dt"][:, sl], t["A"], t["B"][:, sl], t["C"][:, sl], 8,
                                          z=t["z"][:, sl], initial_states=init, return_final_states=True, **common)
        assert (y[:, sl] - y_doc).abs().max() <= 1e-10
        start += n
    assert (final - final_doc).abs().max() <= 1e-10  # the final state is the last document's


def test_continuation_from_final_states():
    """Scanning a prefix, then the rest from its final state, equals one scan (chunk boundaries need not align)."""
    t = _inputs(l=30)
    common = dict(D=t["D"], dt_bias=t["dt_bias"], dt_softplus=True)
    args = [t[k] for k in ("x", "dt")]
    y, final = ssd_chunk_scan(*args, t["A"], t["B"], t["C"], 8, return_final_states=True, **common)
    cut = 11
    y1, f1 = ssd_chunk_scan(*(a[:, :cut] for a in args), t["A"], t["B"][:, :cut], t["C"][:, :cut], 8,
                            return_final_states=True, **common)
    y2, f2 = ssd_chunk_scan(*(a[:, cut:] for a in args), t["A"], t["B"][:, cut:], t["C"][:, cut:], 8,
                            initial_states=f1, return_final_states=True, **common)
    assert (torch.cat([y1, y2], 1) - y).abs().max() <= 1e-10 and (f2 - final).abs().max() <= 1e-10


def test_gradcheck_scan(state_passing):
    t = _inputs(b=1, l=7, h=2, p=2, g=1, n=3, seed=1)
    seq_idx = torch.tensor([[0, 0, 0, 0, 1, 1, 1]], dtype=torch.int32)
    names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]
    inputs = [t[k].clone().requires_grad_() for k in names]

    def f(x, dt, A, B, C, D, z, dt_bias, init):
        y, final = ssd_chunk_scan(x, dt, A, B, C, 3, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
                                  initial_states=init, seq_idx=seq_idx, return_final_states=True)
        return y, final

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


def test_low_precision_io_and_float32_accuracy():
    t = _inputs(l=40, dtype=torch.float32)
    kwargs = dict(D=t["D"], z=t["z"], dt_bias=t["dt_bias"], dt_softplus=True, initial_states=t["initial_states"])
    y32, final32 = ssd_chunk_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], 16, return_final_states=True, **kwargs)
    t64 = {k: v.double() for k, v in t.items()}
    y64 = ssd_chunk_scan(t64["x"], t64["dt"], t64["A"], t64["B"], t64["C"], 16,
                         **{k: t64[k] for k in ("D", "z", "dt_bias", "initial_states")}, dt_softplus=True)
    assert y32.dtype == torch.float32 and final32.dtype == torch.float32
    assert (y32.double() - y64).abs().max() <= 1e-4 * y64.abs().max()
    y16 = ssd_chunk_scan(t["x"].bfloat16(), t["dt"].bfloat16(), t["A"], t["B"].bfloat16(), t["C"].bfloat16(), 16)
    assert y16.dtype == torch.bfloat16


def test_bad_shapes_raise():
    t = _inputs()
    with pytest.raises(ValueError, match="dt must be"):
        ssd_chunk_scan(t["x"], t["dt"][:, :-1], t["A"], t["B"], t["C"], 8)
    three_groups = t["B"][:, :, :1].repeat(1, 1, 3, 1)  # 4 heads cannot be split into 3 groups
    with pytest.raises(ValueError, match="not divisible"):
        ssd_chunk_scan(t["x"], t["dt"], t["A"], three_groups, three_groups, 8)
    with pytest.raises(ValueError, match="initial_states"):
        ssd_chunk_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], 8, initial_states=t["initial_states"][:, :1])


def test_matches_transformers_nemotron_h_torch_path():
    """transformers' pure-torch NemotronH scan is the parity oracle of the model port (float32, no documents)."""
    nemotron = pytest.importorskip("transformers.models.nemotron_h.modeling_nemotron_h")
    torch_scan = getattr(nemotron.mamba2_chunk_scan, "__wrapped__", nemotron.mamba2_chunk_scan)
    t = _inputs(l=50, h=4, p=8, g=2, n=16, dtype=torch.float32)
    kwargs = dict(D=t["D"], dt_bias=t["dt_bias"], dt_softplus=True, dt_limit=(0.01, math.inf),
                  initial_states=t["initial_states"], return_final_states=True)
    y_hf, final_hf = torch_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], 16, **kwargs)
    y, final = ssd_chunk_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], 16, **kwargs)
    torch.testing.assert_close(y, y_hf.to(y.dtype), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, final_hf, rtol=1e-5, atol=1e-5)
