"""The Triton causal conv1d (``ops.triton_conv1d``) against ``ops.causal_conv1d_ref``, in Triton's CPU interpreter.

The interpreter is turned on at collection where that is safe, else the tests run in a fresh subprocess
(``triton_interpreter.py`` in this folder says how and why).
The interpreter is slow: shapes are tiny, but chosen to cross every boundary the kernels have (several sequence tiles
and backward programs, a partial channel block, sequences shorter than the kernel, document boundaries near tile
edges). Skipped when triton is not installed.
"""

from __future__ import annotations

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
    "triton", reason="triton is not installed: the Triton conv1d kernels are checked only with it (pip install triton)"
)

from megatron_hybrid import ops  # noqa: E402
from megatron_hybrid.ops import backend  # noqa: E402

MODULE = "megatron_hybrid.ops.triton_conv1d"
needs_interpreter = interpreter_only(triton)


@pytest.fixture(scope="module")
def tconv():
    yield from interpreted_kernel_modules(MODULE)


test_in_a_fresh_process = fresh_process_test(triton, __file__)


def _documents(b: int, l: int) -> torch.Tensor:
    """Row 0: ids 0 0 .. 1 1 .. 0 0 (a non-monotone id still starts a new segment); other rows: a boundary at 2."""
    seq_idx = torch.zeros(b, l, dtype=torch.int64)
    seq_idx[0, l // 3:] = 1
    seq_idx[0, (2 * l) // 3:] = 0
    seq_idx[1:, 2:] = 7
    return seq_idx


def _run(tconv, b, l, d, w, dtype, *, bias=True, activation="silu", documents=False, seed=0):
    """Kernel and float64 reference outputs and gradients for a channel-last strided view input."""
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randn(b, l, d + 5, generator=gen).to(dtype)
    x = wide[..., 2:2 + d].detach().requires_grad_()  # a strided slice, like xBC of in_proj's output
    weight = (torch.randn(d, w, generator=gen) / w**0.5).requires_grad_()
    b_ = torch.randn(d, generator=gen).requires_grad_() if bias else None
    seq_idx = _documents(b, l) if documents else None
    grad = torch.randn(b, l, d, generator=gen).to(dtype)

    out = tconv.causal_conv1d_channel_last_triton(x, weight, b_, activation, seq_idx=seq_idx)
    out.backward(grad)
    got = (out.detach(), x.grad, weight.grad, b_.grad if bias else None)

    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    b64 = b_.detach().double().requires_grad_() if bias else None
    ref = ops.causal_conv1d_ref(x64.transpose(1, 2), w64, b64, activation, seq_idx=seq_idx).transpose(1, 2)
    ref.backward(grad.double())
    want = (ref.detach(), x64.grad, w64.grad, b64.grad if bias else None)
    return got, want


def _check(got, want, dtype):
    # float32 math throughout; low-precision outputs are rounded once (a few ulps of the largest value).
    rel = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    names = ("out", "dx", "dweight", "dbias")
    for name, g, r in zip(names, got, want):
        if r is None:
            assert g is None
            continue
        assert g.shape == r.shape, name
        err = (g.double() - r).abs().max().item()
        scale = r.abs().max().item() + 1e-12
        assert err <= rel * scale, f"{name}: max abs error {err:.3e} > {rel} x {scale:.3e}"
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert got[2].dtype == torch.float32  # parameter dtype, not the activation dtype


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_and_gradients_with_documents(tconv, dtype):
    got, want = _run(tconv, 2, 37, 24, 4, dtype, documents=True)
    _check(got, want, dtype)


@needs_interpreter
@pytest.mark.parametrize(
    "b, l, d, w, bias, activation",
    [
        (1, 5, 10, 4, False, None),  # no bias, no activation
        (2, 3, 8, 4, True, "silu"),  # shorter than the kernel
        (1, 1, 8, 2, True, "swish"),  # a single position
        (2, 29, 12, 3, True, "silu"),  # odd width
    ],
)
def test_edge_shapes(tconv, b, l, d, w, bias, activation):
    got, want = _run(tconv, b, l, d, w, torch.float32, bias=bias, activation=activation, documents=l > 3)
    _check(got, want, torch.float32)


@needs_interpreter
def test_many_tiles_and_programs(tconv, monkeypatch):
    """Several forward tiles, backward tiles per program and backward programs, and a partial channel block."""
    monkeypatch.setattr(tconv, "BWD_ROWS_PER_PROGRAM", 64)  # 150 rows -> 3 backward programs, the last one partial
    got, want = _run(tconv, 2, 150, tconv.BWD_BLOCK_D + 6, 4, torch.float32, documents=True, seed=1)
    _check(got, want, torch.float32)
    monkeypatch.setattr(tconv, "BWD_ROWS_PER_PROGRAM", 256)  # all tiles of a row in one program
    got, want = _run(tconv, 1, 130, 16, 4, torch.bfloat16, documents=True, seed=2)
    _check(got, want, torch.bfloat16)


def _documents_at_tile_edges(b: int, l: int, edge: int) -> torch.Tensor:
    """Row 0: boundaries exactly at a tile edge, one row before and one after it, and a one-token document;
    other rows: a single boundary in the middle of a tile."""
    seq_idx = torch.zeros(b, l, dtype=torch.int64)
    for start, doc in ((edge - 1, 1), (edge, 2), (edge + 1, 3), (2 * edge, 4), (2 * edge + 1, 5)):
        if start < l:
            seq_idx[0, start:] = doc
    seq_idx[1:, edge // 2:] = 9
    return seq_idx


@needs_interpreter
@pytest.mark.parametrize("block_l, block_d, rows_per_program", [(16, 16, 16), (16, 16, 48), (32, 8, 64)])
@pytest.mark.parametrize("bias, activation", [(True, "silu"), (False, "silu"), (True, None), (False, None)])
def test_backward_tilings(tconv, monkeypatch, block_l, block_d, rows_per_program, bias, activation):
    """Each backward tiling (1 or several tiles per program, a last program with fewer tiles, partial tiles and channel
    blocks) with every bias/activation variant, documents starting at, just before and just after tile edges."""
    monkeypatch.setattr(tconv, "BWD_BLOCK_L", block_l)
    monkeypatch.setattr(tconv, "BWD_BLOCK_D", block_d)
    monkeypatch.setattr(tconv, "BWD_ROWS_PER_PROGRAM", rows_per_program)
    monkeypatch.setattr(tconv, "DX_BLOCK_L", block_l)  # two_pass's second kernel: partial tiles and blocks too
    monkeypatch.setattr(tconv, "DX_BLOCK_D", block_d)
    b, l, d, w = 2, 3 * block_l + 5, 2 * block_d + 3, 4  # odd length, d not a multiple of the channel block
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(b, l, d + 7, generator=gen)[..., 3:3 + d].detach().requires_grad_()
    weight = (torch.randn(d, w, generator=gen) / 2).requires_grad_()
    b_ = torch.randn(d, generator=gen).requires_grad_() if bias else None
    grad = torch.randn(b, l, d, generator=gen)
    for seq_idx in (None, _documents_at_tile_edges(b, l, block_l)):
        for t in (x, weight, b_):
            if t is not None:
                t.grad = None
        out = tconv.causal_conv1d_channel_last_triton(x, weight, b_, activation, seq_idx=seq_idx)
        out.backward(grad)
        got = (out.detach(), x.grad, weight.grad, b_.grad if bias else None)
        x64 = x.detach().double().requires_grad_()
        w64 = weight.detach().double().requires_grad_()
        b64 = b_.detach().double().requires_grad_() if bias else None
        ref = ops.causal_conv1d_ref(x64.transpose(1, 2), w64, b64, activation, seq_idx=seq_idx).transpose(1, 2)
        ref.backward(grad.double())
        _check(got, (ref.detach(), x64.grad, w64.grad, b64.grad if bias else None), torch.float32)


@needs_interpreter
@pytest.mark.parametrize("w", [1, 2, 5, 8])
def test_kernel_widths(tconv, monkeypatch, w):
    """Widths other than Mamba's 4, up to MAX_WIDTH (taps unrolled at compile time; padded tap axis for 5)."""
    monkeypatch.setattr(tconv, "BWD_BLOCK_L", 16)
    monkeypatch.setattr(tconv, "BWD_ROWS_PER_PROGRAM", 32)
    # (the reference cannot take documents at width 1: it stacks an empty list of tap masks)
    got, want = _run(tconv, 2, 41, 12, w, torch.float32, documents=w > 1, seed=w)
    _check(got, want, torch.float32)


@needs_interpreter
def test_backward_is_deterministic_and_takes_strided_grads(tconv):
    """Same inputs, bitwise-equal gradients (no atomics); a gradient without contiguous channels is accepted."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(2, 45, 20, generator=gen).requires_grad_()
    weight, bias = torch.randn(20, 4, generator=gen).requires_grad_(), torch.randn(20, generator=gen).requires_grad_()
    grad = torch.randn(2, 20, 45, generator=gen).transpose(1, 2)  # stride(-1) != 1
    seq_idx = _documents(2, 45)
    runs = []
    for _ in range(2):
        out = tconv.causal_conv1d_channel_last_triton(x, weight, bias, "silu", seq_idx=seq_idx)
        runs.append(torch.autograd.grad(out, (x, weight, bias), grad))
    for first, second in zip(*runs):
        assert torch.equal(first, second)
    ref = ops.causal_conv1d_ref(x.transpose(1, 2), weight, bias, "silu", seq_idx=seq_idx).transpose(1, 2)
    for got, want in zip(runs[0], torch.autograd.grad(ref, (x, weight, bias), grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("dpre_dtype", [None, torch.float32])
def test_dpre_buffer_dtype(tconv, monkeypatch, dpre_dtype):
    """dpre in x's dtype (the default: one more bf16 rounding) and in float32 (the exact path): both within bf16
    tolerance of the float64 reference."""
    monkeypatch.setattr(tconv, "DPRE_DTYPE", dpre_dtype)
    got, want = _run(tconv, 2, 37, 24, 4, torch.bfloat16, documents=True, seed=13)
    _check(got, want, torch.bfloat16)


@needs_interpreter
def test_rejects_bad_layouts(tconv):
    x = torch.randn(1, 8, 4)
    with pytest.raises(ValueError, match="contiguous channels"):
        tconv.causal_conv1d_channel_last_triton(x.transpose(1, 2).contiguous().transpose(1, 2), torch.randn(4, 4))
    with pytest.raises(ValueError, match="weight must be"):
        tconv.causal_conv1d_channel_last_triton(x, torch.randn(3, 4))


@needs_interpreter
def test_backend_triton_path_with_final_states(tconv):
    """The dispatch's Triton branch (as taken on CUDA), incl. final states for an inference prefill, on CPU."""
    torch.manual_seed(3)
    b, l, d, w = 2, 11, 8, 4
    x = torch.randn(b, d, l)  # [b, d, l] contiguous: the Triton branch copies it channel-last
    weight, bias = torch.randn(d, w), torch.randn(d)
    for seq_idx in (None, _documents(b, l)):
        out, final = backend._conv_triton(x.transpose(1, 2), weight, bias, "silu", seq_idx, None, True)
        ref_out, ref_final = ops.causal_conv1d_ref(x, weight, bias, "silu", seq_idx=seq_idx, return_final_states=True)
        torch.testing.assert_close(out.transpose(1, 2), ref_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(final, ref_final, rtol=0, atol=0)
    short = torch.randn(b, 2, d)  # fewer inputs than the state holds: zero-padded on the left
    _, final = backend._conv_triton(short, weight, None, None, None, None, True)
    _, ref_final = ops.causal_conv1d_ref(short.transpose(1, 2), weight, return_final_states=True)
    torch.testing.assert_close(final, ref_final, rtol=0, atol=0)
    assert backend._conv_triton(x.transpose(1, 2), weight, bias, "silu", None, torch.zeros(b, d, w - 1), False) is None


def test_channel_last_dispatch_on_cpu_is_the_reference():
    torch.manual_seed(4)
    x = torch.randn(2, 9, 6)
    weight, bias = torch.randn(6, 4), torch.randn(6)
    seq_idx = _documents(2, 9)
    out = ops.causal_conv1d_channel_last(x, weight, bias, "silu", seq_idx=seq_idx)
    ref = ops.causal_conv1d_ref(x.transpose(1, 2), weight, bias, "silu", seq_idx=seq_idx).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    with pytest.raises(ops.KernelUnavailableError, match="needs CUDA tensors"):
        ops.causal_conv1d_channel_last(x, weight, backend="triton")


@needs_interpreter
def test_mamba_mixer_with_the_triton_conv_matches_the_torch_path(tconv, monkeypatch):
    """The mixer's conv through the Triton kernel (dispatch forced on CPU tensors) against the reference path."""
    from megatron_hybrid.config import HybridConfig
    from megatron_hybrid.layers.mamba_mixer import MambaMixer
    from megatron_hybrid.parallel.state import ParallelGroups

    torch.manual_seed(5)
    config = HybridConfig(num_layers=1, hidden_size=32, vocab_size=64, hybrid_override_pattern="M",
                          num_attention_heads=2, mamba_state_dim=8, mamba_head_dim=8, mamba_num_groups=2,
                          mamba_chunk_size=8)
    mixer = MambaMixer(config, ParallelGroups.single())
    hidden = torch.randn(19, 2, 32)
    seq_idx = _documents(2, 19).to(torch.int32)
    results = []
    for force in (False, True):
        if force:
            monkeypatch.setattr(backend, "_conv_kernels_wanted", lambda op, mode, tensor: True)
            monkeypatch.setattr(backend, "_conv_ext", lambda *args: None)
        mixer.zero_grad(set_to_none=True)
        inp = hidden.clone().requires_grad_()
        out = mixer(inp, seq_idx=seq_idx)
        out.square().sum().backward()
        results.append((out.detach(), inp.grad, {n: p.grad.clone() for n, p in mixer.named_parameters()}))
    (out_r, gin_r, grads_r), (out_t, gin_t, grads_t) = results
    torch.testing.assert_close(out_t, out_r, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gin_t, gin_r, rtol=1e-4, atol=1e-5)
    for name in grads_r:
        torch.testing.assert_close(grads_t[name], grads_r[name], rtol=1e-4, atol=1e-5, msg=name)
