"""Backend selection: CPU defaults, forced backends, the environment override, fallback warnings, lazy loading."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

import megatron_hybrid.ops.backend as backend
from megatron_hybrid import ops
from megatron_hybrid.ops import mamba_ssm_loader
from megatron_hybrid.ops.mamba_ssm_loader import KernelUnavailableError, MambaSsmKernels


@pytest.fixture(autouse=True)
def _clean_state(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    monkeypatch.setattr(backend, "_warned", set())


def _scan_inputs():
    torch.manual_seed(0)
    return (torch.randn(1, 10, 2, 4), torch.randn(1, 10, 2), -torch.rand(2), torch.randn(1, 10, 1, 3),
            torch.randn(1, 10, 1, 3))


def _all_ops_forced(mode):
    x, dt, A, B, C = _scan_inputs()
    weight = torch.randn(4, 4)
    calls = {
        "ssd_chunk_scan": lambda: ops.ssd_chunk_scan(x, dt, A, B, C, 4, backend=mode),
        "causal_conv1d": lambda: ops.causal_conv1d(x[:, :, 0].transpose(1, 2), weight, backend=mode),
        "causal_conv1d_update": lambda: ops.causal_conv1d_update(x[:, 0, 0], torch.zeros(1, 4, 4), weight,
                                                                 backend=mode),
        "ssm_state_update": lambda: ops.ssm_state_update(torch.zeros(1, 2, 4, 3), x[:, 0], dt[:, 0], A, B[:, 0],
                                                         C[:, 0], backend=mode),
        "rms_norm": lambda: ops.rms_norm(x, torch.ones(4), 1e-5, backend=mode),
        "gated_rms_norm": lambda: ops.gated_rms_norm(x, x, torch.ones(4), 1e-5, backend=mode),
    }
    return calls


@pytest.mark.parametrize("op", list(_all_ops_forced("auto")))
def test_triton_on_cpu_raises_clear_error(op):
    with pytest.raises(KernelUnavailableError, match="needs CUDA tensors"):
        _all_ops_forced("triton")[op]()


@pytest.mark.parametrize("op", list(_all_ops_forced("auto")))
def test_auto_on_cpu_is_the_silent_torch_reference(op):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto = _all_ops_forced("auto")[op]()
    torch.testing.assert_close(auto, _all_ops_forced("torch")[op](), rtol=0, atol=0)


def test_environment_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv(ops.ENV_VAR, "triton")
    with pytest.raises(KernelUnavailableError):
        _all_ops_forced("auto")["ssd_chunk_scan"]()
    _all_ops_forced("torch")["ssd_chunk_scan"]()  # an explicit backend wins over the environment
    monkeypatch.setenv(ops.ENV_VAR, "torch")
    _all_ops_forced("auto")["ssd_chunk_scan"]()
    monkeypatch.setenv(ops.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=ops.ENV_VAR):
        _all_ops_forced("auto")["ssd_chunk_scan"]()


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend must be one of"):
        _all_ops_forced("fast")["rms_norm"]()


def test_kernel_backend_info_reports_availability():
    info = ops.kernel_backend_info()
    assert set(info) >= {"env_override", "cuda_available", "mamba_ssm_triton", "causal_conv1d", "auto_on_cuda",
                         "auto_on_cpu"}
    assert info["auto_on_cpu"] == "torch"
    for key in ("mamba_ssm_triton", "causal_conv1d"):
        entry = info[key]
        assert isinstance(entry["available"], bool)
        assert entry["available"] == (entry["error"] is None)
    if not info["mamba_ssm_triton"]["available"]:
        assert "mamba_ssm" in info["mamba_ssm_triton"]["error"]
        assert info["auto_on_cuda"]["ssd_chunk_scan"] == "torch"


def _fake_cuda(dtype=torch.float32):
    return types.SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype)


def test_cuda_fallback_warns_once_with_the_reason(monkeypatch):
    def unavailable():
        raise KernelUnavailableError("mamba_ssm is not installed (ModuleNotFoundError: boom)")

    monkeypatch.setattr(backend, "load_mamba_ssm_kernels", unavailable)
    with pytest.warns(ops.KernelFallbackWarning, match="SLOW.*boom"):
        assert backend._mamba_kernels("ssd_chunk_scan", "auto", _fake_cuda()) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend._mamba_kernels("gated_rms_norm", "auto", _fake_cuda()) is None  # once per process
        assert backend._mamba_kernels("ssd_chunk_scan", "torch", _fake_cuda()) is None  # explicit: no warning
    with pytest.raises(KernelUnavailableError, match="boom"):
        backend._mamba_kernels("ssd_chunk_scan", "triton", _fake_cuda())
    with pytest.warns(ops.KernelFallbackWarning, match="float64"):
        backend._mamba_kernels("ssd_chunk_scan", "auto", _fake_cuda(torch.float64))


def test_cuda_tensors_route_to_the_loaded_kernels(monkeypatch):
    monkeypatch.setenv(backend.SSD_KERNEL_ENV_VAR, "mamba_ssm")  # the scan of mamba_ssm, not ours (next test)
    calls = {}

    def record(name):
        def kernel(*args, **kwargs):
            calls[name] = (args, kwargs)
            return name
        return kernel

    fake = MambaSsmKernels(mamba_chunk_scan_combined=record("scan"), selective_state_update=record("step"),
                           rmsnorm_fn=record("norm"), how="fake")
    monkeypatch.setattr(backend, "load_mamba_ssm_kernels", lambda: fake)
    monkeypatch.setattr(backend, "check_ssd_shapes", lambda *args: None)

    def no_own_triton(module, *args):  # our Triton modules unavailable: the norm falls back to mamba_ssm's kernel
        raise KernelUnavailableError(f"{module}: no triton")

    monkeypatch.setattr(backend, "load_own_triton", no_own_triton)
    x = _fake_cuda()
    seq_idx = torch.tensor([[7, 7, 9, 9, 9]], dtype=torch.int32)
    assert ops.ssd_chunk_scan(x, None, None, None, None, 4, seq_idx=seq_idx, dt_softplus=True) == "scan"
    kwargs = calls["scan"][1]
    assert kwargs["dt_softplus"] is True and kwargs["seq_idx"].dtype == torch.int32
    assert kwargs["seq_idx"].tolist() == [[1, 1, 2, 2, 2]]  # ids turned into segments (first id != 0: no init)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(backend, "_norm_fits_kernel", lambda *a: True)
        y = types.SimpleNamespace(device=x.device, dtype=x.dtype, shape=(2, 8))
        assert ops.gated_rms_norm(y, y, torch.ones(8), 1e-5, group_size=4) == "norm"
    assert calls["norm"][1]["group_size"] == 4 and calls["norm"][1]["norm_before_gate"] is False


def test_cuda_scan_routes_to_our_triton_scan_with_segments_and_the_gate(monkeypatch):
    """On CUDA the scan goes to ops.triton_ssd (seq_idx as segment ids, z applied after it as mamba_ssm does), unless
    MEGATRON_HYBRID_SSD_KERNEL=mamba_ssm; a value outside the choices is an error naming the variable."""
    pytest.importorskip("triton", reason="ops.triton_ssd imports triton")
    calls = {}

    def own(x, dt, A, B, C, chunk_size, **kwargs):
        calls["own"] = kwargs
        return torch.full_like(x, 2.0), torch.zeros(1)

    monkeypatch.setattr(backend, "load_own_triton", lambda *args: own)
    monkeypatch.setattr(backend, "_cuda_kernel_mode", lambda op, mode, tensor: "auto")
    monkeypatch.setattr(backend, "load_mamba_ssm_kernels", lambda: pytest.fail("mamba_ssm's scan was called"))
    b, l, h, p, g, n = 1, 5, 2, 4, 1, 8
    x, dt, A = torch.zeros(b, l, h, p), torch.zeros(b, l, h), -torch.ones(h)
    B = C = torch.zeros(b, l, g, n)
    z = torch.ones(b, l, h, p)
    seq_idx = torch.tensor([[7, 7, 9, 9, 9]])
    y = ops.ssd_chunk_scan(x, dt, A, B, C, 16, z=z, seq_idx=seq_idx)
    torch.testing.assert_close(y, torch.full_like(x, 2.0 * torch.nn.functional.silu(torch.tensor(1.0)).item()))
    assert calls["own"]["segments"].tolist() == [[1, 1, 2, 2, 2]]
    # outside what our kernels cover (D per channel): mamba_ssm's scan, which the fake loader refuses
    with pytest.raises(pytest.fail.Exception, match="mamba_ssm's scan was called"):
        ops.ssd_chunk_scan(x, dt, A, B, C, 16, D=torch.ones(h, p))
    monkeypatch.setenv(backend.SSD_KERNEL_ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="MEGATRON_HYBRID_SSD_KERNEL='fastest'"):
        ops.ssd_chunk_scan(x, dt, A, B, C, 16)


def test_cuda_norms_route_to_our_triton_norm(monkeypatch):
    """On CUDA, RMSNorm and the gated norm (norm after gate) go to ops.triton_norm; norm_before_gate=True and groups
    wider than its limit go to mamba_ssm's kernel."""
    pytest.importorskip("triton", reason="ops.triton_norm imports triton")
    from megatron_hybrid.ops import triton_norm

    calls = []

    def own(x, z, weight, eps, group_size=None):
        calls.append((z is not None, group_size))
        return "own"

    monkeypatch.setattr(backend, "load_own_triton", lambda module, *args: own if module.endswith("triton_norm")
                        else pytest.fail(f"{module} loaded"))
    monkeypatch.setattr(backend, "_cuda_kernel_mode", lambda op, mode, tensor: "auto")
    fake = MambaSsmKernels(mamba_chunk_scan_combined=None, selective_state_update=None,
                           rmsnorm_fn=lambda *a, **k: "mamba_ssm", how="fake")
    monkeypatch.setattr(backend, "load_mamba_ssm_kernels", lambda: fake)
    x = torch.zeros(2, 3, 8)
    assert ops.rms_norm(x, torch.ones(8), 1e-5) == "own"
    assert ops.gated_rms_norm(x, x, torch.ones(8), 1e-5, group_size=4) == "own"
    assert calls == [(False, None), (True, 4)]
    assert ops.gated_rms_norm(x, x, torch.ones(8), 1e-5, group_size=4, norm_before_gate=True) == "mamba_ssm"
    monkeypatch.setattr(triton_norm, "MAX_GROUP", 2)
    assert ops.gated_rms_norm(x, x, torch.ones(8), 1e-5, group_size=4) == "mamba_ssm"


