"""The peer of the 800M training benchmark: transformers' NemotronH training step at the same shape, on the same GPU.

What it runs: ``NemotronHForCausalLM`` built from transformers with the 800M configuration that megatron_hybrid's
``benchmarks/gpu_train_800m.sh`` trains (48 layers ``M-M-M--M-*M-M-M-M--*M-M-M-M-*M--M-M-M-*M-M--M-M-``, hidden 1024,
16 query heads / 8 KV heads of dim 64, MLP 4096 squared ReLU, Mamba-2 with 32 heads x 64, 8 groups, state 128, conv 4,
chunk 128, vocabulary 256000, untied embeddings), fp32 parameters, bf16 autocast, ``loss.backward()`` and a fused
``torch.optim.AdamW`` step: the same work per step as one iteration of our training loop at global batch = micro batch.
Tokens are random ids (throughput does not depend on them). Each micro-batch size of ``--batches`` is timed on its own
(CUDA events, median of ``--iters`` steps after ``--warmup``); an out-of-memory error is recorded for that size and the
next one still runs.

Kernels: mamba_ssm's Triton kernels are reached without running mamba_ssm's ``__init__`` (which imports the missing
CUDA extension) through megatron_hybrid's own loader, before transformers imports its NemotronH module (transformers
binds the kernels when that module is imported). transformers' fused training path
(``mamba_split_conv1d_scan_combined``) calls causal_conv1d's CUDA extension unconditionally, so when causal_conv1d is
not importable that one entry point is switched off and transformers takes its unfused path: mamba_ssm's
``mamba_chunk_scan_combined`` for the scan, PyTorch for the conv and the gated norm. The JSON names the implementation
behind every kernel entry point (``kernels``) and the path taken (``mamba_path``).

FLOPs: the model FLOPs of a step are computed with megatron_hybrid's formula (``training/flops.py``) for the same
architecture, so TFLOP/s and MFU here are directly comparable with the ``metrics.jsonl`` figures of our run.

    PYTHONPATH=<mamba_ssm site>:. python benchmarks/gpu_peer_nemotronh_train.py --batches 2,4 --out peer.json
    python benchmarks/gpu_peer_nemotronh_train.py --tiny --device cpu --no-kernels   (harness smoke test on a CPU)
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
import traceback
from typing import Any

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_hybrid.config import HybridConfig  # noqa: E402
from megatron_hybrid.training.flops import peak_tflops_for_device, training_flops_per_step  # noqa: E402

PATTERN_800M = "M-M-M--M-*M-M-M-M--*M-M-M-M-*M--M-M-M-*M-M--M-M-"
KERNEL_ENTRY_POINTS = ("causal_conv1d_fn", "causal_conv1d_update", "mamba2_split_conv1d_scan_combined",
                       "mamba2_selective_state_update", "mamba2_chunk_scan")


def shape(tiny: bool) -> dict[str, Any]:
    """Architecture of the run (the 800M benchmark shape, or a tiny one for CPU smoke tests)."""
    if tiny:
        return dict(pattern="M-*M", hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128, mamba_heads=4,
                    mamba_head_dim=32, state=16, groups=2, chunk=32, vocab=1024)
    return dict(pattern=PATTERN_800M, hidden=1024, heads=16, kv_heads=8, head_dim=64, ffn=4096, mamba_heads=32,
                mamba_head_dim=64, state=128, groups=8, chunk=128, vocab=256000)


def hybrid_config(s: dict[str, Any]) -> HybridConfig:
    """The same network as a megatron_hybrid config (only used to count FLOPs with our formula)."""
    return HybridConfig(num_layers=len(s["pattern"]), hidden_size=s["hidden"], vocab_size=s["vocab"],
                        hybrid_override_pattern=s["pattern"], num_attention_heads=s["heads"],
                        num_query_groups=s["kv_heads"], kv_channels=s["head_dim"], ffn_hidden_size=s["ffn"],
                        activation="squared_relu", mamba_num_heads=s["mamba_heads"],
                        mamba_head_dim=s["mamba_head_dim"], mamba_state_dim=s["state"], mamba_num_groups=s["groups"],
                        mamba_chunk_size=s["chunk"], mamba_dt_limit=(0.001, math.inf),
                        untie_embeddings_and_output_weights=True, add_bias_linear=False)


def causal_conv1d_available() -> bool:
    """Whether causal_conv1d's CUDA extension imports (what transformers' fused training path needs)."""
    try:
        importlib.import_module("causal_conv1d")
        importlib.import_module("causal_conv1d.cpp_functions")
        return True
    except Exception:
        return False


def resolved_implementation(fn: Any) -> str:
    """Module.name of what a transformers kernel entry point really calls (it keeps it in its closure)."""
    code, closure = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None or not closure:
        return "unknown"
    cells = dict(zip(code.co_freevars, closure))
    impl = cells.get("implementation")
    if impl is None:
        return "unknown"
    target = impl.cell_contents
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', '?')}"


def prepare_transformers(use_kernels: bool) -> tuple[Any, dict[str, Any]]:
    """Import transformers' NemotronH module (after making mamba_ssm's Triton kernels importable); report kernels."""
    info: dict[str, Any] = {}
    if use_kernels:
        from megatron_hybrid.ops.mamba_ssm_loader import KernelUnavailableError, load_mamba_ssm_kernels

        try:
            info["mamba_ssm"] = load_mamba_ssm_kernels().how
        except KernelUnavailableError as exc:
            info["mamba_ssm"] = f"unavailable: {exc}"
    else:
        sys.modules["mamba_ssm"] = None  # type: ignore[assignment]  # import fails -> transformers' torch paths
        sys.modules["causal_conv1d"] = None  # type: ignore[assignment]
    import transformers
    from transformers.models.nemotron_h import modeling_nemotron_h as modeling

    info["transformers"] = transformers.__version__
    info["causal_conv1d"] = causal_conv1d_available() if use_kernels else False
    fused = getattr(modeling, "mamba2_split_conv1d_scan_combined", None)
    if fused is not None and not resolved_implementation(fused).startswith("transformers.") and \
            not info["causal_conv1d"]:
        # mamba_ssm's fused conv+scan would call causal_conv1d_fwd_function = None: use the unfused path instead.
        def no_fused_path(*args: Any, **kwargs: Any) -> None:
            return None

        modeling.mamba2_split_conv1d_scan_combined = no_fused_path
        info["fused_split_conv1d_scan"] = "switched off (needs causal_conv1d's CUDA extension, not importable)"
    info["kernels"] = {name: resolved_implementation(getattr(modeling, name)) for name in KERNEL_ENTRY_POINTS
                       if hasattr(modeling, name)}
    if "fused_split_conv1d_scan" in info:
        info["kernels"]["mamba2_split_conv1d_scan_combined"] = "switched off"
    scan = info["kernels"].get("mamba2_chunk_scan", "")
    fused_impl = info["kernels"].get("mamba2_split_conv1d_scan_combined", "")
    if fused_impl.startswith("mamba_ssm."):
        info["mamba_path"] = "fused mamba_split_conv1d_scan_combined (mamba_ssm + causal_conv1d)"
    elif scan.startswith("mamba_ssm."):
        info["mamba_path"] = "unfused: mamba_ssm mamba_chunk_scan_combined, torch conv1d and gated norm"
    else:
        info["mamba_path"] = "pure PyTorch (no mamba_ssm kernels)"
    return modeling, info


def build_model(modeling: Any, s: dict[str, Any], device: torch.device) -> Any:
    from transformers import NemotronHConfig

    cfg = NemotronHConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], hybrid_override_pattern=s["pattern"],
                          num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"],
                          intermediate_size=s["ffn"], mamba_num_heads=s["mamba_heads"],
                          mamba_head_dim=s["mamba_head_dim"], ssm_state_size=s["state"], n_groups=s["groups"],
                          chunk_size=s["chunk"], mlp_hidden_act="relu2", tie_word_embeddings=False,
                          use_mamba_kernels=True)
    try:
        with device:  # initialise on the device directly (seconds instead of a CPU init of 907M parameters)
            model = modeling.NemotronHForCausalLM(cfg)
    except Exception:  # noqa: BLE001  # a transformers version that refuses the device context: CPU, then move
        model = modeling.NemotronHForCausalLM(cfg)
    return model.to(device).train()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Any, device: torch.device, warmup: int, iters: int) -> list[float]:
    """Milliseconds of each timed step (CUDA events on a GPU, wall clock on a CPU)."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure(model: Any, optimizer: Any, batch: int, seq: int, vocab: int, device: torch.device, warmup: int,
            iters: int, flops_per_token: float, peak: float | None) -> dict[str, Any]:
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def step() -> None:
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    times = time_steps(step, device, warmup, iters)
    ms = sorted(times)[len(times) // 2]
    tokens_per_s = batch * seq / ms * 1e3
    tflops = flops_per_token * tokens_per_s / 1e12
    out: dict[str, Any] = {
        "batch": batch, "seq": seq, "ms_per_step": round(ms, 2), "ms_all": [round(t, 2) for t in times],
        "tokens_per_s": round(tokens_per_s), "tflops": round(tflops, 1),
        "mfu": round(tflops / peak, 4) if peak else None, "wall_s": round(time.perf_counter() - t0, 1),
    }
    if device.type == "cuda":
        peak_bytes = torch.cuda.max_memory_allocated(device)
        out["peak_memory_gb"] = round(peak_bytes / 1e9, 2)
        out["peak_memory_gib"] = round(peak_bytes / 2**30, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="2,4", help="micro-batch sizes to time, comma separated")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a tiny model (harness smoke test)")
    p.add_argument("--no-kernels", action="store_true", help="transformers' pure-PyTorch paths (CPU smoke test)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: device table)")
    p.add_argument("--out", default=None, help="JSON output file (default: print only)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    s = shape(args.tiny)
    result: dict[str, Any] = {"what": "transformers NemotronHForCausalLM training step (fwd + bwd + fused AdamW), "
                                      "fp32 params, bf16 autocast, random tokens",
                              "shape": s, "torch": torch.__version__, "results": {}}

    def save() -> None:
        text = json.dumps(result, indent=1)
        if args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                f.write(text + "\n")

    peak = args.peak_tflops
    flops_per_token = training_flops_per_step(hybrid_config(s), args.seq, 1) / args.seq
    result["model_flops_per_token"] = flops_per_token
    try:
        if device.type == "cuda":
            result["device"] = torch.cuda.get_device_name(device)
            peak = peak or peak_tflops_for_device(result["device"], bf16=True)
        result["peak_tflops"] = peak
        modeling, info = prepare_transformers(use_kernels=not args.no_kernels)
        result.update(info)
        torch.manual_seed(0)
        t0 = time.perf_counter()
        model = build_model(modeling, s, device)
        result["build_s"] = round(time.perf_counter() - t0, 1)
        result["parameters"] = sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"[:1000]
        result["traceback"] = traceback.format_exc()[-3000:]
        save()
        print(json.dumps(result, indent=1))
        return 1
    save()
    for batch in [int(b) for b in args.batches.split(",") if b.strip()]:
        key = f"b{batch}"
        try:
            result["results"][key] = measure(model, optimizer, batch, args.seq, s["vocab"], device, args.warmup,
                                             args.iters, flops_per_token, peak)
        except torch.OutOfMemoryError as exc:
            result["results"][key] = {"batch": batch, "seq": args.seq, "error": "out of memory",
                                      "detail": str(exc).splitlines()[0][:300]}
        except Exception as exc:  # keep the other batch sizes
            result["results"][key] = {"batch": batch, "seq": args.seq, "error": f"{type(exc).__name__}: {exc}"[:600],
                                      "traceback": traceback.format_exc()[-2000:]}
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(key, json.dumps(result["results"][key]), flush=True)
        save()
    print(json.dumps({k: v for k, v in result.items() if k != "shape"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
