"""GPU fast path (our Triton scan, mamba_ssm Triton kernels, causal_conv1d) against the pure-PyTorch reference.

Skipped unless CUDA is available and mamba_ssm's Triton kernels load. The kernels use TF32 matmuls for float32
inputs, so agreement is checked relative to the output scale rather than to float64 precision.
"""

from __future__ import annotations

import pytest
import torch

from megatron_hybrid import ops
from megatron_hybrid.ops.mamba_ssm_loader import KernelUnavailableError, load_mamba_ssm_kernels

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def _need_kernels():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    try:
        load_mamba_ssm_kernels()
    except KernelUnavailableError as exc:
        pytest.skip(str(exc))


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    err = (a.float() - b.float()).abs().max().item()
    scale = b.float().abs().max().item() + 1e-6
    assert err <= rel * scale, f"max abs error {err:.3e} exceeds {rel} x scale {scale:.3e}"


@pytest.mark.parametrize("ssd_kernel", ["own", "mamba_ssm"])
def test_scan_forward_and_backward_match_reference(ssd_kernel, monkeypatch):
    monkeypatch.setenv("MEGATRON_HYBRID_SSD_KERNEL", ssd_kernel)  # ops.triton_ssd, or mamba_ssm's kernels
    torch.manual_seed(0)
    b, l, h, p, g, n = 2, 300, 8, 32, 2, 64
    dev = "cuda"
    leaves = dict(
        x=torch.randn(b, l, h, p, device=dev), dt=torch.randn(b, l, h, device=dev) - 1.0,
        A=-torch.rand(h, device=dev) * 4 - 0.5, B=torch.randn(b, l, g, n, device=dev) / n**0.5,
        C=torch.randn(b, l, g, n, device=dev) / n**0.5, D=torch.randn(h, device=dev),
        z=torch.randn(b, l, h, p, device=dev), dt_bias=torch.randn(h, device=dev) * 0.5,
        initial_states=torch.randn(b, h, p, n, device=dev),
    )
    seq_idx = torch.zeros(b, l, dtype=torch.int32, device=dev)
    seq_idx[0, 100:] = 1
    seq_idx[0, 190:] = 2
    seq_idx[1, 128:] = 1  # a boundary exactly on a chunk edge
    results = {}
    for backend in ("triton", "torch"):
        inputs = {k: v.clone().requires_grad_() for k, v in leaves.items()}
        y, final = ops.ssd_chunk_scan(
            inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], 64, D=inputs["D"], z=inputs["z"],
            dt_bias=inputs["dt_bias"], dt_softplus=True, dt_limit=(0.001, 5.0),
            initial_states=inputs["initial_states"], seq_idx=seq_idx, return_final_states=True, backend=backend,
        )
        ((y * torch.linspace(-1, 1, p, device=dev)).sum() + final.square().sum()).backward()
        results[backend] = (y.detach(), final.detach(), {k: v.grad for k, v in inputs.items()})
    (y_t, f_t, g_t), (y_r, f_r, g_r) = results["triton"], results["torch"]
    _close(y_t, y_r, 5e-3)
    _close(f_t, f_r, 5e-3)
    for name in leaves:
        _close(g_t[name], g_r[name], 1e-2)


def test_state_update_matches_reference():
    torch.manual_seed(1)
    b, h, p, g, n = 3, 8, 16, 2, 32
    dev = "cuda"
    state = torch.randn(b, h, p, n, device=dev)
    args = (torch.randn(b, h, p, device=dev), torch.randn(b, h, device=dev), -torch.rand(h, device=dev) - 0.1,
            torch.randn(b, g, n, device=dev), torch.randn(b, g, n, device=dev))
    kwargs = dict(D=torch.randn(h, device=dev), z=torch.randn(b, h, p, device=dev),
                  dt_bias=torch.randn(h, device=dev), dt_softplus=True, dt_limit=(0.01, 2.0))
    s_t, s_r = state.clone(), state.clone()
    y_t = ops.ssm_state_update(s_t, *args, backend="triton", **kwargs)
    y_r = ops.ssm_state_update(s_r, *args, backend="torch", **kwargs)
    _close(y_t, y_r, 1e-4)
    _close(s_t, s_r, 1e-5)


@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_gated_rms_norm_matches_reference(norm_before_gate):
    torch.manual_seed(2)
    x = torch.randn(4, 33, 256, device="cuda", dtype=torch.bfloat16)
    z = torch.randn_like(x)
    weight = torch.randn(256, device="cuda")
    y_t = ops.gated_rms_norm(x, z, weight, 1e-5, group_size=64, norm_before_gate=norm_before_gate, backend="triton")
    y_r = ops.gated_rms_norm(x, z, weight, 1e-5, group_size=64, norm_before_gate=norm_before_gate, backend="torch")
    assert y_t.dtype == torch.bfloat16
    _close(y_t, y_r, 1e-2)


def test_conv_fast_path_matches_reference():
    torch.manual_seed(3)
    x = torch.randn(2, 64, 50, device="cuda")
    weight, bias = torch.randn(64, 4, device="cuda"), torch.randn(64, device="cuda")
    seq_idx = torch.zeros(2, 50, dtype=torch.int32, device="cuda")
    seq_idx[:, 20:] = 1
    for kwargs in ({}, {"seq_idx": seq_idx}):
        _close(ops.causal_conv1d(x, weight, bias, "silu", backend="triton", **kwargs),
               ops.causal_conv1d(x, weight, bias, "silu", backend="torch", **kwargs), 1e-5)