def test_mixer_span_is_fused_only_on_cuda_for_shapes_it_covers(monkeypatch):
    """``ops.mamba_span``: None off CUDA (the mixer composes the ops), an error when "triton" is forced there; on CUDA
    our fused span with seq_idx as int32 segment ids, and None again for MEGATRON_HYBRID_SSD_KERNEL=mamba_ssm or a
    shape the kernels do not cover."""
    pytest.importorskip("triton", reason="ops.triton_mamba_span imports triton")
    h, p, g, n = 2, 4, 1, 8
    width = 2 * h * p + 2 * g * n + h
    zxbcdt = torch.zeros(1, 5, width)
    args = (zxbcdt, torch.zeros(h * p + 2 * g * n, 4), None, -torch.ones(h), torch.ones(h), None, torch.ones(h * p))
    dims = dict(nheads=h, headdim=p, ngroups=g, d_state=n, chunk_size=16, norm_group_size=h * p, norm_eps=1e-5)
    assert ops.mamba_span(*args, **dims) is None
    with pytest.raises(KernelUnavailableError, match="mamba_span: backend 'triton' needs CUDA"):
        ops.mamba_span(*args, **dims, backend="triton")
    calls = {}

    def fused(*fargs):
        calls["shape"], calls["segments"] = fargs[-2], fargs[-1]
        return "fused"

    monkeypatch.setattr(backend, "load_own_triton", lambda *a: fused)
    monkeypatch.setattr(backend, "_cuda_kernel_mode", lambda op, mode, tensor: "auto")
    assert ops.mamba_span(*args, **dims, seq_idx=torch.tensor([[3, 3, 4, 4, 4]])) == "fused"
    assert calls["segments"].dtype == torch.int32 and calls["segments"].tolist() == [[1, 1, 2, 2, 2]]
    assert (calls["shape"].d_inner, calls["shape"].width, calls["shape"].dt_limit) == (h * p, width, (0.0, math.inf))
    with pytest.raises(ValueError, match=r"seq_idx must be \(1, 5\)"):
        ops.mamba_span(*args, **dims, seq_idx=torch.zeros(1, 4, dtype=torch.int64))
    assert ops.mamba_span(*args, **{**dims, "chunk_size": 24}) is None  # not a power of two
    monkeypatch.setenv(backend.SSD_KERNEL_ENV_VAR, "mamba_ssm")
    assert ops.mamba_span(*args, **dims) is None


