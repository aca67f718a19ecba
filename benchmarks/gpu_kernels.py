"""GPU check and timing of megatron_hybrid's kernel layer (run by hand on an H100/H200; not a test).

1. Parity in bfloat16: the Triton fast path (``backend="triton"``) against the pure-PyTorch reference
   (``backend="torch"``, which upcasts to float32) for ``ssd_chunk_scan`` (forward and backward, with documents,
   initial states, D, z, dt_bias), ``ssm_state_update``, ``gated_rms_norm`` and ``causal_conv1d``; relative errors.
2. Timing of ``ssd_chunk_scan`` forward and forward+backward on b=4, L=4096, h=32, p=64, g=8, n=128, chunk 128:
   our dispatch (``backend="triton"``) against mamba_ssm's bare ``mamba_chunk_scan_combined`` (the dispatch overhead
   should be noise), and optionally the torch reference on the GPU.

Prints one JSON object. Installs nothing: mamba_ssm must be importable from PYTHONPATH (a wheel built without CUDA
extensions is enough; ``megatron_hybrid.ops`` reaches its Triton submodules without running its ``__init__``).

    PYTHONPATH=.:/path/to/mamba_ssm_site python benchmarks/gpu_kernels.py [--iters 20] [--skip-reference-timing]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from collections.abc import Callable

import torch

from megatron_hybrid import ops
from megatron_hybrid.ops.mamba_ssm_loader import KernelUnavailableError, load_mamba_ssm_kernels


def _rel(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Max-abs error over max-abs reference, and Frobenius relative error."""
    a, b = a.float(), b.float()
    diff = a - b
    return {
        "max_rel": diff.abs().max().item() / (b.abs().max().item() + 1e-12),
        "fro_rel": diff.norm().item() / (b.norm().item() + 1e-12),
    }


def _version(dist: str) -> str | None:
    for name in (dist, dist.replace("_", "-")):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _scan_leaves(b: int, l: int, h: int, p: int, g: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)

    return {
        "x": rnd(b, l, h, p),
        "dt": rnd(b, l, h) - 2.0,  # softplus(dt + dt_bias) of order 0.1, as after Mamba-2's dt init
        "A": -torch.rand(h, generator=gen, device="cuda") * 15 - 1,  # A = -exp(A_log), A_log ~ log U(1, 16)
        "B": rnd(b, l, g, n),
        "C": rnd(b, l, g, n),
        "D": rnd(h, dtype=torch.float32),
        "z": rnd(b, l, h, p),
        "dt_bias": rnd(h, scale=0.5, dtype=torch.float32),
        "initial_states": rnd(b, h, p, n, scale=0.1, dtype=torch.float32),
    }


