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


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_gated_rms_norm_matches_reference(norm_before_gate):
    """Forward and backward (ours for norm_before_gate=False, mamba_ssm's kernel for True; the plain RMSNorm too)."""
    torch.manual_seed(2)
    x = torch.randn(4, 33, 256, device="cuda", dtype=torch.bfloat16)
    z = torch.randn_like(x)
    weight = torch.randn(256, device="cuda")
    grad = torch.randn_like(x)
    results = {}
    for backend in ("triton", "torch"):
        leaves = [t.clone().requires_grad_() for t in (x, z, weight)]
        y = ops.gated_rms_norm(*leaves, 1e-5, group_size=64, norm_before_gate=norm_before_gate, backend=backend)
        y2 = ops.rms_norm(leaves[0], leaves[2], 1e-5, backend=backend)
        ((y.float() * grad.float()).sum() + (y2.float() * grad.float()).sum()).backward()
        results[backend] = (y.detach(), y2.detach(), *(t.grad for t in leaves))
    for got, want in zip(results["triton"], results["torch"]):
        assert got.dtype == want.dtype
        _close(got, want, 1e-2)
        assert _relative(got, want) <= 1e-2


@pytest.mark.parametrize("dpre_dtype", [None, torch.float32])
def test_triton_conv1d_matches_float64(dpre_dtype, monkeypatch):
    """The Triton causal conv (the module's tiles; the backward's dpre buffer in bf16, the default, or float32) on
    the strided xBC view of an in_proj-shaped bf16 tensor, with documents, against float64 on the same bf16 values:
    output and dx within 1e-2 of their scale, weight and bias gradients within 1e-5 (float32 sums)."""
    from megatron_hybrid.ops import triton_conv1d

    monkeypatch.setattr(triton_conv1d, "DPRE_DTYPE", dpre_dtype)
    torch.manual_seed(5)
    b, l, d = 2, 1500, 4096
    wide = torch.randn(b, l, d + 2080, device="cuda", dtype=torch.bfloat16)
    x = wide[..., 2048:2048 + d].detach().requires_grad_()
    weight = (torch.randn(d, 4, device="cuda") * 0.5).requires_grad_()
    bias = torch.randn(d, device="cuda").requires_grad_()
    seq_idx = torch.zeros(b, l, dtype=torch.int32, device="cuda")
    seq_idx[0, 1023:] = 1  # a one-token document at the end of the first backward program's rows (1024 of them)
    seq_idx[0, 1024:] = 2
    seq_idx[1, 700:] = 3
    grad = torch.randn(b, l, d, device="cuda", dtype=torch.bfloat16)
    for seq in (None, seq_idx):
        out = triton_conv1d.causal_conv1d_channel_last_triton(x, weight, bias, "silu", seq_idx=seq)
        got = (out, *torch.autograd.grad(out, (x, weight, bias), grad))
        leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
        ref = ops.causal_conv1d_ref(leaves[0].transpose(1, 2), leaves[1], leaves[2], "silu",
                                    seq_idx=seq).transpose(1, 2)
        want = (ref, *torch.autograd.grad(ref, leaves, grad.double()))
        for name, g, w, rel in zip(("out", "dx", "dweight", "dbias"), got, want, (1e-2, 1e-2, 1e-5, 1e-5)):
            err = (g.double() - w).abs().max().item()
            assert err <= rel * w.abs().max().item(), f"{name}: {err:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_mamba_span_matches_composed_reference(dtype):
    """``ops.mamba_span`` (conv -> scan -> gated norm in one node) against the reference ops composed, at the real
    head and state sizes, with documents and a dt clamp; in_proj's output a sequence-first view.

    float32: within 2e-4 of the float32 reference. bfloat16 (inputs and parameters): the float32 reference of the same
    bf16 values is the truth; the fused span must be within 1e-2 of it, or no further than 1.5x the distance of the
    reference ops run in bf16 (which round the same intermediates: conv output, y, the norm's input gradient).
    """
    torch.manual_seed(4)
    b, l, h, p, g, n, kw = 2, 300, 8, 64, 2, 128, 4
    di, conv = h * p, h * p + 2 * g * n
    dev = "cuda"
    leaves = dict(
        zxbcdt=torch.randn(l, b, di + conv + h, device=dev).transpose(0, 1) * 0.5,
        conv_weight=torch.randn(conv, kw, device=dev) * 0.5, conv_bias=torch.randn(conv, device=dev) * 0.1,
        A=-torch.rand(h, device=dev) * 4 - 0.5, D=torch.randn(h, device=dev), dt_bias=torch.randn(h, device=dev) * 0.5,
        norm_weight=1 + 0.2 * torch.randn(di, device=dev),
    )
    leaves = {k: v.to(dtype) if k != "A" else v for k, v in leaves.items()}  # A is float32 in the mixer
    seq_idx = torch.zeros(b, l, dtype=torch.int32, device=dev)
    seq_idx[0, 100:] = 1
    seq_idx[1, 128:] = 1  # on a chunk edge
    dims = dict(nheads=h, headdim=p, ngroups=g, d_state=n, chunk_size=64, norm_group_size=di // g, norm_eps=1e-5,
                dt_limit=(0.001, 5.0))
    grad = torch.randn(b, l, di, device=dev)
    results = {}
    for run, run_dtype in (("fused", dtype), ("reference", dtype), ("truth", torch.float32)):
        inputs = {k: v.to(run_dtype if k != "A" else torch.float32).detach().requires_grad_()
                  for k, v in leaves.items()}
        if run == "fused":
            y = ops.mamba_span(*inputs.values(), **dims, seq_idx=seq_idx)
            assert y is not None, "the fused span should apply to these arguments on CUDA"
        else:
            z, xbc, dt = torch.split(inputs["zxbcdt"], [di, conv, h], dim=-1)
            xbc = ops.causal_conv1d_channel_last(xbc, inputs["conv_weight"], inputs["conv_bias"], "silu",
                                                 seq_idx=seq_idx, backend="torch")
            x, B, C = torch.split(xbc, [di, g * n, g * n], dim=-1)
            y = ops.ssd_chunk_scan(x.unflatten(-1, (h, p)), dt, inputs["A"], B.unflatten(-1, (g, n)),
                                   C.unflatten(-1, (g, n)), 64, D=inputs["D"], dt_bias=inputs["dt_bias"],
                                   dt_softplus=True, dt_limit=dims["dt_limit"], seq_idx=seq_idx, backend="torch")
            y = ops.gated_rms_norm(y.reshape(b, l, di), z, inputs["norm_weight"], 1e-5, di // g, backend="torch")
        (y.float() * grad).sum().backward()
        results[run] = {"y": y.detach(), **{k: v.grad for k, v in inputs.items()}}
    assert results["fused"]["y"].dtype == dtype
    for name, truth in results["truth"].items():
        err = _relative(results["fused"][name], truth)
        if dtype == torch.float32:
            assert err <= 2e-4, f"{name}: {err:.2e}"
        else:
            reference_err = _relative(results["reference"][name], truth)
            assert err <= max(1e-2, 1.5 * reference_err), f"{name}: {err:.2e} (bf16 reference {reference_err:.2e})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_cross_entropy_matches_float64(dtype):
    """Our Triton cross entropy (the CUDA path of ``vocab_parallel_cross_entropy`` at tensor-parallel size 1) on a
    large vocabulary with a partial last block, through the model's call (``reuse_logits``) and a plain one."""
    from megatron_hybrid.parallel.cross_entropy import vocab_parallel_cross_entropy
    from megatron_hybrid.parallel.state import ParallelGroups

    gen = torch.Generator(device="cuda").manual_seed(0)
    s, b, vocab = 33, 3, 50_021
    logits = (torch.randn(s, b, vocab, device="cuda", generator=gen) * 4).to(dtype)
    target = torch.randint(0, vocab, (s, b), device="cuda", generator=gen)
    target[0, 0], target[1, 0] = 0, vocab - 1
    grad_loss = torch.rand(s, b, device="cuda", generator=gen)
    truth = logits.double().requires_grad_()
    want = torch.nn.functional.cross_entropy(truth.reshape(-1, vocab), target.reshape(-1), reduction="none")
    want.backward(grad_loss.reshape(-1).double())
    for reuse in (False, True):
        leaf = logits.clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(leaf * 1, target, ParallelGroups.single(), reuse_logits=reuse)
        assert loss.dtype == torch.float32
        loss.backward(grad_loss)
        assert (loss.double().reshape(-1) - want.detach()).abs().max().item() <= 1e-5 * want.abs().max().item()
        err = (leaf.grad.double() - truth.grad).abs()
        rounding = 2.0 ** -8 if dtype == torch.bfloat16 else 1e-6  # one rounding to bf16, or float32 arithmetic
        assert (err <= rounding * truth.grad.abs() + 1e-7).all(), f"worst {err.max().item():.2e}"
