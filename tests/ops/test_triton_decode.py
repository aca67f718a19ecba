"""The fused Triton Mamba decode step (``ops.triton_decode``) against the unfused reference composition.

The reference is ``causal_conv1d_update_ref`` + ``ssm_state_update_ref`` + ``gated_rms_norm_ref``, the path a CPU
decode step takes; the kernels run in Triton's CPU interpreter. ``TRITON_INTERPRET=1`` must be set before triton is
imported, so this module sets it at collection when triton is not imported yet and no GPU is present (see
``triton_interpreter.py``); otherwise the interpreter tests run in a fresh subprocess. Several steps are chained so
that both carried states (conv window and SSM state) are checked, not only one step's output. The tests marked
``gpu`` compile the kernels for a real device (``pytest -m gpu tests/ops/test_triton_decode.py``), including a CUDA
graph replay. Skipped when triton is not installed.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from triton_interpreter import (
    fresh_process_test,
    interpret_if_possible,
    interpreted_kernel_modules,
    interpreter_only,
    is_interpreted,
)

interpret_if_possible()
triton = pytest.importorskip(
    "triton", reason="triton is not installed: the fused Triton decode is checked only with it (pip install triton)"
)

from megatron_hybrid import ops  # noqa: E402
from megatron_hybrid.ops import backend  # noqa: E402

MODULE = "megatron_hybrid.ops.triton_decode"
INTERPRETED = is_interpreted(triton)
needs_interpreter = interpreter_only(triton)


@pytest.fixture(scope="module")
def tdecode():
    yield from interpreted_kernel_modules(MODULE)


test_in_a_fresh_process = fresh_process_test(triton, __file__)


def _reference_step(zxbcdt, conv_state, conv_weight, conv_bias, ssm_state, A_log, dt_bias, D, norm_weight,
                    group_size, eps, dt_limit, normalize=True):
    """The unfused decode step of ``MambaMixer._decode_step`` on CPU (states advance in place); ``y`` before the
    gated norm when not ``normalize``."""
    b, h, p, n = ssm_state.shape
    d_inner = h * p
    gn = (conv_weight.shape[0] - d_inner) // 2
    z, xbc, dt = torch.split(zxbcdt, [d_inner, d_inner + 2 * gn, h], dim=-1)
    xbc = ops.causal_conv1d_update_ref(xbc, conv_state, conv_weight, conv_bias, "silu")
    x, B, C = torch.split(xbc, [d_inner, gn, gn], dim=-1)
    g = gn // n
    y = ops.ssm_state_update_ref(
        ssm_state, x.reshape(b, h, p), dt, -torch.exp(A_log.float()), B.reshape(b, g, n), C.reshape(b, g, n),
        D=D, dt_bias=dt_bias, dt_softplus=True, dt_limit=dt_limit,
    )
    if not normalize:
        return y.reshape(b, d_inner)
    return ops.gated_rms_norm_ref(y.reshape(b, d_inner), z, norm_weight, eps, group_size)


def _problem(b, h, p, n, g, w, *, state_len, dtype, state_dtype, conv_bias=True, use_d=True, seed=0):
    """Random parameters and states in the layout of a mixer and an InferenceContext (cache row slices)."""
    gen = torch.Generator().manual_seed(seed)
    d_inner = h * p
    conv_dim = d_inner + 2 * g * n
    params = dict(
        conv_weight=(torch.randn(conv_dim, w, generator=gen) / w**0.5).to(dtype),
        conv_bias=torch.randn(conv_dim, generator=gen).to(dtype) if conv_bias else None,
        A_log=torch.log(torch.rand(h, generator=gen) * 8 + 1).to(dtype),
        dt_bias=(torch.randn(h, generator=gen) - 2.0).to(dtype),
        D=torch.randn(h, generator=gen).to(dtype) if use_d else None,
        norm_weight=(1 + 0.3 * torch.randn(d_inner, generator=gen)).to(dtype),
    )
    # Cache tensors of 5 slots of which the step uses the leading b rows (views, as InferenceContext hands out).
    conv_cache = torch.randn(5, conv_dim, state_len, generator=gen).to(dtype)
    ssm_cache = torch.randn(5, h, p, n, generator=gen).to(state_dtype)
    inputs = [torch.randn(b, 2 * d_inner + 2 * g * n + h + 3, generator=gen).mul(2).to(dtype) for _ in range(3)]
    return params, conv_cache, ssm_cache, inputs


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / (want.double().abs().max() + 1e-30)).item()


def _run_steps(tdecode, b, h, p, n, g, w, *, state_len, dtype, state_dtype, dt_limit, group_size=None,
               normalize=True, **kw):
    params, conv_cache, ssm_cache, inputs = _problem(b, h, p, n, g, w, state_len=state_len, dtype=dtype,
                                                     state_dtype=state_dtype, **kw)
    group_size = group_size or h * p // g
    conv_ref, ssm_ref = conv_cache.clone(), ssm_cache.clone()
    errors = []
    for wide in inputs:
        zxbcdt = wide[:, 1:-2]  # a row-strided view, like a slice of a wider buffer
        got = tdecode.mamba_decode_step_triton(
            zxbcdt, conv_cache[:b], params["conv_weight"], params["conv_bias"], ssm_cache[:b], params["A_log"],
            params["dt_bias"], params["D"], params["norm_weight"] if normalize else None, norm_group_size=group_size,
            eps=1e-5, dt_limit=dt_limit, normalize=normalize,
        )
        want = _reference_step(
            zxbcdt, conv_ref[:b], params["conv_weight"], params["conv_bias"], ssm_ref[:b], params["A_log"],
            params["dt_bias"], params["D"], params["norm_weight"], group_size, 1e-5, dt_limit, normalize,
        )
        assert got.shape == want.shape and got.dtype == want.dtype == dtype
        errors.append((_rel_err(got, want), _rel_err(conv_cache, conv_ref), _rel_err(ssm_cache, ssm_ref)))
    # Rows past the batch (other slots) are never touched.
    assert torch.equal(conv_cache[b:], conv_ref[b:]) and torch.equal(ssm_cache[b:], ssm_ref[b:])
    return errors


@needs_interpreter
@pytest.mark.parametrize(
    "h, p, g, dt_limit",
    [
        (4, 8, 1, (0.0, math.inf)),  # one group, 4 heads per group, default limit (no clamp)
        (4, 16, 2, (0.01, 0.3)),  # two groups of 2 heads, a finite limit that clamps both ends
        (6, 8, 2, (0.0, 0.05)),  # 3 heads per group, upper clamp only
    ],
)
def test_matches_reference_over_steps_float32(tdecode, h, p, g, dt_limit):
    errors = _run_steps(tdecode, 3, h, p, 16, g, 4, state_len=4, dtype=torch.float32, state_dtype=torch.float32,
                        dt_limit=dt_limit)
    for step, (out, conv, ssm) in enumerate(errors):
        assert out <= 1e-5 and ssm <= 1e-5, f"step {step}: output {out:.2e}, ssm state {ssm:.2e}"
        assert conv == 0.0, f"step {step}: the conv state is a copy of inputs, error {conv:.2e}"


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unnormalized_step_is_one_kernel_that_advances_the_whole_conv_state(tdecode, dtype):
    """``normalize=False`` (the fused decode step's mode): y before the gated norm, and the B/C conv-state rows shifted
    by the last program of each group to arrive (4 programs per group here); over several steps, so a counter left
    non-zero would skip the next step's shift and show in the conv state."""
    errors = _run_steps(tdecode, 2, 8, 16, 16, 2, 4, state_len=3, dtype=dtype, state_dtype=torch.float32,
                        dt_limit=(0.0, math.inf), normalize=False)
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    for step, (y_err, conv_err, ssm_err) in enumerate(errors):
        assert y_err <= bound and conv_err == 0.0 and ssm_err <= 1e-5, f"step {step}: {y_err}, {conv_err}, {ssm_err}"
    assert int(tdecode._arrival_counters(torch.device("cpu"), 1).abs().sum()) == 0  # left zero for the next step


@needs_interpreter
def test_edge_shapes_float32(tdecode):
    """Minimal conv state (w - 1 entries), no conv bias and no D, non-power-of-two head dim and state (masked tiles),
    norm groups that differ from the SSM groups, and a tile smaller than a head (several programs per head)."""
    errors = _run_steps(tdecode, 2, 4, 12, 12, 2, 4, state_len=3, dtype=torch.float32, state_dtype=torch.float32,
                        dt_limit=(0.001, 1.0), conv_bias=False, use_d=False, group_size=12)
    assert max(e for step in errors for e in step) <= 1e-5, errors
    tdecode_tile = tdecode.STATE_TILE_ELEMENTS
    try:
        tdecode.STATE_TILE_ELEMENTS = 64  # BLOCK_P = 4 for d_state 16: 4 programs per head of 16 rows
        errors = _run_steps(tdecode, 3, 4, 16, 16, 2, 4, state_len=4, dtype=torch.float32,
                            state_dtype=torch.float32, dt_limit=(0.0, math.inf), seed=1)
        assert max(e for step in errors for e in step) <= 1e-5, errors
    finally:
        tdecode.STATE_TILE_ELEMENTS = tdecode_tile


@needs_interpreter
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_bfloat16(tdecode, state_dtype):
    """bf16 activations and parameters: the kernels round where the unfused path rounds (conv outputs, y, the state
    when bf16, all to nearest even), so they agree to within one bf16 rounding step (here they are identical)."""
    errors = _run_steps(tdecode, 3, 4, 8, 16, 2, 4, state_len=4, dtype=torch.bfloat16, state_dtype=state_dtype,
                        dt_limit=(0.0, math.inf), seed=2)
    ssm_tol = 1e-5 if state_dtype == torch.float32 else 4e-3
    for step, (out, conv, ssm) in enumerate(errors):
        assert out <= 4e-3 and ssm <= ssm_tol and conv == 0.0, f"step {step}: {out:.2e}, {conv:.2e}, {ssm:.2e}"


@needs_interpreter
def test_rejects_inconsistent_shapes(tdecode):
    params, conv_cache, ssm_cache, inputs = _problem(2, 4, 8, 16, 2, 4, state_len=4, dtype=torch.float32,
                                                     state_dtype=torch.float32)
    args = (params["conv_weight"], params["conv_bias"], ssm_cache[:2], params["A_log"], params["dt_bias"],
            params["D"], params["norm_weight"])
    with pytest.raises(ValueError, match="zxbcdt must be"):
        tdecode.mamba_decode_step_triton(inputs[0][:2], conv_cache[:2], *args, norm_group_size=16, eps=1e-5)
    with pytest.raises(ValueError, match="conv_state must be"):
        tdecode.mamba_decode_step_triton(inputs[0][:2, 1:-2], conv_cache[:2, :, :2], *args, norm_group_size=16,
                                         eps=1e-5)


def _mixer_and_context(dt_limit):
    from megatron_hybrid.config import HybridConfig
    from megatron_hybrid.inference.context import InferenceContext
    from megatron_hybrid.layers.mamba_mixer import MambaMixer
    from megatron_hybrid.parallel.state import ParallelGroups

    torch.manual_seed(5)
    config = HybridConfig(num_layers=1, hidden_size=32, vocab_size=64, hybrid_override_pattern="M",
                          num_attention_heads=2, mamba_state_dim=16, mamba_head_dim=8, mamba_num_groups=2,
                          mamba_chunk_size=8, mamba_dt_limit=dt_limit)
    mixer = MambaMixer(config, ParallelGroups.single()).eval()
    return mixer, InferenceContext(mixer, max_batch_size=4, max_sequence_length=16)


@needs_interpreter
@pytest.mark.parametrize("dt_limit", [(0.0, math.inf), (0.002, 0.05)])
def test_mamba_mixer_decode_fused_matches_the_unfused_path(tdecode, monkeypatch, dt_limit):
    """``MambaMixer._decode_step`` through the fused kernels (dispatch forced on CPU tensors) against its torch path,
    after a prefill, over several steps; outputs and both caches."""
    mixer, context = _mixer_and_context(dt_limit)
    prompt = torch.randn(5, 3, 32)
    tokens = [torch.randn(1, 3, 32) for _ in range(3)]
    runs = []
    for fused in (False, True):
        if fused:
            monkeypatch.setattr(backend, "_fused_decode_kernel", lambda op, mode, t: tdecode.mamba_decode_step_triton)
        context.reset()
        outs = []
        with torch.inference_mode():
            context.set_prefill(0, 3)
            mixer(prompt, inference_context=context)
            context.set_decode(3)
            for token in tokens:
                outs.append(mixer(token, inference_context=context))
        conv_state, ssm_state = context.mamba[0]
        runs.append((torch.cat(outs), conv_state.clone(), ssm_state.clone()))
    (out_r, conv_r, ssm_r), (out_f, conv_f, ssm_f) = runs
    assert _rel_err(out_f, out_r) <= 1e-5
    assert _rel_err(ssm_f, ssm_r) <= 1e-5
    assert torch.equal(conv_f, conv_r)


def test_dispatch_on_cpu_keeps_the_unfused_path(monkeypatch):
    """CPU tensors under "auto" (and "torch", or the env override) never reach the kernels; "triton" refuses."""
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    zx = torch.randn(2, 10)
    called = []
    monkeypatch.setattr(backend, "load_own_triton", lambda *args: called.append(args))
    args = (zx, None, None, None, None, None, None, None, None)
    assert ops.mamba_decode_fused(*args, norm_group_size=1, eps=1e-5) is None
    assert ops.mamba_decode_fused(*args, norm_group_size=1, eps=1e-5, backend="torch") is None
    with pytest.raises(ops.KernelUnavailableError, match="needs CUDA tensors"):
        ops.mamba_decode_fused(*args, norm_group_size=1, eps=1e-5, backend="triton")
    monkeypatch.setenv(ops.ENV_VAR, "torch")
    assert backend._fused_decode_kernel("op", "auto", zx) is None
    assert not called


def test_env_override_forces_the_torch_path_on_cuda_tensors(monkeypatch):
    """``MEGATRON_HYBRID_KERNELS=torch`` wins over a loadable kernel, even for (pretended) CUDA tensors."""

    class FakeCuda:
        device = torch.device("cuda")
        dtype = torch.bfloat16
        requires_grad = False

    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    monkeypatch.setattr(backend, "load_own_triton", lambda *args: "kernel")
    assert backend._fused_decode_kernel("op", "auto", FakeCuda()) == "kernel"
    monkeypatch.setenv(ops.ENV_VAR, "torch")
    assert backend._fused_decode_kernel("op", "auto", FakeCuda()) is None


def test_module_imports_and_reports_availability():
    module = importlib.import_module(MODULE)
    assert module.UNAVAILABLE_REASON is None  # triton is importable here (importorskip above)
    assert callable(module.mamba_decode_step_triton)


# ------------------------------------------------------------------------------------------------ on a real GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA device (compiled Triton)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matches_reference_and_replays_in_a_cuda_graph(dtype):
    module = importlib.import_module(MODULE)
    b, h, p, n, g, w = 3, 32, 64, 128, 8, 4  # the 800M layer's shape (local, TP=1)
    params, conv_cache, ssm_cache, inputs = _problem(b, h, p, n, g, w, state_len=w, dtype=dtype,
                                                     state_dtype=torch.float32)
    cuda = {k: (v.cuda() if v is not None else None) for k, v in params.items()}
    conv_gpu, ssm_gpu = conv_cache.cuda(), ssm_cache.cuda()
    conv_ref, ssm_ref = conv_cache.cuda(), ssm_cache.cuda()
    order = ("conv_weight", "conv_bias")
    rest = ("A_log", "dt_bias", "D", "norm_weight")
    rel = 1e-4 if dtype == torch.float32 else 2e-2
    for wide in inputs:
        zx = wide.cuda()[:, 1:-2]
        got = module.mamba_decode_step_triton(zx, conv_gpu[:b], *(cuda[k] for k in order), ssm_gpu[:b],
                                              *(cuda[k] for k in rest), norm_group_size=h * p // g, eps=1e-5)
        want = _reference_step(zx, conv_ref[:b], *(cuda[k] for k in order), ssm_ref[:b], *(cuda[k] for k in rest),
                               h * p // g, 1e-5, (0.0, math.inf))
        assert _rel_err(got, want) <= rel and _rel_err(ssm_gpu, ssm_ref) <= rel
        assert torch.equal(conv_gpu, conv_ref)
    # Capture one step with static buffers and replay it: the same result as an eager step from the same states.
    static_zx = inputs[0].cuda()[:, 1:-2].clone()
    conv_before, ssm_before = conv_gpu.clone(), ssm_gpu.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        module.mamba_decode_step_triton(static_zx, conv_gpu[:b], *(cuda[k] for k in order), ssm_gpu[:b],
                                        *(cuda[k] for k in rest), norm_group_size=h * p // g, eps=1e-5)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = module.mamba_decode_step_triton(static_zx, conv_gpu[:b], *(cuda[k] for k in order),
                                                     ssm_gpu[:b], *(cuda[k] for k in rest),
                                                     norm_group_size=h * p // g, eps=1e-5)
    conv_gpu.copy_(conv_before)
    ssm_gpu.copy_(ssm_before)
    graph.replay()
    conv_eager, ssm_eager = conv_before.clone(), ssm_before.clone()
    eager = module.mamba_decode_step_triton(static_zx, conv_eager[:b], *(cuda[k] for k in order), ssm_eager[:b],
                                            *(cuda[k] for k in rest), norm_group_size=h * p // g, eps=1e-5)
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager) and torch.equal(conv_gpu, conv_eager) and torch.equal(ssm_gpu, ssm_eager)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA device (compiled Triton)")
@pytest.mark.filterwarnings("ignore::megatron_hybrid.ops.KernelFallbackWarning")
@pytest.mark.parametrize("dt_limit", [(0.0, math.inf), (0.002, 0.05)])
def test_gpu_mamba_mixer_decode_fused_matches_unfused(dt_limit):
    """The mixer on CUDA: ``fused_decode`` on (the Triton step) against off (mamba_ssm's kernels or the torch ops)."""
    mixer, _ = _mixer_and_context(dt_limit)
    mixer = mixer.cuda()
    from megatron_hybrid.inference.context import InferenceContext

    context = InferenceContext(mixer, max_batch_size=4, max_sequence_length=16)
    prompt = torch.randn(5, 3, 32, device="cuda")
    tokens = [torch.randn(1, 3, 32, device="cuda") for _ in range(3)]
    runs = []
    for fused in (False, True):
        mixer.fused_decode = fused
        context.reset()
        with torch.inference_mode():
            context.set_prefill(0, 3)
            mixer(prompt, inference_context=context)
            context.set_decode(3)
            outs = torch.cat([mixer(token, inference_context=context) for token in tokens])
        conv_state, ssm_state = context.mamba[0]
        runs.append((outs, conv_state.clone(), ssm_state.clone()))
    (out_r, conv_r, ssm_r), (out_f, conv_f, ssm_f) = runs
    assert _rel_err(out_f, out_r) <= 1e-4 and _rel_err(ssm_f, ssm_r) <= 1e-4
    assert torch.equal(conv_f, conv_r)