def _documents(b: int, l: int) -> torch.Tensor:
    """Row 0: three documents, the second boundary on a multiple of 128 (a chunk edge); other rows one document."""
    seq_idx = torch.zeros(b, l, dtype=torch.int32, device="cuda")
    first = l // 3
    second = max(first + 1, (2 * l // 3) // 128 * 128)
    seq_idx[0, first:] = 1
    seq_idx[0, second:] = 2
    return seq_idx


def check_scan_parity(b: int = 2, l: int = 1000, h: int = 8, p: int = 64, g: int = 2, n: int = 128,
                      chunk: int = 128) -> dict:
    leaves = _scan_leaves(b, l, h, p, g, n, seed=0)
    seq_idx = _documents(b, l)
    weights = torch.randn(b, l, h, p, device="cuda")
    out = {}
    for backend in ("triton", "torch"):
        inputs = {k: v.clone().requires_grad_() for k, v in leaves.items()}
        y, final = ops.ssd_chunk_scan(
            inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], chunk, D=inputs["D"], z=inputs["z"],
            dt_bias=inputs["dt_bias"], dt_softplus=True, initial_states=inputs["initial_states"], seq_idx=seq_idx,
            return_final_states=True, backend=backend,
        )
        loss = (y.float() * weights).sum() + final.float().square().sum()
        loss.backward()
        out[backend] = (y.detach(), final.detach(), {k: v.grad.detach() for k, v in inputs.items()})
    (y_t, f_t, g_t), (y_r, f_r, g_r) = out["triton"], out["torch"]
    return {
        "shape": {"b": b, "l": l, "h": h, "p": p, "g": g, "n": n, "chunk": chunk, "dtype": "bfloat16"},
        "y": _rel(y_t, y_r),
        "final_states": _rel(f_t, f_r),
        "grads": {k: _rel(g_t[k], g_r[k]) for k in leaves},
        "y_dtype": str(y_t.dtype),
    }


def check_small_ops_parity() -> dict:
    torch.manual_seed(0)
    b, h, p, g, n = 4, 32, 64, 8, 128
    state = torch.randn(b, h, p, n, device="cuda")
    args = (torch.randn(b, h, p, device="cuda", dtype=torch.bfloat16), torch.randn(b, h, device="cuda") - 2,
            -torch.rand(h, device="cuda") * 15 - 1, torch.randn(b, g, n, device="cuda", dtype=torch.bfloat16),
            torch.randn(b, g, n, device="cuda", dtype=torch.bfloat16))
    kwargs = dict(D=torch.randn(h, device="cuda"), z=torch.randn(b, h, p, device="cuda", dtype=torch.bfloat16),
                  dt_bias=torch.randn(h, device="cuda"), dt_softplus=True)
    s_t, s_r = state.clone(), state.clone()
    y_t = ops.ssm_state_update(s_t, *args, backend="triton", **kwargs)
    y_r = ops.ssm_state_update(s_r, *args, backend="torch", **kwargs)

    x = torch.randn(4, 512, h * p, device="cuda", dtype=torch.bfloat16)
    z = torch.randn_like(x)
    weight = torch.randn(h * p, device="cuda")
    norm_t = ops.gated_rms_norm(x, z, weight, 1e-5, group_size=h * p // g, backend="triton")
    norm_r = ops.gated_rms_norm(x, z, weight, 1e-5, group_size=h * p // g, backend="torch")

    xc = torch.randn(4, h * p + 2 * g * n, 512, device="cuda", dtype=torch.bfloat16)
    wc, bc = torch.randn(xc.shape[1], 4, device="cuda"), torch.randn(xc.shape[1], device="cuda")
    seq_idx = _documents(4, 512)
    conv_t = ops.causal_conv1d(xc, wc, bc, "silu", seq_idx=seq_idx, backend="triton")
    conv_r = ops.causal_conv1d(xc, wc, bc, "silu", seq_idx=seq_idx, backend="torch")
    return {
        "ssm_state_update": {"y": _rel(y_t, y_r), "state": _rel(s_t, s_r)},
        "gated_rms_norm": _rel(norm_t, norm_r),
        "causal_conv1d": _rel(conv_t, conv_r),
    }


def _time(fn: Callable[[], object], iters: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):  # includes Triton autotuning on the first call
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return {"median_ms": times[len(times) // 2], "min_ms": times[0], "max_ms": times[-1]}


def time_scan(iters: int, warmup: int, with_reference: bool) -> dict:
    b, l, h, p, g, n, chunk = 4, 4096, 32, 64, 8, 128, 128
    leaves = _scan_leaves(b, l, h, p, g, n, seed=1)
    leaves.pop("initial_states")
    leaves.pop("z")
    bare = load_mamba_ssm_kernels().mamba_chunk_scan_combined

    def ours(backend: str) -> Callable[..., torch.Tensor]:
        def run(x, dt, A, B, C, D, dt_bias):
            return ops.ssd_chunk_scan(x, dt, A, B, C, chunk, D=D, dt_bias=dt_bias, dt_softplus=True, backend=backend)
        return run

    def theirs(x, dt, A, B, C, D, dt_bias):
        return bare(x, dt, A, B, C, chunk, D=D, dt_bias=dt_bias, dt_softplus=True)

    candidates = {"megatron_hybrid_triton": ours("triton"), "mamba_ssm_bare": theirs}
    if with_reference:
        candidates["megatron_hybrid_torch_reference"] = ours("torch")
    names = ["x", "dt", "A", "B", "C", "D", "dt_bias"]
    grad_out = torch.randn(b, l, h, p, device="cuda", dtype=torch.bfloat16)
    result = {"shape": {"b": b, "l": l, "h": h, "p": p, "g": g, "n": n, "chunk": chunk, "dtype": "bfloat16"}}
    for label, fn in candidates.items():
        args = [leaves[k] for k in names]
        grad_args = [a.clone().requires_grad_() for a in args]

        def forward(fn=fn, args=args):
            with torch.no_grad():
                return fn(*args)

        def forward_backward(fn=fn, grad_args=grad_args):
            y = fn(*grad_args)
            y.backward(grad_out)
            for a in grad_args:
                a.grad = None

        torch.cuda.reset_peak_memory_stats()
        result[label] = {
            "forward": _time(forward, iters, warmup),
            "forward_backward": _time(forward_backward, iters, warmup),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        }
    ours_fb = result["megatron_hybrid_triton"]["forward_backward"]["median_ms"]
    bare_fb = result["mamba_ssm_bare"]["forward_backward"]["median_ms"]
    result["dispatch_overhead_fwd_bwd_pct"] = 100.0 * (ours_fb - bare_fb) / bare_fb
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--skip-reference-timing", action="store_true",
                        help="do not time the pure-PyTorch reference on the GPU")
    args = parser.parse_args()

    report: dict = {
        "torch": torch.__version__,
        "triton": _version("triton"),
        "mamba_ssm": _version("mamba_ssm"),
        "causal_conv1d": _version("causal_conv1d"),
        "cuda_available": torch.cuda.is_available(),
    }
    if not torch.cuda.is_available():
        report["error"] = "no CUDA device"
        print(json.dumps(report, indent=2))
        return 1
    report["device"] = torch.cuda.get_device_name()
    try:
        report["kernels_how"] = load_mamba_ssm_kernels().how
    except KernelUnavailableError as exc:
        report["error"] = str(exc)
        report["kernel_backend_info"] = ops.kernel_backend_info()
        print(json.dumps(report, indent=2))
        return 1
    report["kernel_backend_info"] = ops.kernel_backend_info()
    report["parity_bf16"] = {"ssd_chunk_scan": check_scan_parity(), **check_small_ops_parity()}
    report["timing"] = time_scan(args.iters, args.warmup, not args.skip_reference_timing)
    scan = report["parity_bf16"]["ssd_chunk_scan"]
    report["parity_ok"] = bool(
        scan["y"]["fro_rel"] < 2e-2 and scan["final_states"]["fro_rel"] < 2e-2
        and all(v["fro_rel"] < 5e-2 for v in scan["grads"].values())
    )
    print(json.dumps(report, indent=2))
    return 0 if report["parity_ok"] else 2


if __name__ == "__main__":
    sys.exit(main())
