"""GPU benchmark of whole layers and the whole model (run by hand on an H100/H200; not a test).

0. Triton conv1d alone (``--parts conv``): our Triton causal conv at the layer shape; sweeps the forward tiles and
   the backward's (both passes' tiles, rows per program) by GPU time, keeps the fastest settings in
   ``ops.triton_conv1d`` for the rest of the run and prints them (``chosen``) to copy into the module; bf16
   correctness against the reference; the old float32 PyTorch fallback for scale.
0b. SSD scan alone (``--parts ssd``): our Triton scan (``ops.triton_ssd``) against mamba_ssm's, correctness against
   the float64 reference and speed at the 800M layer shape, and a sweep of our kernels' launch settings.
1. Breakdown (``--parts breakdown``): torch.profiler (CUDA activity) over a few MambaLayer forward+backward passes at
   the 800M layer shape and over the bare ``mamba_chunk_scan_combined`` on the same shapes: top kernels by total time
   (name, calls, ms per iteration), the kernel sum, per-category sums, and the GPU idle time of the layer.
1b. Host overhead (``--parts host``): the CPU time to issue the layer's forward+backward and the bare scan call (GPU
   held by a spin), their wall times, and the layer's host-side hot spots (cProfile and torch.profiler CPU ops).
2. Mamba layer overhead (``--parts layer``): forward+backward of one full MambaLayer (norm, in_proj, conv, SSD, gated
   norm, out_proj, residual) at the 800M layer shape (b4, L4096, hidden 1024, 32 heads x 64, 8 groups, d_state 128,
   chunk 128) in bf16, with our scan and with mamba_ssm's, against the bare scan calls on the same shapes.
3. Model parity: the 800M-shaped stack (few layers) with the fast path against the pure-torch reference, bf16 autocast,
   forward loss and parameter gradients (relative errors).
4. Memory (``--parts memory``): bytes saved for backward per layer type with the real kernels at b1 x 4096 (the
   counter of ``benchmarks/activation_memory.py``) and the allocated memory after forward / peaks of one step.
5. Training-step throughput of the 800M configuration (the peers' shape: vocab 256000 untied, pattern of 48 layers):
   forward + backward + fused AdamW under bf16 autocast with fp32 parameters, tokens/s, model TFLOP/s and MFU.
   ``--parts train_breakdown``: the step's kernels (top 30 and per category) and the GPU's idle time, at batch 4.
6. CUDA graphs (``--parts graphs``): the layer's forward+backward replayed from CUDA graphs
   (``training.cuda_graphs``, what ``--enable-cuda-graph`` does in training) against the eager layer, the bare
   mamba_ssm scan called as its users call it and the bare scan graphed the same way (both kernel-bound: the layer's
   kernels against the scan's); the 800M training step with graphed layers against the eager step (``--batches``).

Parts run in the order given to ``--parts``; each is wrapped so that a failure prints and the next part still runs.
Prints JSON and writes it to $OUT/gpu_model.json when $OUT is set. Needs mamba_ssm's Triton kernels on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch

# The repository root, last on the path, so that `python benchmarks/gpu_model.py --help` works without PYTHONPATH
# (an explicit PYTHONPATH still wins).
sys.path.append(str(Path(__file__).resolve().parents[1]))

from megatron_hybrid.config import HybridConfig  # noqa: E402
from megatron_hybrid.layers.hybrid_layers import MambaLayer  # noqa: E402
from megatron_hybrid.models.mamba_model import MambaModel  # noqa: E402
from megatron_hybrid.ops._common import segment_ids  # noqa: E402
from megatron_hybrid.ops.backend import SSD_KERNEL_ENV_VAR  # noqa: E402
from megatron_hybrid.ops.mamba_ssm_loader import load_mamba_ssm_kernels  # noqa: E402
from megatron_hybrid.ops.ssd import ssd_chunk_scan_ref  # noqa: E402
from megatron_hybrid.ops.triton_ssd import ssd_chunk_scan_triton  # noqa: E402
from megatron_hybrid.parallel.state import ParallelGroups  # noqa: E402
from megatron_hybrid.training.cuda_graphs import LayerGraphs, enable_layer_graphs  # noqa: E402

PATTERN_800M = "M-M-M--M-*M-M-M-M--*M-M-M-M-*M--M-M-M-*M-M--M-M-"
RESULTS: dict = {}


def config_800m(**overrides) -> HybridConfig:
    fields = dict(num_layers=48, hidden_size=1024, vocab_size=256000, hybrid_override_pattern=PATTERN_800M,
                  num_attention_heads=16, num_query_groups=8, kv_channels=64, ffn_hidden_size=4096,
                  mamba_state_dim=128, mamba_head_dim=64, mamba_num_groups=8, mamba_chunk_size=128,
                  untie_embeddings_and_output_weights=True)
    fields.update(overrides)
    return HybridConfig(**fields)


def timed(fn, warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds of ``fn`` measured with CUDA events."""
    for _ in range(warmup):
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
    return sorted(times)[len(times) // 2]


def part(name, print_chars: int = 1500):
    def wrap(fn):
        t0 = time.time()
        try:
            RESULTS[name] = fn()
        except Exception as exc:  # keep going: one broken part must not hide the others
            RESULTS[name] = {"error": repr(exc)[:400], "traceback": traceback.format_exc()[-1500:]}
        RESULTS[name + "_wall_s"] = round(time.time() - t0, 1)
        print(name, json.dumps(RESULTS[name])[:print_chars], flush=True)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return fn
    return wrap


def mamba_layer_overhead(batch: int = 4, seqlen: int = 4096) -> dict:
    torch.manual_seed(0)
    config = config_800m(num_layers=1, hybrid_override_pattern="M", params_dtype=torch.bfloat16)
    layer = MambaLayer(config, ParallelGroups.single()).cuda()
    hidden = torch.randn(seqlen, batch, config.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn_like(hidden)

    def layer_fwd():
        return layer(hidden)

    def layer_fwd_bwd():
        layer(hidden).backward(grad_out)

    kernels = load_mamba_ssm_kernels()
    h, p, g, n = config.mamba_num_heads, config.mamba_head_dim, config.mamba_num_groups, config.mamba_state_dim
    x = torch.randn(batch, seqlen, h, p, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dt = torch.randn(batch, seqlen, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    A = (-torch.rand(h, device="cuda") * 15 - 1).requires_grad_()
    B = torch.randn(batch, seqlen, g, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    C = torch.randn(batch, seqlen, g, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    D = torch.ones(h, device="cuda", requires_grad=True)
    dt_bias = torch.zeros(h, device="cuda", requires_grad=True)

    def scan():
        return kernels.mamba_chunk_scan_combined(x, dt, A, B, C, 128, D=D, dt_bias=dt_bias, dt_softplus=True)

    def scan_fwd_bwd():
        scan().backward(torch.ones_like(x))

    def own_scan():
        return ssd_chunk_scan_triton(x, dt, A, B, C, 128, D=D, dt_bias=dt_bias, dt_softplus=True)[0]

    def own_scan_fwd_bwd():
        own_scan().backward(torch.ones_like(x))

    out = {}
    # The layer as it trains (the fused span, ops.triton_mamba_span), then composed of separate ops with our scan
    # and with mamba_ssm's.
    variants = {"fused span": (True, "own"), "own scan": (False, "own"), "mamba_ssm scan": (False, "mamba_ssm")}
    for name, (fused, kernel) in variants.items():
        layer.mixer.fused_span = fused
        os.environ[SSD_KERNEL_ENV_VAR] = kernel
        out[f"layer_fwd_ms[{name}]"] = timed(layer_fwd)
        out[f"layer_fwd_bwd_ms[{name}]"] = timed(layer_fwd_bwd)
    layer.mixer.fused_span = True
    os.environ.pop(SSD_KERNEL_ENV_VAR)
    out["bare_scan_fwd_ms"] = timed(scan)
    out["bare_scan_fwd_bwd_ms"] = timed(scan_fwd_bwd)
    out["own_bare_scan_fwd_ms"] = timed(own_scan)
    out["own_bare_scan_fwd_bwd_ms"] = timed(own_scan_fwd_bwd)
    for name in variants:
        out[f"overhead_fwd_bwd_pct[{name} layer vs mamba_ssm bare scan]"] = round(
            100 * (out[f"layer_fwd_bwd_ms[{name}]"] / out["bare_scan_fwd_bwd_ms"] - 1), 1)
    out["overhead_fwd_bwd_pct[fused span layer vs own bare scan]"] = round(
        100 * (out["layer_fwd_bwd_ms[fused span]"] / out["own_bare_scan_fwd_bwd_ms"] - 1), 1)
    # Where the rest goes: the two projections alone (their FLOPs are fixed by the model shape).
    w_in = layer.mixer.in_proj.weight
    w_out = layer.mixer.out_proj.weight
    tokens = torch.randn(batch * seqlen, config.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    inner = torch.randn(batch * seqlen, w_out.shape[1], device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def projections_fwd_bwd():
        a = tokens @ w_in.t()
        b = inner @ w_out.t()
        torch.autograd.backward([a, b], [torch.ones_like(a), torch.ones_like(b)])

    out["projections_fwd_bwd_ms"] = timed(projections_fwd_bwd)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        layer_fwd_bwd()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18)
    out["profile_top"] = table[-3500:]
    return out


def model_parity() -> dict:
    """bf16 autocast, fast path vs pure-torch path, both also against a float32 pure-torch run ("truth").

    A bf16 run differs from float32 by its own rounding whatever the kernels, so the fast path's distance to the
    float32 truth is printed beside the bf16 reference's own distance: equal distances mean the kernels add no error.
    """
    torch.manual_seed(0)
    pattern = "M-*M-M"
    config = config_800m(num_layers=len(pattern), hybrid_override_pattern=pattern, vocab_size=32000)
    model = MambaModel(config).cuda()
    ids = torch.randint(0, config.vocab_size, (2, 1000), device="cuda")
    results = {}
    mixers = [m for m in model.modules() if hasattr(m, "fused_span")]
    for name, backend, dtype in (("triton", "triton", torch.bfloat16), ("triton_composed", "triton", torch.bfloat16),
                                 ("torch", "torch", torch.bfloat16), ("fp32", "torch", None)):
        os.environ["MEGATRON_HYBRID_KERNELS"] = backend
        for mixer in mixers:  # the fused span (ops.triton_mamba_span), or the same kernels as separate ops
            mixer.fused_span = name != "triton_composed"
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype is not None):
            loss = model(ids, labels=ids).mean()
        loss.backward()
        results[name] = (loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()})
    os.environ.pop("MEGATRON_HYBRID_KERNELS")

    def compare(a: str, b: str) -> dict:
        (loss_a, grads_a), (loss_b, grads_b) = results[a], results[b]
        errors = {n: ((grads_a[n] - grads_b[n]).norm() / grads_b[n].norm().clamp_min(1e-30)).item() for n in grads_b}
        worst = max(errors, key=errors.get)
        return {"loss_rel_err": abs(loss_a.item() - loss_b.item()) / abs(loss_b.item()),
                "grad_rel_err_max": errors[worst], "grad_rel_err_worst_param": worst,
                "grad_rel_err_median": sorted(errors.values())[len(errors) // 2]}

    return {"loss_fast": results["triton"][0].item(), "loss_ref": results["torch"][0].item(),
            "loss_fp32": results["fp32"][0].item(), "fast_vs_bf16_ref": compare("triton", "torch"),
            "fast_vs_fp32": compare("triton", "fp32"), "composed_fast_vs_fp32": compare("triton_composed", "fp32"),
            "bf16_ref_vs_fp32": compare("torch", "fp32")}


def model_flops_per_token(config: HybridConfig, seqlen: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters + attention scores + SSD scan (forward x 3)."""
    with torch.device("meta"):
        model = MambaModel(config)
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embedding" not in n)
    pattern = config.layer_pattern
    attention = pattern.count("*") * 2 * 2 * seqlen * config.num_attention_heads * config.kv_channels / 2
    h, p, n, g, T = (config.mamba_num_heads, config.mamba_head_dim, config.mamba_state_dim, config.mamba_num_groups,
                     config.mamba_chunk_size)
    ssd = pattern.count("M") * 2 * (g * T * n + h * T * p + 2 * h * p * n)
    return 6 * matmul_params + 3 * (attention + ssd)


def _train_step_800m(batch: int, seqlen: int):
    """The 800M model and one training step of it (bf16 autocast, fp32 parameters, fused AdamW) as a closure."""
    torch.manual_seed(0)
    config = config_800m()
    model = MambaModel(config).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, config.vocab_size, (batch, seqlen), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return config, model, step


def train_step_breakdown(batch: int = 4, seqlen: int = 4096, iters: int = 2) -> dict:
    """Where an 800M training step's GPU time goes: torch.profiler kernel table (top 30, per category) over ``iters``
    steps, and the GPU idle time (wall - kernels)."""
    _, _, step = _train_step_800m(batch, seqlen)
    wall = timed(step, warmup=2, iters=3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    out = {"wall_ms_per_step": round(wall, 1), **_kernel_table(prof, iters, top=30)}
    out["gpu_idle_ms_per_step"] = round(wall - out["kernels_total_ms_per_iter"], 1)
    print(f"--- 800M step b{batch}: wall {wall:.1f} ms, kernels {out['kernels_total_ms_per_iter']} ms", flush=True)
    for cat, ms in out["per_category_ms_per_iter"].items():
        print(f"    {ms:9.3f} ms  {cat}", flush=True)
    for row in out["top_kernels"]:
        print(f"    {row['ms_per_iter']:9.3f} ms  x{row['calls_per_iter']:<6} {row['name']}", flush=True)
    return out


def train_step_throughput(batch: int, seqlen: int = 4096, peak_tflops: float = 989.0,
                          cuda_graph: bool = False) -> dict:
    config, model, step = _train_step_800m(batch, seqlen)
    if cuda_graph:
        enable_layer_graphs(model)
    ms = timed(step, warmup=2, iters=5)
    tokens_per_s = batch * seqlen / ms * 1e3
    tflops = model_flops_per_token(config, seqlen) * tokens_per_s / 1e12
    return {"batch": batch, "seq": seqlen, "ms_per_step": round(ms, 1), "tokens_per_s": round(tokens_per_s),
            "model_tflops": round(tflops, 1), "mfu_vs_dense_bf16_peak": round(tflops / peak_tflops, 3),
            "peak_GB": round(torch.cuda.max_memory_allocated() / 1e9, 1),
            "params": sum(p.numel() for p in model.parameters())}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def gpu_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    """Mean GPU milliseconds of ``fn`` without its CPU launch overhead: the calls are queued behind a ~50 ms GPU spin,
    so the events time back-to-back kernels (the Triton launcher's ~20-50 us of Python per call would otherwise
    dominate a 0.1 ms kernel, and does not cost that inside a layer whose GPU queue is full)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(100_000_000)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / iters, 4)


def _ssd_inputs(batch: int, seqlen: int, h: int = 32, p: int = 64, g: int = 8, n: int = 128, seed: int = 0):
    """The mixer's scan inputs at init-like scales: x, B, C strided views into one conv output, dt raw (bf16) with the
    mixer's dt_bias init (dt in [1e-3, 0.1]), A in -[1, 16], D = 1."""
    torch.manual_seed(seed)
    xbc = torch.randn(batch, seqlen, h * p + 2 * g * n, device="cuda", dtype=torch.bfloat16)
    dt = (torch.randn(batch, seqlen, h, device="cuda") * 0.5).to(torch.bfloat16)
    A = -(torch.rand(h, device="cuda") * 15 + 1)
    dt_init = torch.exp(torch.rand(h, device="cuda") * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    dt_bias = dt_init + torch.log(-torch.expm1(-dt_init))
    return [xbc, dt, A, torch.ones(h, device="cuda"), dt_bias], (h, p, g, n)


def _ssd_call(kernel: str, leaves, dims, seq_idx=None, chunk: int = 128):
    xbc, dt, A, D, dt_bias = leaves
    h, p, g, n = dims
    x = xbc[..., :h * p].unflatten(-1, (h, p))
    B = xbc[..., h * p:h * p + g * n].unflatten(-1, (g, n))
    C = xbc[..., h * p + g * n:].unflatten(-1, (g, n))
    if kernel == "reference":
        return ssd_chunk_scan_ref(x.double(), dt.double(), A.double(), B.double(), C.double(), chunk, D=D.double(),
                                  dt_bias=dt_bias.double(), dt_softplus=True, seq_idx=seq_idx)
    segments = segment_ids(seq_idx) if seq_idx is not None else None
    if kernel == "own":
        return ssd_chunk_scan_triton(x, dt, A, B, C, chunk, D=D, dt_bias=dt_bias, dt_softplus=True,
                                     segments=segments)[0]
    return load_mamba_ssm_kernels().mamba_chunk_scan_combined(
        x, dt, A, B, C, chunk, D=D, dt_bias=dt_bias, dt_softplus=True,
        seq_idx=segments.int() if segments is not None else None)


SSD_SWEEP = [(block, warps, stages) for block in (64, 32) for warps in (4, 8) for stages in (1, 2, 3)]


# Our scan's kernels by their key in ops.triton_ssd.WARPS / STAGES, as the profiler names them.
SSD_KERNEL_NAMES = {"state": "_chunk_state_fwd", "scan": "_chunk_scan_fwd", "dstate": "_chunk_dstate_bwd",
                    "dx_db": "_chunk_scan_bwd_dx_db", "dc": "_chunk_scan_bwd_dc"}


def ssd_scan(batch: int = 4, seqlen: int = 4096, sweep: bool = False) -> dict:
    """Our Triton scan (``ops.triton_ssd``) against mamba_ssm's ``mamba_chunk_scan_combined``.

    Correctness: bf16 output and every input gradient (x, B, C through their shared buffer; dt, A, D, dt_bias) of
    both against the float64 reference on the same inputs, without and with documents. Speed at the 800M layer shape:
    wall time of a call (CUDA events, launches included) and GPU time (``gpu_ms``), forward and forward+backward,
    profiler kernel tables. With ``sweep``: (token block, warps, stages) of our kernels by kernel time; the block of
    the fastest total and, at that block, each kernel's fastest (warps, stages) are kept for the rest of the run and
    printed (``chosen``, to copy into ``ops.triton_ssd``).
    """
    from megatron_hybrid.ops import triton_ssd

    out: dict = {"correctness": {}}
    for seqlen_c, documents in ((1000, False), (1000, True), (4096, False)):
        leaves, dims = _ssd_inputs(2, seqlen_c)
        seq_idx = None
        if documents:
            seq_idx = torch.zeros(2, seqlen_c, dtype=torch.long, device="cuda")
            seq_idx[0, 300:] = 1
            seq_idx[0, 301:] = 2  # a one-token document
            seq_idx[1, 700:] = 5
        dy = torch.randn(2, seqlen_c, dims[0], dims[1], device="cuda")
        results = {}
        for kernel in ("reference", "own", "mamba_ssm"):
            inputs = [t.detach().clone().requires_grad_() for t in leaves]
            y = _ssd_call(kernel, inputs, dims, seq_idx)
            grads = torch.autograd.grad((y.double() * dy.double()).sum(), inputs)
            results[kernel] = [y, *grads]
        names = ("y", "dxbc", "ddt", "dA", "dD", "ddt_bias")
        out["correctness"][f"b2_L{seqlen_c}{'_documents' if documents else ''}"] = {
            f"{kernel}_vs_float64": {name: round(((a.double() - r.double()).norm() / r.double().norm()).item(), 6)
                                     for name, a, r in zip(names, results[kernel], results["reference"])}
            for kernel in ("own", "mamba_ssm")}

    leaves, dims = _ssd_inputs(batch, seqlen)
    for t in leaves:
        t.requires_grad_()
    dy = torch.randn(batch, seqlen, dims[0], dims[1], device="cuda", dtype=torch.bfloat16)
    for kernel in ("own", "mamba_ssm"):
        def fwd(kernel=kernel):
            return _ssd_call(kernel, leaves, dims)

        def fwd_bwd(kernel=kernel):  # gradients returned, not accumulated into .grad (no extra adds timed)
            torch.autograd.grad(_ssd_call(kernel, leaves, dims), leaves, dy)

        row = {"fwd_wall_ms": timed(fwd, iters=20), "fwd_bwd_wall_ms": timed(fwd_bwd, iters=20),
               "fwd_gpu_ms": gpu_ms(fwd), "fwd_bwd_gpu_ms": gpu_ms(fwd_bwd)}
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fwd_bwd()
            torch.cuda.synchronize()
        row["kernels"] = _kernel_table(prof, 5, top=14)
        out[kernel] = row

    if sweep:
        out.update(_ssd_sweep(triton_ssd, lambda: torch.autograd.grad(_ssd_call("own", leaves, dims), leaves, dy)))
    return out


def _ssd_sweep(triton_ssd, own_fwd_bwd) -> dict:
    sweep = []
    for block, warps, stages in SSD_SWEEP:
        triton_ssd.BLOCK_T = block
        for key in ("state", "scan", "dstate", "dx_db", "dc"):
            triton_ssd.WARPS[key] = warps
        for key in triton_ssd.STAGES:
            triton_ssd.STAGES[key] = stages
        try:
            ms = gpu_ms(own_fwd_bwd, iters=10)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    own_fwd_bwd()
                torch.cuda.synchronize()
            table = _kernel_table(prof, 3, top=12)
            sweep.append({"block": block, "warps": warps, "stages": stages, "fwd_bwd_gpu_ms": ms,
                          "kernels": {r["name"][:26]: r["ms_per_iter"] for r in table["top_kernels"]}})
        except Exception as exc:  # a configuration that does not compile (registers, shared memory)
            sweep.append({"block": block, "warps": warps, "stages": stages, "error": repr(exc)[:200]})
        print("ssd sweep", sweep[-1], flush=True)
    out = {"sweep": sweep}
    timed_rows = [r for r in sweep if "fwd_bwd_gpu_ms" in r]
    if timed_rows:
        block = min(timed_rows, key=lambda r: r["fwd_bwd_gpu_ms"])["block"]
        triton_ssd.BLOCK_T = block
        chosen: dict = {"block": block}
        for key, name in SSD_KERNEL_NAMES.items():
            rows = [r for r in timed_rows if r["block"] == block and name[:26] in r["kernels"]]
            best = min(rows, key=lambda r: r["kernels"][name[:26]])
            triton_ssd.WARPS[key], triton_ssd.STAGES[key] = best["warps"], best["stages"]
            chosen[key] = {"warps": best["warps"], "stages": best["stages"], "ms": best["kernels"][name[:26]]}
        out["chosen"] = chosen
    return out


CONV_FWD_CONFIGS = ((32, 128, 4), (16, 128, 4), (64, 64, 4), (32, 64, 4), (64, 128, 8), (16, 256, 4))
# (BLOCK_L, BLOCK_D, warps) of the backward's pass 1: 8 fp32 elements per thread compile without spills on sm_90
# (ptxas: 128-136 registers); (32, 64, 4) is 16 per thread.
CONV_BWD_CONFIGS = ((16, 64, 4), (32, 32, 4), (16, 128, 8), (16, 32, 2), (32, 64, 8), (32, 64, 4))
CONV_DX_CONFIGS = ((32, 128, 4), (16, 128, 4), (64, 64, 4), (32, 64, 4), (64, 128, 8))
CONV_ROWS_PER_PROGRAM = (128, 256, 512, 1024)


def triton_conv(batch: int = 4, seqlen: int = 4096) -> dict:
    """The Triton causal conv1d alone at the layer shape, a sweep of its kernels' configurations, and correctness.

    Layer shape: xBC = channels [d_inner + 2 * ngroups * d_state] = 4096 of in_proj's [b, L, 6176] bf16 output
    (a strided view, read in place), float32 weight [4096, 4] and bias (autocast training), SiLU. Sweeps the forward
    tiles, then the backward's (pass-1 tiles, pass-2 tiles, rows per program) by GPU time (``gpu_ms``), and LEAVES
    THE FASTEST SETTINGS in the module for the rest of this run (the ``layer``, ``breakdown`` and ``train`` parts then
    use them); ``chosen`` says which, to copy into ``ops/triton_conv1d.py``. Then checks bf16 results against the
    reference (float32 math on the same bf16 inputs), with and without documents, and times the previous float32
    PyTorch fallback.
    """
    from megatron_hybrid.ops import causal_conv1d_ref
    from megatron_hybrid.ops import triton_conv1d as tc

    torch.manual_seed(0)
    config = config_800m()
    d = config.mamba_d_inner + 2 * config.mamba_num_groups * config.mamba_state_dim
    width = 2 * config.mamba_d_inner + 2 * config.mamba_num_groups * config.mamba_state_dim + config.mamba_num_heads
    zxbcdt = torch.randn(batch, seqlen, width, device="cuda", dtype=torch.bfloat16)
    x = zxbcdt[..., config.mamba_d_inner:config.mamba_d_inner + d].detach().requires_grad_()
    weight = (torch.randn(d, config.mamba_conv_kernel, device="cuda") * 0.5).requires_grad_()
    bias = torch.randn(d, device="cuda").requires_grad_()
    grad = torch.randn(batch, seqlen, d, device="cuda", dtype=torch.bfloat16)
    seq_idx = torch.zeros(batch, seqlen, dtype=torch.int32, device="cuda")
    seq_idx[0, 1000:] = 1
    seq_idx[0, 2100:] = 2
    if batch > 1:
        seq_idx[1, 128:] = 1
    names = ("FWD_BLOCK_L", "FWD_BLOCK_D", "FWD_WARPS", "BWD_BLOCK_L", "BWD_BLOCK_D", "BWD_WARPS",
             "BWD_ROWS_PER_PROGRAM", "DX_BLOCK_L", "DX_BLOCK_D", "DX_WARPS", "DPRE_DTYPE")
    defaults = {n: getattr(tc, n) for n in names}

    def setm(**values):
        for n, v in values.items():
            setattr(tc, n, v)

    def triton_fwd(seq=None):
        return tc.causal_conv1d_channel_last_triton(x, weight, bias, "silu", seq_idx=seq)

    def torch_fwd(seq=None):  # the previous GPU fallback: [b, d, l] view, float32 F.conv1d, SiLU, cast back
        return causal_conv1d_ref(x.transpose(1, 2), weight, bias, "silu", seq_idx=seq).transpose(1, 2)

    def fwd_bwd(fn, seq=None):
        def run():
            torch.autograd.backward(fn(seq), grad)
        return run

    def bwd_only():  # the backward's kernels and the partials' sum, without autograd
        tc._conv_bwd(x, weight, bias, None, True, grad)

    def grads(fn, seq=None):
        for t in (x, weight, bias):
            t.grad = None
        out = fn(seq)
        out.backward(grad)
        return out.detach(), x.grad.clone(), weight.grad.clone(), bias.grad.clone()

    def sweep(label: str, configs, apply, fn) -> tuple:
        """Times ``fn`` under each config (a failing config is recorded, not fatal); returns the fastest config."""
        best = None
        for cfg in configs:
            try:
                apply(cfg)
                ms = gpu_ms(fn)
            except Exception as exc:  # e.g. out of resources for one tile shape
                res["sweep_ms"][f"{label}{cfg}"] = repr(exc)[:200]
                continue
            res["sweep_ms"][f"{label}{cfg}"] = ms
            if best is None or ms < best[1]:
                best = (cfg, ms)
        if best is None:
            raise RuntimeError(f"every {label} configuration failed")
        apply(best[0])
        return best

    res: dict = {"shape": [batch, seqlen, d], "x_strides": list(x.stride()), "defaults": {
        n: str(v) for n, v in defaults.items()}, "sweep_ms": {}}
    # Ideal: read x, write out (fwd); read x and dout, write dx (bwd); the two passes add a dpre write + read (in x's
    # dtype by default, float32 for the exact path).
    res["bytes_fwd_GB"] = round(2 * x.numel() * 2 / 1e9, 3)
    res["bytes_bwd_single_pass_GB"] = round(3 * x.numel() * 2 / 1e9, 3)
    res["bytes_bwd_two_pass_GB"] = round(5 * 2 * x.numel() / 1e9, 3)
    res["bytes_bwd_two_pass_fp32_dpre_GB"] = round((3 * 2 + 2 * 4) * x.numel() / 1e9, 3)
    try:
        fwd_best = sweep("fwd", CONV_FWD_CONFIGS,
                         lambda c: setm(FWD_BLOCK_L=c[0], FWD_BLOCK_D=c[1], FWD_WARPS=c[2]), lambda: triton_fwd())
        sweep("bwd_p1", CONV_BWD_CONFIGS,
              lambda c: setm(BWD_BLOCK_L=c[0], BWD_BLOCK_D=c[1], BWD_WARPS=c[2]), bwd_only)
        sweep("bwd_p2", CONV_DX_CONFIGS,
              lambda c: setm(DX_BLOCK_L=c[0], DX_BLOCK_D=c[1], DX_WARPS=c[2]), bwd_only)
        rows = sweep("bwd_rows", CONV_ROWS_PER_PROGRAM, lambda r: setm(BWD_ROWS_PER_PROGRAM=r), bwd_only)
        setm(DPRE_DTYPE=torch.float32)  # informational: the exact dpre buffer, twice the bytes of the default
        res["float32_dpre_bwd_ms"] = gpu_ms(bwd_only)
        setm(DPRE_DTYPE=defaults["DPRE_DTYPE"])
        res["best_bwd_ms"] = rows[1]
        res["best_fwd_ms"] = fwd_best[1]
        for name, seq in (("plain", None), ("documents", seq_idx)):  # correctness at the chosen settings
            got, want = grads(triton_fwd, seq), grads(torch_fwd, seq)
            res[f"rel_err_{name}"] = {k: _rel_err(g, w)
                                      for k, g, w in zip(("out", "dx", "dweight", "dbias"), got, want)}
    except Exception:
        setm(**defaults)  # a broken sweep must not leave a half-set configuration for the later parts
        raise
    res["chosen"] = {n: str(getattr(tc, n)) for n in names}
    res["triton_fwd_gpu_ms"] = gpu_ms(lambda: triton_fwd())
    res["triton_bwd_gpu_ms"] = gpu_ms(bwd_only)
    res["triton_fwd_bwd_gpu_ms"] = gpu_ms(fwd_bwd(triton_fwd))
    res["triton_fwd_bwd_documents_gpu_ms"] = gpu_ms(fwd_bwd(triton_fwd, seq_idx))
    res["triton_fwd_ms_events"] = timed(lambda: triton_fwd())  # with launch overhead, as measured before
    res["triton_fwd_bwd_ms_events"] = timed(fwd_bwd(triton_fwd))
    res["torch_fwd_ms"] = timed(lambda: torch_fwd())
    res["torch_fwd_bwd_ms"] = timed(fwd_bwd(torch_fwd))
    return res


def _kernel_table(prof, iters: int, top: int) -> dict:
    """Device kernels of a profile: the ``top`` by total time (name, calls per iteration, ms per iteration), the sum
    over all kernels, and sums per coarse category (from kernel names) to see what the time beyond the scan is."""
    rows = []
    for avg in prof.key_averages():
        total_us = 0.0
        for attr in ("self_device_time_total", "self_cuda_time_total", "device_time_total", "cuda_time_total"):
            value = getattr(avg, attr, None)
            if value:
                total_us = float(value)
                break
        if total_us > 0:
            rows.append((avg.key, avg.count, total_us))
    rows.sort(key=lambda r: -r[2])
    categories = (
        ("ssd scan", ("_chunk_", "_state_passing", "_bmm_chunk", "chunk_scan", "chunk_state", "_dt_bwd")),
        ("conv1d (ours)", ("_conv1d_",)),
        ("gated/rms norm", ("_layer_norm", "_group_norm", "rms", "_rms_")),
        ("matmul", ("gemm", "sm90", "nvjet", "cutlass", "xmma", "matmul", "_mm_")),
        ("attention", ("flash", "attention", "fmha", "_attn")),
        ("cross entropy / softmax", ("softmax", "cross_entropy", "nll_loss", "log_softmax")),
        ("optimizer", ("adam", "Adam")),
        ("cat / copy", ("CatArray", "copy", "Copy")),
        ("reduce (partial sums etc.)", ("reduce", "Reduce")),
    )
    per_category: dict = {}
    for name, _, us in rows:
        label = next((c for c, keys in categories if any(k in name for k in keys)), "other elementwise")
        per_category[label] = per_category.get(label, 0.0) + us / 1e3 / iters
    return {
        "kernels_total_ms_per_iter": round(sum(r[2] for r in rows) / 1e3 / iters, 4),
        "per_category_ms_per_iter": {k: round(v, 4) for k, v in sorted(per_category.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": name[:90], "calls_per_iter": round(calls / iters, 2),
                         "ms_per_iter": round(us / 1e3 / iters, 4)} for name, calls, us in rows[:top]],
    }


def _layer_and_bare_scan(batch: int, seqlen: int):
    """The 800M-shaped MambaLayer's forward+backward and the bare ``mamba_chunk_scan_combined`` forward+backward on
    the layer's scan shapes (bf16) as two closures, then the layer and its input."""
    torch.manual_seed(0)
    config = config_800m(num_layers=1, hybrid_override_pattern="M", params_dtype=torch.bfloat16)
    layer = MambaLayer(config, ParallelGroups.single()).cuda()
    hidden = torch.randn(seqlen, batch, config.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn_like(hidden)

    def layer_fwd_bwd():
        layer(hidden).backward(grad_out)

    scan, leaves = _bare_scan(batch, seqlen, config)
    dy = torch.randn_like(leaves[0])

    def scan_fwd_bwd():
        scan(*leaves).backward(dy)

    return layer_fwd_bwd, scan_fwd_bwd, layer, hidden


def _bare_scan(batch: int, seqlen: int, config: HybridConfig):
    """mamba_ssm's ``mamba_chunk_scan_combined`` on the layer's scan shapes as a function of its differentiable
    inputs ``(x, dt, A, B, C, D, dt_bias)``, and those inputs (bf16 leaves, A float32)."""
    kernels = load_mamba_ssm_kernels()
    h, p, g, n = config.mamba_num_heads, config.mamba_head_dim, config.mamba_num_groups, config.mamba_state_dim
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    leaves = (torch.randn(batch, seqlen, h, p, **bf16), torch.randn(batch, seqlen, h, **bf16),
              -torch.rand(h, device="cuda") * 15 - 1, torch.randn(batch, seqlen, g, n, **bf16),
              torch.randn(batch, seqlen, g, n, **bf16), torch.ones(h, **bf16), torch.zeros(h, **bf16))

    def scan(x, dt, A, B, C, D, dt_bias):
        return kernels.mamba_chunk_scan_combined(x, dt, A, B, C, config.mamba_chunk_size, D=D, dt_bias=dt_bias,
                                                 dt_softplus=True)

    return scan, tuple(t.requires_grad_() for t in leaves)


def layer_graphs(batch: int = 4, seqlen: int = 4096) -> dict:
    """The 800M-shaped MambaLayer's forward+backward eager and replayed from CUDA graphs, against the bare mamba_ssm
    scan eager and graphed (wall time with CUDA events), with the graphed layer's outputs and gradients checked
    against the eager layer's."""
    layer_fwd_bwd, scan_fwd_bwd, layer, hidden = _layer_and_bare_scan(batch, seqlen)
    grad_out = torch.randn_like(hidden)
    out = {"layer_fwd_bwd_ms[eager]": timed(layer_fwd_bwd), "bare_scan_fwd_bwd_ms[eager]": timed(scan_fwd_bwd)}

    def grads(run) -> list[torch.Tensor]:
        for tensor in [hidden, *layer.parameters()]:
            tensor.grad = None
        result = run()
        result.backward(grad_out)
        return [result.detach().clone(), hidden.grad.clone()] + [p.grad.clone() for p in layer.parameters()]

    graphs = LayerGraphs([layer])
    assert graphs.applies(hidden)  # captures
    eager, replayed = grads(lambda: layer(hidden)), grads(lambda: graphs(hidden))
    out["graphed_vs_eager_worst_rel_err"] = max(_rel_err(r, e) for r, e in zip(replayed, eager))

    def graphed_fwd_bwd():
        graphs(hidden).backward(grad_out)

    out["layer_fwd_bwd_ms[graphed]"] = timed(graphed_fwd_bwd)
    # The bare scan graphed the same way, its inputs as the sample arguments.
    scan, leaves = _bare_scan(batch, seqlen, layer.mixer.config)
    graphed_scan = torch.cuda.make_graphed_callables(scan, leaves)
    dy = torch.randn_like(leaves[0])

    def graphed_scan_fwd_bwd():
        graphed_scan(*leaves).backward(dy)

    out["bare_scan_fwd_bwd_ms[graphed]"] = timed(graphed_scan_fwd_bwd)
    for layer_kind in ("eager", "graphed"):
        for scan_kind in ("eager", "graphed"):
            out[f"layer[{layer_kind}]_over_bare_scan[{scan_kind}]_pct"] = round(
                100 * (out[f"layer_fwd_bwd_ms[{layer_kind}]"] / out[f"bare_scan_fwd_bwd_ms[{scan_kind}]"] - 1), 1)
    return out


def host_ms(fn, iters: int = 20, behind_spin: bool = False) -> float:
    """Median host milliseconds of ``fn``, started on an idle GPU (its launches queue without waiting), or with
    ``behind_spin`` while the GPU is held by a spin: the CPU cost of the call (Python, autograd, the Triton launcher
    and the CUDA launches) with no waiting on the GPU."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if behind_spin:
            torch.cuda._sleep(200_000_000)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    return round(sorted(times)[len(times) // 2], 4)


def host_overhead(batch: int = 4, seqlen: int = 4096) -> dict:
    """Host (CPU) time to issue one MambaLayer forward+backward and the bare mamba_ssm scan call (on an idle GPU, and
    behind a GPU spin), and of single launches and pieces of the layer for scale, against the wall time with CUDA
    events: a layer timed alone is launch-bound when the first is about its kernel time or more. Prints the layer's
    host-side hot spots (cProfile by cumulative time; torch.profiler CPU ops by self time)."""
    import cProfile
    import pstats

    import triton
    import triton.language as tl

    layer_fwd_bwd, scan_fwd_bwd, layer, hidden = _layer_and_bare_scan(batch, seqlen)
    normed = layer.norm(hidden)
    buf = torch.zeros(16, device="cuda")

    @triton.jit
    def noop(ptr, n):
        tl.store(ptr + tl.arange(0, 16), tl.load(ptr + tl.arange(0, 16)) + n)

    segments = {"one Triton launch (2 args)": lambda: noop[(1,)](buf, 1), "one torch op (add_)": lambda: buf.add_(1),
                "pre-norm forward": lambda: layer.norm(hidden), "in_proj forward": lambda: layer.mixer.in_proj(normed),
                "layer forward": lambda: layer(hidden), "layer forward+backward": layer_fwd_bwd}
    out = {f"host_ms[{name}]": host_ms(fn) for name, fn in segments.items()}
    out |= {"layer_host_issue_ms": host_ms(layer_fwd_bwd, iters=10, behind_spin=True),
            "bare_scan_host_issue_ms": host_ms(scan_fwd_bwd, iters=10, behind_spin=True),
           "layer_wall_ms_events": timed(layer_fwd_bwd), "bare_scan_wall_ms_events": timed(scan_fwd_bwd)}
    profiler = cProfile.Profile()
    iters = 10
    torch.cuda._sleep(400_000_000)
    profiler.enable()
    for _ in range(iters):
        layer_fwd_bwd()
    profiler.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (primitive, all calls, own s, cumulative s, callers)}
    rows = sorted(stats.items(), key=lambda kv: -kv[1][3])[:45]
    print("--- host cProfile per layer fwd+bwd (us; cProfile inflates Python calls): cumulative, own, calls",
          flush=True)
    for (path, line, name), (_, calls, own, cum, _) in rows:
        where = f"{Path(path).name}:{line}({name})" if line else name
        print(f"    {1e6 * cum / iters:9.1f} {1e6 * own / iters:9.1f} {calls / iters:6.1f}  {where}", flush=True)
    torch.cuda._sleep(400_000_000)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            layer_fwd_bwd()
    torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)[-9000:], flush=True)
    return out


def layer_breakdown(batch: int = 4, seqlen: int = 4096, iters: int = 5) -> dict:
    """Where one MambaLayer's forward + backward time goes at the 800M layer shape (bf16): torch.profiler with CUDA
    activity over ``iters`` iterations, kernels by total time, per category, and the same for the bare
    ``mamba_chunk_scan_combined`` on the layer's shapes, so the layer's excess over the bare scan is itemised."""
    layer_fwd_bwd, scan_fwd_bwd, _, _ = _layer_and_bare_scan(batch, seqlen)
    out: dict = {"layer_fwd_bwd_ms_events": timed(layer_fwd_bwd), "bare_scan_fwd_bwd_ms_events": timed(scan_fwd_bwd)}
    variants = (("layer", layer_fwd_bwd, 25), ("bare_scan", scan_fwd_bwd, 15))
    for label, fn, top in variants:
        try:
            for _ in range(2):
                fn()
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(iters):
                    fn()
                torch.cuda.synchronize()
            out[label] = _kernel_table(prof, iters, top=top)
        except Exception as exc:  # one variant failing must not hide the other
            out[label] = {"error": repr(exc)[:400], "kernels_total_ms_per_iter": 0.0, "per_category_ms_per_iter": {},
                          "top_kernels": []}
    layer_total = out["layer"]["kernels_total_ms_per_iter"]
    scan_total = out["bare_scan"]["kernels_total_ms_per_iter"]
    if scan_total > 0:
        out["layer_kernels_over_bare_scan_kernels_pct"] = round(100 * (layer_total / scan_total - 1), 1)
    # Idle GPU time inside the layer (launch-bound gaps) = wall time - kernel time.
    out["layer_gpu_idle_ms_per_iter"] = round(out["layer_fwd_bwd_ms_events"] - layer_total, 4)
    for label, _, _ in variants:
        print(f"--- {label}: kernels {out[label]['kernels_total_ms_per_iter']} ms per fwd+bwd", flush=True)
        for cat, ms in out[label]["per_category_ms_per_iter"].items():
            print(f"    {ms:9.4f} ms  {cat}", flush=True)
        for row in out[label]["top_kernels"]:
            print(f"    {row['ms_per_iter']:9.4f} ms  x{row['calls_per_iter']:<5} {row['name']}", flush=True)
    return out


def memory_breakdown(batch: int = 1, seqlen: int = 4096) -> dict:
    """Saved-for-backward bytes per layer type with the real GPU kernels (``activation_memory``'s counter), and the
    allocated memory after the forward / peak in the forward / peak in the backward of one 800M training step."""
    from activation_memory import SavedTensorCounter, _category

    torch.manual_seed(0)
    config = config_800m()
    model = MambaModel(config).cuda()
    ids = torch.randint(0, config.vocab_size, (batch, seqlen), device="cuda")
    kinds = {f"decoder.layers.{name}": {"MambaLayer": "mamba", "AttentionLayer": "attention",
                                       "MLPLayer": "mlp"}[type(layer).__name__]
             for name, layer in model.decoder.layers.items()}
    counter = SavedTensorCounter(model)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).mean()
    counter.close()
    torch.cuda.synchronize()
    after_fwd = torch.cuda.memory_allocated() - base
    peak_fwd = torch.cuda.max_memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    loss.backward()
    torch.cuda.synchronize()
    peak_bwd = torch.cuda.max_memory_allocated() - base
    tokens = batch * seqlen
    per_kind: dict = {}
    for item in counter.items:
        kind = "weight_copies" if item["weight_copy"] else _category(item["module"], kinds)
        per_kind[kind] = per_kind.get(kind, 0) + item["bytes"]
    top: dict = {}
    for item in counter.items:
        if not item["weight_copy"]:
            module = ".".join(p for p in item["module"].split(".") if not p.isdigit())
            last = item["shape"][-1] if item["shape"] else 0
            key = f"{_category(item['module'], kinds)}|{module}|{item['dtype']}|{last}"
            top[key] = top.get(key, 0) + item["bytes"]
    return {
        "batch": batch, "seq": seqlen,
        "saved_bytes_per_token": {k: round(v / tokens) for k, v in per_kind.items() if k != "weight_copies"},
        "weight_copies_GB": round(per_kind.get("weight_copies", 0) / 1e9, 2),
        "top_saved_bytes_per_token": dict(sorted(((k, round(v / tokens)) for k, v in top.items()),
                                                 key=lambda kv: -kv[1])[:15]),
        "after_forward_GB": round(after_fwd / 1e9, 2), "peak_forward_GB": round(peak_fwd / 1e9, 2),
        "peak_backward_GB": round(peak_bwd / 1e9, 2),
    }


PARTS = ("conv", "ssd", "breakdown", "host", "layer", "parity", "memory", "train", "train_breakdown", "graphs")


def main() -> None:
    parser = argparse.ArgumentParser(
        description="GPU benchmarks of megatron_hybrid (needs CUDA and mamba_ssm's Triton kernels on PYTHONPATH). "
                    "Each part is wrapped: a failure is printed with its traceback and the next part runs.")
    parser.add_argument("--parts", default="conv,layer,parity,memory,train",
                        help=f"comma-separated, run in this order: {','.join(PARTS)}. conv: Triton conv1d alone, sweep "
                             "of its kernel configurations (the fastest stays set for the later parts of the run); "
                             "breakdown: profiler kernel table of one MambaLayer fwd+bwd vs the bare scan; host: "
                             "host (CPU) time to issue the layer and the bare scan, and its hot spots; layer: "
                             "layer vs bare scan timings; parity: fast path vs reference; memory; train: 800M steps; "
                             "train_breakdown: kernel table of an 800M step (batch 4); graphs: the layer and the "
                             "bare scan replayed from CUDA graphs, and 800M steps with graphed layers")
    parser.add_argument("--batches", default="2,4", help="batch sizes of the train part")
    parser.add_argument("--ssd-sweep", action="store_true", help="ssd part: also sweep our scan kernels' settings")
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {PARTS}")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_model.py needs a CUDA device")
    RESULTS["device"] = torch.cuda.get_device_name(0)
    RESULTS["torch"] = torch.__version__
    for name in parts:
        if name == "conv":
            part("triton_conv1d", print_chars=5000)(triton_conv)
        elif name == "ssd":
            part("ssd_scan", print_chars=6000)(lambda: ssd_scan(sweep=args.ssd_sweep))
        elif name == "breakdown":
            part("mamba_layer_breakdown", print_chars=400)(layer_breakdown)  # its tables are printed above
        elif name == "host":
            part("host_overhead")(host_overhead)
        elif name == "layer":
            part("mamba_layer_overhead")(mamba_layer_overhead)
        elif name == "parity":
            part("model_parity_bf16")(model_parity)
        elif name == "memory":
            part("memory_breakdown_b1")(memory_breakdown)
        elif name == "train_breakdown":
            part("train_800m_breakdown", print_chars=600)(train_step_breakdown)  # its table is printed above
        elif name == "train":
            for batch in (int(b) for b in args.batches.split(",")):
                part(f"train_800m_b{batch}")(lambda batch=batch: train_step_throughput(batch))
        elif name == "graphs":
            part("layer_graphs")(layer_graphs)
            for batch in (int(b) for b in args.batches.split(",")):
                part(f"train_800m_b{batch}_graphed")(
                    lambda batch=batch: train_step_throughput(batch, cuda_graph=True))
    text = json.dumps(RESULTS, indent=1)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_model.json"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