def test_loader_reaches_triton_submodules_when_package_init_fails(tmp_path, monkeypatch):
    """A mamba_ssm whose __init__ fails (missing CUDA extension) still yields its Triton submodules."""
    if importlib.util.find_spec("mamba_ssm") is not None:
        pytest.skip("a real mamba_ssm is installed; the fake package would be shadowed")
    root = tmp_path / "mamba_ssm"
    (root / "ops" / "triton").mkdir(parents=True)
    (root / "__init__.py").write_text("import selective_scan_cuda  # noqa\n")
    (root / "ops" / "__init__.py").write_text("")
    (root / "ops" / "triton" / "__init__.py").write_text("")
    for module, function in (("ssd_combined", "mamba_chunk_scan_combined"),
                             ("selective_state_update", "selective_state_update"),
                             ("layernorm_gated", "rmsnorm_fn")):
        (root / "ops" / "triton" / f"{module}.py").write_text(
            f"from mamba_ssm.ops.triton import __name__ as _parent\n\ndef {function}(*a, **k):\n    return '{module}'\n"
        )
    monkeypatch.syspath_prepend(str(tmp_path))
    mamba_ssm_loader.reset_kernel_cache()
    try:
        kernels = mamba_ssm_loader.load_mamba_ssm_kernels()
        assert kernels.mamba_chunk_scan_combined() == "ssd_combined"
        assert kernels.rmsnorm_fn() == "layernorm_gated"
        assert "bare package" in kernels.how and "selective_scan_cuda" in kernels.how
        assert not hasattr(sys.modules["mamba_ssm"], "selective_scan_fn")  # __init__ never ran to completion
    finally:
        for name in [name for name in sys.modules if name == "mamba_ssm" or name.startswith("mamba_ssm.")]:
            del sys.modules[name]
        mamba_ssm_loader.reset_kernel_cache()


