"""GPU benchmark of whole layers and the whole model (run by hand on an H100/H200; not a test).

0. Triton conv1d alone (``--parts conv``): our Triton causal conv vs the old float32 PyTorch fallback, fwd and
   fwd+bwd at the layer shape, bf16 correctness against the reference, and a sweep of the kernels' tile sizes.
1. Mamba layer overhead: forward+backward of one full MambaLayer (norm, in_proj, conv, SSD, gated norm, out_proj,
   residual) at the 800M layer shape (b4, L4096, hidden 1024, 32 heads x 64, 8 groups, d_state 128, chunk 128) in bf16,
   against the bare ``mamba_chunk_scan_combined`` call on the same shapes.
2. Model parity: the 800M-shaped stack (few layers) with the fast path against the pure-torch reference, bf16 autocast,
   forward loss and parameter gradients (relative errors).
3. Training-step throughput of the 800M configuration (the peers' shape: vocab 256000 untied, pattern of 48 layers):
   forward + backward + fused AdamW under bf16 autocast with fp32 parameters, tokens/s, model TFLOP/s and MFU.

4. Memory (``--parts memory``): bytes saved for backward per layer type with the real kernels at b1 x 4096 (the
   counter of ``benchmarks/activation_memory.py``) and the allocated memory after forward / peaks of one step.

Prints JSON and writes it to $OUT/gpu_model.json when $OUT is set. Needs mamba_ssm's Triton kernels on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback

import torch

from megatron_hybrid.config import HybridConfig
from megatron_hybrid.layers.hybrid_layers import MambaLayer
from megatron_hybrid.models.mamba_model import MambaModel
from megatron_hybrid.ops.mamba_ssm_loader import load_mamba_ssm_kernels
from megatron_hybrid.parallel.state import ParallelGroups

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


def part(name):
    def wrap(fn):
        t0 = time.time()
        try:
            RESULTS[name] = fn()
        except Exception as exc:  # keep going: one broken part must not hide the others
            RESULTS[name] = {"error": repr(exc)[:400], "traceback": traceback.format_exc()[-1500:]}
        RESULTS[name + "_wall_s"] = round(time.time() - t0, 1)
        print(name, json.dumps(RESULTS[name])[:1500], flush=True)
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

    out = {
        "layer_fwd_ms": timed(layer_fwd),
        "layer_fwd_bwd_ms": timed(layer_fwd_bwd),
        "bare_scan_fwd_ms": timed(scan),
        "bare_scan_fwd_bwd_ms": timed(scan_fwd_bwd),
    }
    out["overhead_fwd_bwd_pct"] = round(100 * (out["layer_fwd_bwd_ms"] / out["bare_scan_fwd_bwd_ms"] - 1), 1)
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
    torch.manual_seed(0)
    pattern = "M-*M-M"
    config = config_800m(num_layers=len(pattern), hybrid_override_pattern=pattern, vocab_size=32000)
    model = MambaModel(config).cuda()
    ids = torch.randint(0, config.vocab_size, (2, 1000), device="cuda")
    results = {}
    for backend in ("triton", "torch"):
        os.environ["MEGATRON_HYBRID_KERNELS"] = backend
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).mean()
        loss.backward()
        results[backend] = (loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()})
    os.environ.pop("MEGATRON_HYBRID_KERNELS")
    (loss_fast, grads_fast), (loss_ref, grads_ref) = results["triton"], results["torch"]
    grad_errors = {
        name: ((grads_fast[name] - grads_ref[name]).norm() / grads_ref[name].norm().clamp_min(1e-30)).item()
        for name in grads_ref
    }
    worst = max(grad_errors, key=grad_errors.get)
    return {"loss_fast": loss_fast.item(), "loss_ref": loss_ref.item(),
            "loss_rel_err": abs(loss_fast.item() - loss_ref.item()) / abs(loss_ref.item()),
            "grad_rel_err_max": grad_errors[worst], "grad_rel_err_worst_param": worst,
            "grad_rel_err_median": sorted(grad_errors.values())[len(grad_errors) // 2]}


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


def train_step_throughput(batch: int, seqlen: int = 4096, peak_tflops: float = 989.0) -> dict:
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


def triton_conv(batch: int = 4, seqlen: int = 4096) -> dict:
    """The Triton causal conv1d alone against the old fallback (PyTorch's float32 depthwise conv), fwd + bwd.

    Layer shape: xBC = channels [d_inner + 2 * ngroups * d_state] = 4096 of in_proj's [b, L, 6176] bf16 output
    (a strided view, read in place), float32 weight [4096, 4] and bias (autocast training), SiLU. Also checks the
    Triton results in bf16 against the reference (float32 math on the same bf16 inputs), with and without documents,
    and times a few tile configurations of the kernels (module globals) so the defaults can be tuned.
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

    def triton_fwd(seq=None):
        return tc.causal_conv1d_channel_last_triton(x, weight, bias, "silu", seq_idx=seq)

    def torch_fwd(seq=None):  # the previous GPU fallback: [b, d, l] view, float32 F.conv1d, SiLU, cast back
        return causal_conv1d_ref(x.transpose(1, 2), weight, bias, "silu", seq_idx=seq).transpose(1, 2)

    def fwd_bwd(fn, seq=None):
        def run():
            out = fn(seq)
            torch.autograd.backward(out, grad)
        return run

    def grads(fn, seq=None):
        for t in (x, weight, bias):
            t.grad = None
        out = fn(seq)
        out.backward(grad)
        return out.detach(), x.grad.clone(), weight.grad.clone(), bias.grad.clone()

    res: dict = {"shape": [batch, seqlen, d], "x_strides": list(x.stride())}
    for name, seq in (("plain", None), ("documents", seq_idx)):
        got, want = grads(triton_fwd, seq), grads(torch_fwd, seq)
        res[f"rel_err_{name}"] = {k: _rel_err(g, w) for k, g, w in zip(("out", "dx", "dweight", "dbias"), got, want)}
    res["triton_fwd_ms"] = timed(lambda: triton_fwd())
    res["triton_fwd_bwd_ms"] = timed(fwd_bwd(triton_fwd))
    res["triton_fwd_bwd_documents_ms"] = timed(fwd_bwd(triton_fwd, seq_idx))
    res["torch_fwd_ms"] = timed(lambda: torch_fwd())
    res["torch_fwd_bwd_ms"] = timed(fwd_bwd(torch_fwd))
    # Ideal: read x and write out (fwd); read x and dout, write dx (bwd).
    res["bytes_fwd_bwd_GB"] = round(5 * x.numel() * 2 / 1e9, 3)
    defaults = (tc.FWD_BLOCK_L, tc.FWD_BLOCK_D, tc.FWD_WARPS, tc.BWD_BLOCK_L, tc.BWD_BLOCK_D, tc.BWD_WARPS)
    sweep = {}
    try:
        for cfg in ((32, 128, 4), (64, 128, 8), (64, 64, 4), (16, 256, 4)):
            tc.FWD_BLOCK_L, tc.FWD_BLOCK_D, tc.FWD_WARPS = cfg
            sweep[f"fwd_{cfg}"] = timed(lambda: triton_fwd())
        tc.FWD_BLOCK_L, tc.FWD_BLOCK_D, tc.FWD_WARPS = defaults[:3]
        for cfg in ((64, 64, 8), (64, 32, 4), (32, 64, 4), (128, 32, 8), (64, 128, 8)):
            tc.BWD_BLOCK_L, tc.BWD_BLOCK_D, tc.BWD_WARPS = cfg
            out = triton_fwd()
            sweep[f"bwd_{cfg}"] = timed(lambda out=out: torch.autograd.grad(out, (x, weight, bias), grad,
                                                                            retain_graph=True))
    except Exception as exc:
        sweep["error"] = repr(exc)[:300]
    finally:
        tc.FWD_BLOCK_L, tc.FWD_BLOCK_D, tc.FWD_WARPS, tc.BWD_BLOCK_L, tc.BWD_BLOCK_D, tc.BWD_WARPS = defaults
    res["tile_sweep_ms"] = sweep
    return res


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="conv,layer,parity,memory,train")
    parser.add_argument("--batches", default="2,4")
    args = parser.parse_args()
    parts = args.parts.split(",")
    RESULTS["device"] = torch.cuda.get_device_name(0)
    RESULTS["torch"] = torch.__version__
    if "conv" in parts:
        part("triton_conv1d")(triton_conv)
    if "layer" in parts:
        part("mamba_layer_overhead")(mamba_layer_overhead)
    if "parity" in parts:
        part("model_parity_bf16")(model_parity)
    if "memory" in parts:
        part("memory_breakdown_b1")(memory_breakdown)
    if "train" in parts:
        for batch in (int(b) for b in args.batches.split(",")):
            part(f"train_800m_b{batch}")(lambda batch=batch: train_step_throughput(batch))
    text = json.dumps(RESULTS, indent=1)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_model.json"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