def test_importing_ops_does_not_import_gpu_packages():
    code = (
        "import sys, megatron_hybrid.ops\n"
        "eager = [m for m in sys.modules if m.split('.')[0] in ('mamba_ssm', 'causal_conv1d', 'triton')]\n"
        "assert not eager, eager\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_cross_entropy_dispatch_keeps_the_torch_path_off_cuda():
    """Off CUDA ``ops.cross_entropy`` declines (forced "triton" raises) and the loss takes its torch path, which
    never writes into the logits, even when allowed to."""
    from megatron_hybrid.parallel.cross_entropy import vocab_parallel_cross_entropy
    from megatron_hybrid.parallel.state import ParallelGroups

    logits = torch.randn(2, 3, 11, requires_grad=True)
    before = logits.detach().clone()
    target = torch.randint(0, 11, (2, 3))
    assert ops.cross_entropy(logits, target) is None
    with pytest.raises(ops.KernelUnavailableError, match="needs CUDA tensors"):
        ops.cross_entropy(logits, target, backend="triton")
    loss = vocab_parallel_cross_entropy(logits, target, ParallelGroups.single(), reuse_logits=True)
    loss.sum().backward()
    leaf = before.clone().requires_grad_()
    want = torch.nn.functional.cross_entropy(leaf.reshape(-1, 11), target.reshape(-1), reduction="none")
    want.sum().backward()
    assert torch.allclose(loss, want.view(2, 3).detach(), rtol=1e-6, atol=1e-6)
    assert torch.allclose(logits.grad, leaf.grad, rtol=1e-6, atol=1e-7)
    assert torch.equal(logits.detach(), before)
