"""GPU generation benchmark of the 800M configuration (run by hand on an H100/H200; not a test).

1. Device ceiling: device-to-device copy bandwidth (bytes read + written per second).
2. HBM roofline of decoding: a decode step must read every weight once (the input embedding excepted: a step reads
   only its rows), so ``tokens/s <= batch x bandwidth / weight bytes`` (the caches add to the bytes at batch 16; the
   figure printed is the weight-only bound).
3. Decode tokens/s of the InferenceEngine at batch 1 and 16 (prompt 128 tokens, ``--new-tokens`` greedy), eager and
   with CUDA graphs; decode-only (the first step, which prefills, excluded) and end to end; fraction of the roofline.
4. Prefill of one 65,536-token prompt (``--prefill-tokens``): time and peak GPU memory (and the cache memory).
5. Optionally (``--hf``) transformers NemotronH ``generate`` on the same weights, batch 1 and 16.
6. ``--parts kernels``: CUDA kernels launched by one eager decode step of the first layer of each type (Mamba,
   attention, MLP) and of the whole model, counted with torch.profiler, for four variants of the decode fusions
   (``model_runner.set_decode_fusions``): ``fused`` (all on: the fused Triton Mamba step ``ops.triton_decode``, the
   Triton decode attention ``ops.triton_attention``, the residual add carried into the next norm
   ``ops.triton_add_norm``), ``fused_mamba`` (only the Mamba step: the GPU path before the other two),
   ``unfused`` (all off: mamba_ssm kernels and torch ops) and ``torch`` (all off, ``MEGATRON_HYBRID_KERNELS=torch``).
7. ``--parts layer``: one Mamba layer's decode step (norm + mixer + residual), eager and replayed from a CUDA graph,
   unfused vs fused, at each ``--batch-sizes``, with the fused-vs-unfused output difference from identical states.
8. ``--parts model_step``: one whole-model decode step replayed from a CUDA graph (no engine, no sampling), unfused
   vs fused_mamba vs fused: ms per step, tokens/s and the fraction of the roofline.
0. ``--parts gemv`` (run first): the decode GEMVs of the 800M model (k, n) at 1 and 16 rows, ``F.linear`` (cuBLAS)
   vs the Triton skinny GEMV ``ops.triton_gemv`` over a few tile configs; us per call and weight GB/s, each call
   reading a different copy of the weight (a rotation larger than L2, as a model step reads cold weights), calls
   replayed from a CUDA graph. The fastest config per shape is installed in ``triton_gemv.SHAPE_CONFIGS`` for the
   rest of the run, and shapes where cuBLAS wins go to ``triton_gemv.CUBLAS_SHAPES`` (they keep F.linear). The
   ``fused_gemv`` variant of the later parts is ``fused`` plus the GEMV (``tensor_parallel.SKINNY_GEMV_ENABLED``);
   every other variant runs F.linear. The output layer (k 1024, n 256000) is timed for information only (the model
   calls F.linear for it directly).
9. ``--parts kernel_times``: ``--profile-replays`` CUDA-graph replays of the whole-model decode step at batch 1
   under torch.profiler (CUDA activity), for ``fused_mamba`` and ``fused``: per kernel name its launches per step,
   total and mean CUDA time per step and its share of the step's kernel time and of the step's wall time, sorted;
   plus how busy the GPU is (kernel time / step time: the rest is launch gaps). Falls back to eager steps if the
   profiler reports no kernels inside graph replays.

Each part runs on its own (an error is recorded and printed, the next part still runs). ``--no-fused-decode`` makes
the ``decode`` / ``prefill`` parts use the unfused decode (all fusions off: before/after runs of the engine);
``--no-skinny-gemv`` makes them use F.linear for the decode GEMVs (they use the Triton GEMV by default).

The model is random (the 800M preset: 48 layers ``M-M-M--M-*...``, hidden 1024, vocab 256000 untied) in bfloat16.
Prints one JSON object and writes it to $OUT/gpu_decode.json when $OUT is set. mamba_ssm's Triton kernels are used
when importable (put a mamba_ssm wheel's contents on PYTHONPATH; ``ops.kernel_backend_info()`` is recorded).

    PYTHONPATH=.:/path/to/site python benchmarks/gpu_decode.py [--new-tokens 256] [--prefill-tokens 65536] [--hf]
    PYTHONPATH=.:/path/to/site python benchmarks/gpu_decode.py --parts kernels layer model_step kernel_times decode
    PYTHONPATH=.:/path/to/site python benchmarks/gpu_decode.py --parts gemv model_step kernel_times decode
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from megatron_hybrid import ops
from megatron_hybrid.inference import InferenceEngine, SamplingParams
from megatron_hybrid.inference.context import InferenceContext
from megatron_hybrid.inference.model_runner import set_decode_fusions
from megatron_hybrid.layers.hybrid_layers import AttentionLayer, MambaLayer, MLPLayer
from megatron_hybrid.models.mamba_model import MambaModel
from megatron_hybrid.models.presets import get_preset
from megatron_hybrid.parallel import tensor_parallel

RESULTS: dict = {}
PROMPT = 128


def part(name: str):
    def wrap(fn):
        start = time.time()
        try:
            RESULTS[name] = fn()
        except Exception as exc:  # one broken part must not hide the others
            RESULTS[name] = {"error": repr(exc)[:400], "traceback": traceback.format_exc()[-2000:]}
        RESULTS[name + "_wall_s"] = round(time.time() - start, 1)
        print(name, json.dumps(RESULTS[name])[:2000], flush=True)
        torch.cuda.empty_cache()
        return fn

    return wrap


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 2 GiB device-to-device copy (median of 10)."""
    x = torch.empty(2**29, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.copy_(x)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del x, y
    return 2 * 2**31 / sorted(times)[len(times) // 2]


def build_model() -> MambaModel:
    torch.manual_seed(0)
    with torch.device("meta"):
        model = MambaModel(get_preset("800M", params_dtype=torch.bfloat16))
    model = model.to_empty(device="cuda")
    with torch.no_grad():  # random weights of a sane scale; what they are does not matter for speed
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight", ".D")):
                param.fill_(1.0)
            elif name.endswith("A_log"):
                param.copy_(torch.log(torch.empty_like(param, dtype=torch.float32).uniform_(1, 16)))
            elif name.endswith("dt_bias"):
                param.fill_(-4.0)
            else:
                param.normal_(0.0, 0.02)
    return model.eval()


def run_decode(engine: InferenceEngine, batch: int, new_tokens: int, repeats: int = 3) -> dict:
    vocab = engine.vocab_size
    prompts = torch.randint(0, vocab, (batch, PROMPT), generator=torch.Generator().manual_seed(batch)).tolist()
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.0))  # warm-up (kernels, autotuning)
    totals, decodes = [], []
    for _ in range(repeats):
        for index, prompt in enumerate(prompts):
            engine.add_request(f"b{index}", prompt, params)
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.step()  # prefill of every prompt + the first decode step
        torch.cuda.synchronize()
        first = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        torch.cuda.synchronize()
        end = time.perf_counter()
        for index in range(batch):
            engine.pop_output(f"b{index}")
        totals.append(end - start)
        decodes.append(end - first)
    total, decode = sorted(totals)[len(totals) // 2], sorted(decodes)[len(decodes) // 2]
    return {
        "decode_tokens_per_s": batch * (new_tokens - 1) / decode,
        "ms_per_decode_step": 1e3 * decode / (new_tokens - 1),
        "end_to_end_tokens_per_s": batch * new_tokens / total,
    }


# ---------------------------------------------------------------------------------------------- decode step anatomy

VARIANTS = ("unfused", "fused_mamba", "fused", "fused_gemv", "torch")
FUSIONS = {
    "unfused": dict(mamba=False, attention=False, residual=False),
    "fused_mamba": dict(mamba=True, attention=False, residual=False),
    "fused": dict(mamba=True, attention=True, residual=True),
    "fused_gemv": dict(mamba=True, attention=True, residual=True),  # + the Triton skinny GEMV for the linears
    "torch": dict(mamba=False, attention=False, residual=False),
}


def set_fused_decode(model: torch.nn.Module, fused: bool) -> None:
    """Every decode fusion on (the default) or off."""
    set_decode_fusions(model, **FUSIONS["fused" if fused else "unfused"])


@contextmanager
def decode_variant(model: torch.nn.Module, name: str) -> Iterator[None]:
    """The decode fusions of variant ``name`` (``FUSIONS``); ``torch`` also sets ``MEGATRON_HYBRID_KERNELS=torch``
    (every op on the pure-PyTorch reference); only ``fused_gemv`` runs the Triton skinny GEMV (the others F.linear).
    Restores all fusions on, the GEMV switch and the environment afterwards."""
    previous = os.environ.get(ops.ENV_VAR)
    previous_gemv = tensor_parallel.SKINNY_GEMV_ENABLED
    set_decode_fusions(model, **FUSIONS[name])
    tensor_parallel.SKINNY_GEMV_ENABLED = name == "fused_gemv"
    if name == "torch":
        os.environ[ops.ENV_VAR] = "torch"
    try:
        yield
    finally:
        tensor_parallel.SKINNY_GEMV_ENABLED = previous_gemv
        set_fused_decode(model, True)
        if previous is None:
            os.environ.pop(ops.ENV_VAR, None)
        else:
            os.environ[ops.ENV_VAR] = previous


def first_layers(model: MambaModel) -> dict[str, torch.nn.Module]:
    """The first Mamba, attention and MLP layer of the model, by kind."""
    kinds = {MambaLayer: "mamba", AttentionLayer: "attention", MLPLayer: "mlp"}
    found: dict[str, torch.nn.Module] = {}
    for layer in model.decoder.layers.values():
        kind = kinds.get(type(layer))
        if kind is not None and kind not in found:
            found[kind] = layer
    return found


def count_kernels(fn: Callable[[], object], top: int = 40) -> dict:
    """GPU activities (kernels, memcpy, memset) of one call of ``fn`` under torch.profiler, after a warm-up call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = Counter(evt.name[:100] for evt in prof.events() if evt.device_type != torch.autograd.DeviceType.CPU)
    return {"kernels": sum(names.values()), "by_name": dict(names.most_common(top))}


def time_eager(fn: Callable[[], object], iters: int) -> float:
    """Milliseconds per call, launched back to back from Python (what an eager decode step pays)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start) / iters


def time_graph(fn: Callable[[], object], calls_per_graph: int, replays: int) -> float:
    """Milliseconds per call when ``calls_per_graph`` calls are captured in one CUDA graph and replayed (several calls
    per graph, so the replay's own launch cost does not hide a one-layer step)."""
    graph = capture_graph(lambda: [fn() for _ in range(calls_per_graph)])
    ms = replay_ms(graph, replays) / calls_per_graph
    del graph
    return ms


def replay_ms(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """Milliseconds per replay of ``graph``, replayed back to back, timed with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def decode_context(model: MambaModel, max_batch: int, length: int) -> InferenceContext:
    """A decode cache with random (not zero) Mamba states, so the fused and unfused steps are compared on real data."""
    context = InferenceContext(model, max_batch, length, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    for conv_state, ssm_state in context.mamba.values():
        conv_state.copy_(torch.randn(conv_state.shape, generator=generator, device="cuda"))
        ssm_state.copy_(torch.randn(ssm_state.shape, generator=generator, device="cuda"))
    context.positions.fill_(PROMPT)
    return context


def kernel_counts(model: MambaModel, max_batch: int, length: int) -> dict:
    context = decode_context(model, max_batch, length)
    hidden = torch.randn(1, 1, model.config.hidden_size, device="cuda", dtype=model.config.params_dtype)
    ids = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    out: dict = {}
    for variant in VARIANTS:
        result: dict = {}
        with decode_variant(model, variant), torch.inference_mode():
            context.set_decode(1)
            for kind, layer in first_layers(model).items():
                try:
                    result[kind] = count_kernels(lambda layer=layer: layer(hidden, inference_context=context))
                except Exception as exc:  # one layer kind failing must not hide the others
                    result[kind] = {"error": repr(exc)[:400]}
            try:
                whole = count_kernels(lambda: model(ids, inference_context=context), top=15)
                result["whole_model_step"] = whole
            except Exception as exc:
                result["whole_model_step"] = {"error": repr(exc)[:400]}
        out[variant] = result
        print(f"kernels {variant}:", {k: v.get("kernels", v.get("error")) for k, v in result.items()}, flush=True)
    return out


def layer_timing(model: MambaModel, batch_sizes: list[int], length: int, iters: int) -> dict:
    layer = first_layers(model)["mamba"]
    number = layer.mixer.layer_number
    context = decode_context(model, max(batch_sizes), length)
    out: dict = {}
    for batch in batch_sizes:
        hidden = torch.randn(1, batch, model.config.hidden_size, device="cuda", dtype=model.config.params_dtype)
        row: dict = {}
        with torch.inference_mode():
            context.set_decode(batch)
            conv_state, ssm_state = context.mamba[number]
            saved = conv_state.clone(), ssm_state.clone()
            outputs = {}
            for variant in ("unfused", "fused"):
                try:
                    with decode_variant(model, variant):
                        conv_state.copy_(saved[0])
                        ssm_state.copy_(saved[1])
                        outputs[variant] = layer(hidden, inference_context=context).float()
                        step = (lambda hidden=hidden: layer(hidden, inference_context=context))
                        row[f"{variant}_eager_ms"] = time_eager(step, iters)
                        row[f"{variant}_graph_ms"] = time_graph(step, calls_per_graph=20, replays=max(iters // 20, 5))
                except Exception as exc:
                    row[f"{variant}_error"] = repr(exc)[:400]
                    row[f"{variant}_traceback"] = traceback.format_exc()[-1500:]
            conv_state.copy_(saved[0])
            ssm_state.copy_(saved[1])
            if len(outputs) == 2:
                diff = (outputs["fused"] - outputs["unfused"]).abs().max().item()
                row["fused_vs_unfused_max_abs_diff"] = diff
                row["fused_vs_unfused_rel_diff"] = diff / (outputs["unfused"].abs().max().item() + 1e-12)
            if "fused_graph_ms" in row and "unfused_graph_ms" in row:
                row["graph_speedup"] = row["unfused_graph_ms"] / row["fused_graph_ms"]
                row["eager_speedup"] = row["unfused_eager_ms"] / row["fused_eager_ms"]
        out[f"batch_{batch}"] = row
        print(f"layer batch {batch}:", json.dumps(row)[:600], flush=True)
    return out


def model_step_timing(model: MambaModel, batch_sizes: list[int], length: int, roofline: float) -> dict:
    context = decode_context(model, max(batch_sizes), length)
    out: dict = {}
    for batch in batch_sizes:
        ids = torch.randint(0, model.config.vocab_size, (batch, 1), device="cuda")
        row: dict = {}
        with torch.inference_mode():
            context.set_decode(batch)
            for variant in ("unfused", "fused_mamba", "fused", "fused_gemv"):
                try:
                    with decode_variant(model, variant):
                        ms = time_graph(lambda ids=ids: model(ids, inference_context=context), calls_per_graph=1,
                                        replays=30)
                    row[f"{variant}_graph_ms_per_step"] = ms
                    row[f"{variant}_tokens_per_s"] = batch * 1e3 / ms
                    row[f"{variant}_fraction_of_roofline"] = 1e3 / ms / roofline
                except Exception as exc:
                    row[f"{variant}_error"] = repr(exc)[:400]
                    row[f"{variant}_traceback"] = traceback.format_exc()[-1500:]
        out[f"batch_{batch}"] = row
        print(f"model step batch {batch}:", json.dumps(row)[:600], flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    return out


def capture_graph(fn: Callable[[], object], return_output: bool = False):
    """``fn`` captured in a CUDA graph after warm-up calls on a side stream (compilation, autotuning, allocator),
    replayed once; with ``return_output`` also the captured call's (static) output."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn()
    graph.replay()
    torch.cuda.synchronize()
    return (graph, output) if return_output else graph


def gpu_events(run: Callable[[], object], steps: int) -> list[tuple[float, float, str]]:
    """(start us, end us, name) of every GPU activity (kernels, memcpy, memset) over ``steps`` calls of ``run``."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    return [(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
            if e.device_type != torch.autograd.DeviceType.CPU]


def profile_kernels(run: Callable[[], object], steps: int) -> tuple[dict[str, list[float]], int]:
    """Durations (us) of every GPU activity by name over ``steps`` calls of ``run``, and how many activities were
    seen."""
    events = gpu_events(run, steps)
    durations: dict[str, list[float]] = {}
    for start, end, name in events:
        durations.setdefault(name, []).append(end - start)
    return durations, len(events)


def idle_gaps(run: Callable[[], object], steps: int, top: int = 12) -> dict:
    """Where the GPU is idle over ``steps`` calls of ``run``: the time covered by no GPU activity (kernels, copies,
    memsets; overlapping PDL kernels count once), per step, and the largest totals by (activity before, activity
    after) pair."""
    spans = sorted((start, end, name[:60]) for start, end, name in gpu_events(run, steps))
    if not spans:
        return {"error": "the profiler saw no GPU activity"}
    by_pair: Counter = Counter()
    covered_end, last_name, idle = spans[0][1], spans[0][2], 0.0
    for start, end, name in spans[1:]:
        if start > covered_end:
            gap = start - covered_end
            idle += gap
            by_pair[f"{last_name} -> {name}"] += gap
        if end > covered_end:
            covered_end, last_name = end, name
    total = spans[-1][1] - spans[0][0]
    return {
        "span_us_per_step": round(total / steps, 1),
        "idle_us_per_step": round(idle / steps, 1),
        "largest_gaps_us_per_step": {pair: round(us / steps, 2) for pair, us in by_pair.most_common(top)},
    }


def kernel_table(durations: dict[str, list[float]], steps: int, step_us: float) -> dict:
    """Per kernel name: launches per step, CUDA time per step (total) and per launch (mean), shares; sorted by time."""
    total_us = sum(sum(v) for v in durations.values()) / steps
    rows = []
    for name, times in durations.items():
        per_step = sum(times) / steps
        rows.append({
            "name": name[:160],
            "count_per_step": len(times) / steps,
            "us_per_step": round(per_step, 2),
            "mean_us": round(sum(times) / len(times), 2),
            "share_of_kernel_time": round(per_step / total_us, 4) if total_us else None,
            "share_of_step": round(per_step / step_us, 4) if step_us else None,
        })
    rows.sort(key=lambda row: -row["us_per_step"])
    return {
        "kernels_per_step": sum(len(v) for v in durations.values()) / steps,
        "kernel_us_per_step": round(total_us, 1),
        "step_us": round(step_us, 1),
        "busy_fraction": round(total_us / step_us, 3) if step_us else None,
        "by_name": rows,
    }


def print_kernel_table(label: str, table: dict, top: int = 40) -> None:
    print(f"\n== kernel_times {label}: {table['kernels_per_step']:.0f} kernels/step, "
          f"{table['kernel_us_per_step']} us of kernels in a {table['step_us']} us step "
          f"(GPU busy {table['busy_fraction']})", flush=True)
    print(f"{'us/step':>9} {'share':>6} {'of step':>7} {'n/step':>6} {'mean us':>8}  name")
    for row in table["by_name"][:top]:
        print(f"{row['us_per_step']:9.1f} {row['share_of_kernel_time']:6.1%} {row['share_of_step']:7.1%} "
              f"{row['count_per_step']:6.1f} {row['mean_us']:8.2f}  {row['name'][:110]}")
    print(flush=True)


def kernel_times(model: MambaModel, length: int, replays: int) -> dict:
    """Which kernels a whole-model decode step (batch 1, replayed from a CUDA graph) spends its time in (for
    ``fused_mamba``, ``fused`` and ``fused_gemv``)."""
    context = decode_context(model, 1, length)
    ids = torch.randint(0, model.config.vocab_size, (1, 1), device="cuda")
    out: dict = {}
    for variant in ("fused_mamba", "fused", "fused_gemv"):
        try:
            with decode_variant(model, variant), torch.inference_mode():
                context.set_decode(1)
                step = lambda: model(ids, inference_context=context)  # noqa: E731
                graph = capture_graph(step)
                step_us = 1e3 * replay_ms(graph, replays)
                durations, seen = profile_kernels(graph.replay, replays)
                source = "graph_replay"
                if seen == 0:  # this profiler does not see inside graph launches: eager steps, same kernels
                    durations, seen = profile_kernels(step, replays)
                    source = "eager (the profiler saw no kernels inside graph replays)"
                del graph
            table = kernel_table(durations, replays, step_us)
            table["source"] = source
            out[variant] = table
            print_kernel_table(variant, table)
        except Exception as exc:  # one variant failing must not hide the other
            out[variant] = {"error": repr(exc)[:400], "traceback": traceback.format_exc()[-1500:]}
            print(f"kernel_times {variant} failed: {exc!r}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- the fused step

@contextmanager
def pdl_setting(mode: str) -> Iterator[None]:
    """Programmatic dependent launch of our kernels: "0" off, "1" on, "early" (``MEGATRON_HYBRID_PDL``, read at each
    launch)."""
    from megatron_hybrid.ops._triton_common import PDL_ENV_VAR

    previous = os.environ.get(PDL_ENV_VAR)
    os.environ[PDL_ENV_VAR] = mode
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(PDL_ENV_VAR, None)
        else:
            os.environ[PDL_ENV_VAR] = previous


def fused_step_timing(model: MambaModel, length: int, roofline: float, replays: int) -> dict:
    """The batch-1 decode step replayed from a CUDA graph: the layer path (all its fusions and the skinny GEMV: the
    previous best) against ``FusedDecoder`` with and without PDL; logits of each against the layer path from the same
    caches; the kernel table of the fused step."""
    from megatron_hybrid.inference.fused_decode import FusedDecoder
    from megatron_hybrid.ops._triton_common import pdl_available

    context = decode_context(model, 1, length)
    saved = [t.clone() for pair in context.mamba.values() for t in pair]
    ids = torch.randint(0, model.config.vocab_size, (1, 1), device="cuda")

    def restore() -> None:
        for target, value in zip((t for pair in context.mamba.values() for t in pair), saved):
            target.copy_(value)

    out: dict = {"pdl_available": pdl_available(torch.device("cuda"))}
    decoder = FusedDecoder(model, context)
    steps = {
        "layers": lambda: model(ids, inference_context=context),
        "fused_step_pdl": lambda: decoder(ids[:, 0]),
        "fused_step_pdl_early": lambda: decoder(ids[:, 0]),
        "fused_step_no_pdl": lambda: decoder(ids[:, 0]),
    }
    pdl_modes = {"fused_step_no_pdl": "0", "fused_step_pdl_early": "early"}
    logits: dict = {}
    with torch.inference_mode():
        context.set_decode(1)
        for name, step in steps.items():
            try:
                with decode_variant(model, "fused_gemv"), pdl_setting(pdl_modes.get(name, "1")):
                    restore()
                    logits[name] = step().float().view(-1)
                    graph, static = capture_graph(step, return_output=True)  # warm-ups advance the caches
                    restore()
                    graph.replay()
                    logits[f"{name}_graph"] = static.float().view(-1).clone()
                    del graph, static
                    ms = time_graph(step, calls_per_graph=1, replays=replays)
                out[f"{name}_ms_per_step"] = ms
                out[f"{name}_tokens_per_s"] = 1e3 / ms
                out[f"{name}_fraction_of_roofline"] = 1e3 / ms / roofline
            except Exception as exc:
                out[f"{name}_error"] = repr(exc)[:400]
                out[f"{name}_traceback"] = traceback.format_exc()[-2000:]
            print(f"fused_step {name}:", {k: v for k, v in out.items() if k.startswith(name)}, flush=True)
        for name, value in logits.items():
            if name != "layers" and "layers" in logits:
                reference = logits["layers"]
                out[f"{name}_logits_rel_diff_vs_layers"] = ((value - reference).abs().max()
                                                            / reference.abs().max()).item()
                out[f"{name}_same_argmax"] = bool(value.argmax() == reference.argmax())
        from megatron_hybrid.ops import triton_decode

        default_tile = triton_decode.STATE_TILE_ELEMENTS
        for tile in (1024, 4096):  # the SSM step's tile (default 2048): programs per head and their work
            try:
                triton_decode.STATE_TILE_ELEMENTS = tile
                with decode_variant(model, "fused_gemv"):
                    restore()
                    out[f"fused_step_pdl_ssm_tile{tile}_ms_per_step"] = time_graph(
                        steps["fused_step_pdl"], calls_per_graph=1, replays=replays)
            except Exception as exc:
                out[f"ssm_tile{tile}_error"] = repr(exc)[:300]
            finally:
                triton_decode.STATE_TILE_ELEMENTS = default_tile
        print("fused_step ssm tiles:", {k: v for k, v in out.items() if "tile" in k}, flush=True)
        restore()
        try:  # replay + reading the greedy token back every step: a graph launch and a host sync per step
            with decode_variant(model, "fused_gemv"):
                graph, tokens = capture_graph(lambda: steps["fused_step_pdl"]().view(-1).argmax(), return_output=True)
                for _ in range(10):
                    graph.replay()
                    tokens.item()
                start = time.perf_counter()
                for _ in range(replays):
                    graph.replay()
                    tokens.item()
                out["fused_step_pdl_synced_loop_ms_per_step"] = 1e3 * (time.perf_counter() - start) / replays
                del graph, tokens
        except Exception as exc:
            out["synced_loop_error"] = repr(exc)[:400]
        try:  # the runner's greedy step from Python lists (staged upload, replay, tokens back): what the engine calls
            from megatron_hybrid.inference.model_runner import ModelRunner

            runner = ModelRunner(model, 1, length, use_cuda_graphs=True)
            token = 0
            for position in range(10):
                token = runner.decode_greedy([token], [position], position + 1).tolist()[0]
            start = time.perf_counter()
            for position in range(10, 10 + min(replays, length - 11)):
                token = runner.decode_greedy([token], [position], position + 1).tolist()[0]
            out["runner_decode_greedy_ms_per_step"] = 1e3 * (time.perf_counter() - start) / min(replays, length - 11)
            del runner
        except Exception as exc:
            out["runner_loop_error"] = repr(exc)[:400]
        print("fused_step loops:", {k: v for k, v in out.items() if "loop" in k or "runner" in k}, flush=True)
        for name, mode in (("fused_step_pdl", "1"), ("fused_step_no_pdl", "0")):
            # Without PDL each kernel's duration is its own; with it, a kernel's time includes waiting for the last.
            restore()
            try:
                with decode_variant(model, "fused_gemv"), pdl_setting(mode):
                    graph = capture_graph(steps[name])
                    step_us = 1e3 * out.get(f"{name}_ms_per_step", 0.0)
                    durations, seen = profile_kernels(graph.replay, 20)
                    del graph
                table = kernel_table(durations, 20, step_us)
                out[f"{name}_kernel_table"] = table
                print_kernel_table(name, table, top=25)
            except Exception as exc:
                out[f"{name}_kernel_table_error"] = repr(exc)[:400]
    restore()
    return out


# (k, n, prologue, activation) of the 800M decode linears as the fused step runs them
FUSED_GEMV_SHAPES = [
    (1024, 4384, "add_norm", None),  # in_proj
    (2048, 1024, "gated_norm", None),  # out_proj
    (1024, 4096, "add_norm", "squared_relu"),  # fc1
    (4096, 1024, "none", None),  # fc2
    (1024, 2048, "add_norm", None),  # linear_qkv
    (1024, 1024, "none", None),  # linear_proj
]


def fused_gemv_benchmark() -> dict:
    """The fused GEMV per decode shape over tile configs (PDL as available, calls back to back in a graph on
    rotated weight copies), against F.linear; installs the fastest config per shape for the rest of the run."""
    import torch.nn.functional as F

    from megatron_hybrid.ops import triton_fused_gemv as fg

    dtype = torch.bfloat16
    configs = [fg.FusedGemvConfig(b, w) for b, w in ((1, 2), (2, 4), (4, 4), (4, 8), (8, 4), (8, 8), (16, 8))]
    out: dict = {}
    for k, n, prologue, activation in FUSED_GEMV_SHAPES:
        bytes_per_weight = n * k * 2
        copies = max(2, min(64, -(-L2_FLUSH_BYTES // bytes_per_weight)))
        weights = [torch.randn(n, k, device="cuda", dtype=dtype) * 0.02 for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=dtype)
        fusions: dict = {"prologue": prologue, "activation": activation}
        if prologue == "add_norm":
            fusions.update(residual=torch.randn(1, k, device="cuda", dtype=dtype),
                           norm_weight=torch.rand(k, device="cuda", dtype=dtype) + 0.5)
        elif prologue == "gated_norm":
            fusions.update(z=torch.randn(1, k, device="cuda", dtype=dtype), group_size=k // 8,
                           norm_weight=torch.rand(k, device="cuda", dtype=dtype) + 0.5)
        row: dict = {"copies_rotated": copies, "prologue": prologue, "activation": activation}

        def timed(cfg, x=x, weights=weights, fusions=fusions, copies=copies) -> float:
            """us per call of the fused GEMV with ``cfg`` (None: F.linear without the fusions)."""
            if cfg is None:
                return time_rotating(lambda i: F.linear(x, weights[i]), copies, replays=20)
            return time_rotating(lambda i: fg.fused_gemv_triton(x, weights[i], config=cfg, **fusions), copies, 20)

        with torch.inference_mode():
            row["F.linear_us"] = round(timed(None), 2)
            best = None
            for cfg in configs:
                label = f"bn{cfg.block_n}_w{cfg.num_warps}"
                try:
                    us = timed(cfg)
                except Exception as exc:
                    row[label] = {"error": repr(exc)[:300]}
                    continue
                row[label] = {"us": round(us, 2), "GBps": round(bytes_per_weight / us / 1e3, 1)}
                if best is None or us < best[0]:
                    best = (us, cfg, label)
            if best is not None:
                fg.SHAPE_CONFIGS[(n, k)] = best[1]
                row["best"], row["best_us"] = best[2], round(best[0], 2)
                with pdl_setting("0"):
                    row["best_without_pdl_us"] = round(timed(best[1]), 2)
                with pdl_setting("early"):
                    row["best_pdl_early_us"] = round(timed(best[1]), 2)
        out[f"k{k}_n{n}_{prologue}"] = row
        print(f"fused_gemv k={k} n={n} {prologue}: F.linear {row['F.linear_us']} us, best {row.get('best')} "
              f"{row.get('best_us')} us, without PDL {row.get('best_without_pdl_us')} us", flush=True)
        del weights
        torch.cuda.empty_cache()
    out["installed_configs"] = {f"n{n}_k{k}": vars(cfg) for (n, k), cfg in fg.SHAPE_CONFIGS.items()}
    return out


# ---------------------------------------------------------------------------------------------- skinny GEMV sweep

# (k, n) of the 800M decode linears: in_proj, out_proj / linear_proj, fc1, fc2, linear_qkv, and a 1024-square one.
GEMV_SHAPES = [(1024, 4384), (2048, 1024), (1024, 4096), (4096, 1024), (1024, 2048), (1024, 1024)]
OUTPUT_LAYER_SHAPE = (1024, 256000)  # information only: the model's output layer calls F.linear directly
GEMV_ROWS = (1, 16)
L2_FLUSH_BYTES = 256 * 2**20  # weight copies rotated per graph: several times the H100/H200 L2 (50-60 MB)


def gemv_sweep_configs(rows: int) -> list:
    """At most 6 tile configs per path (one row: elementwise FMA + final reduce; 16 rows: tl.dot)."""
    from megatron_hybrid.ops.triton_gemv import GemvConfig

    if rows == 1:
        return [GemvConfig(8, 256), GemvConfig(16, 256), GemvConfig(4, 512), GemvConfig(16, 128),
                GemvConfig(8, 512, num_warps=8), GemvConfig(32, 256, split_k=2, num_warps=8)]
    return [GemvConfig(16, 128), GemvConfig(32, 128), GemvConfig(16, 256), GemvConfig(64, 64),
            GemvConfig(16, 128, split_k=2), GemvConfig(32, 256, num_warps=8)]


def time_rotating(fn: Callable[[int], object], copies: int, replays: int) -> float:
    """Microseconds per call of ``fn(i)`` when calls ``i = 0 .. copies-1`` (each on its own weight copy) are captured
    in one CUDA graph and replayed: cold-L2 weight reads and no launch gaps, as in a replayed decode step."""
    return 1e3 * time_graph(lambda: [fn(i) for i in range(copies)], calls_per_graph=1, replays=replays) / copies


def gemv_benchmark() -> dict:
    """F.linear vs the Triton GEMV per decode shape and row count; installs the fastest config per shape."""
    import torch.nn.functional as F

    from megatron_hybrid.ops import triton_gemv

    dtype = torch.bfloat16
    out: dict = {}
    for k, n in GEMV_SHAPES + [OUTPUT_LAYER_SHAPE]:
        info_only = (k, n) == OUTPUT_LAYER_SHAPE
        bytes_per_weight = n * k * 2
        copies = max(2, min(64, -(-L2_FLUSH_BYTES // bytes_per_weight)))
        weights = [torch.randn(n, k, device="cuda", dtype=dtype) * 0.02 for _ in range(copies)]
        for rows in GEMV_ROWS:
            x = torch.randn(rows, k, device="cuda", dtype=dtype)
            reference = F.linear(x, weights[0]).float()
            row: dict = {"copies_rotated": copies}
            with torch.inference_mode():
                cublas_us = time_rotating(lambda i, x=x, w=weights: F.linear(x, w[i]), copies, replays=20)
                row["F.linear_us"] = round(cublas_us, 2)
                row["F.linear_GBps"] = round(bytes_per_weight / cublas_us / 1e3, 1)
                best = None
                for cfg in gemv_sweep_configs(rows):
                    label = f"bn{cfg.block_n}_bk{cfg.block_k}_sk{cfg.split_k}_w{cfg.num_warps}"
                    try:
                        got = triton_gemv.gemv_triton(x, weights[0], config=cfg).float()
                        err = ((got - reference).abs().max() / reference.abs().max().clamp_min(1e-12)).item()
                        call = (lambda i, x=x, w=weights, cfg=cfg: triton_gemv.gemv_triton(x, w[i], config=cfg))
                        us = time_rotating(call, copies, replays=20)
                    except Exception as exc:  # one config failing to compile must not end the sweep
                        row[label] = {"error": repr(exc)[:300]}
                        continue
                    row[label] = {"us": round(us, 2), "GBps": round(bytes_per_weight / us / 1e3, 1),
                                  "rel_err_vs_F.linear": err}
                    if err < 2e-2 and (best is None or us < best[0]):
                        best = (us, cfg, label)
            if best is not None:
                row["best"] = best[2]
                row["best_us"] = round(best[0], 2)
                row["speedup_vs_F.linear"] = round(cublas_us / best[0], 2)
                if not info_only:
                    key = triton_gemv.shape_key(rows, n, k)
                    triton_gemv.SHAPE_CONFIGS[key] = best[1]
                    if best[0] >= cublas_us:  # cuBLAS wins here: the dispatch keeps F.linear for this shape
                        triton_gemv.CUBLAS_SHAPES.add(key)
            out[f"k{k}_n{n}_m{rows}" + ("_output_layer_info" if info_only else "")] = row
            print(f"gemv k={k} n={n} m={rows}: F.linear {row['F.linear_us']} us ({row['F.linear_GBps']} GB/s), "
                  f"best triton {row.get('best')} {row.get('best_us')} us "
                  f"(x{row.get('speedup_vs_F.linear')})", flush=True)
        del weights
        torch.cuda.empty_cache()
    out["installed_configs"] = {f"{path}_n{n}_k{k}": vars(cfg) for (path, n, k), cfg in
                                triton_gemv.SHAPE_CONFIGS.items()}
    out["cublas_shapes"] = sorted(f"{path}_n{n}_k{k}" for path, n, k in triton_gemv.CUBLAS_SHAPES)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prefill-tokens", type=int, default=65536)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--hf", action="store_true", help="also time transformers NemotronH generate")
    parser.add_argument("--parts", nargs="+", default=["decode", "prefill"],
                        choices=["gemv", "fused_gemv", "fused_step", "decode", "prefill", "kernels", "layer",
                                 "model_step", "kernel_times", "engine_profile"],
                        help="which measurements to run (the roofline always); see the module docstring")
    parser.add_argument("--no-fused-decode", action="store_true",
                        help="decode/prefill parts: the unfused decode (every decode fusion off)")
    parser.add_argument("--no-skinny-gemv", action="store_true",
                        help="decode/prefill parts: F.linear (cuBLAS) for the decode GEMVs instead of the Triton GEMV")
    parser.add_argument("--no-fused-step", action="store_true",
                        help="decode part: batch-1 steps through the layers instead of the FusedDecoder")
    parser.add_argument("--step-replays", type=int, default=200, help="graph replays timed by the fused_step part")
    parser.add_argument("--layer-iters", type=int, default=200, help="eager iterations of the layer timing")
    parser.add_argument("--profile-replays", type=int, default=50,
                        help="graph replays profiled by the kernel_times part")
    args = parser.parse_args()

    RESULTS["device"] = torch.cuda.get_device_name(0)
    RESULTS["torch"] = torch.__version__
    RESULTS["kernels"] = ops.kernel_backend_info()
    model = build_model()
    params = sum(p.numel() for p in model.parameters())
    embedding = model.embedding.word_embeddings.weight
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) - embedding.numel() * 2
    RESULTS["model"] = {"params": params, "decode_weight_bytes": weight_bytes, "dtype": "bfloat16",
                        "pattern": model.config.layer_pattern}

    bandwidth = copy_bandwidth()
    RESULTS["roofline"] = {"copy_bandwidth_bytes_per_s": bandwidth, "batch1_tokens_per_s": bandwidth / weight_bytes}
    roofline = RESULTS["roofline"]["batch1_tokens_per_s"]
    max_batch = max(args.batch_sizes)
    length = PROMPT + args.new_tokens

    if "gemv" in args.parts:
        part("gemv")(gemv_benchmark)
    if "fused_gemv" in args.parts:
        part("fused_gemv")(fused_gemv_benchmark)
    if "fused_step" in args.parts:
        part("fused_step")(lambda: fused_step_timing(model, length, roofline, args.step_replays))
    if "kernels" in args.parts:
        part("kernel_counts")(lambda: kernel_counts(model, max_batch, length))
    if "layer" in args.parts:
        part("mamba_layer_decode")(lambda: layer_timing(model, args.batch_sizes, length, args.layer_iters))
    if "model_step" in args.parts:
        part("model_decode_step_graph")(lambda: model_step_timing(model, args.batch_sizes, length, roofline))
    if "kernel_times" in args.parts:
        part("kernel_times")(lambda: kernel_times(model, length, args.profile_replays))

    set_fused_decode(model, not args.no_fused_decode)
    RESULTS["fused_decode"] = not args.no_fused_decode
    tensor_parallel.SKINNY_GEMV_ENABLED = not args.no_skinny_gemv
    RESULTS["skinny_gemv"] = not args.no_skinny_gemv
    RESULTS["fused_step"] = not args.no_fused_step
    for graphs in (False, True) if "decode" in args.parts else ():
        label = "cuda_graphs" if graphs else "eager"

        @part(f"decode_{label}")
        def _(graphs: bool = graphs) -> dict:
            engine = InferenceEngine(model, max_batch_size=max_batch, max_sequence_length=PROMPT + args.new_tokens,
                                     use_cuda_graphs=graphs, fused_decode_step=not args.no_fused_step)
            out = {"cache_memory_bytes": engine.cache_memory_bytes()}
            for batch in args.batch_sizes:
                run = run_decode(engine, batch, args.new_tokens)
                run["fraction_of_roofline"] = run["decode_tokens_per_s"] / (batch * roofline)
                out[f"batch_{batch}"] = run
            engine.close()
            del engine
            gc.collect()  # release the engine's caches and graph pools before the next part measures memory
            return out

    if "engine_profile" in args.parts:

        @part("engine_profile")
        def _() -> dict:
            """GPU activity of pipelined batch-1 engine steps (graphs): which kernels and copies a step runs."""
            engine = InferenceEngine(model, max_batch_size=max_batch, max_sequence_length=PROMPT + args.new_tokens,
                                     use_cuda_graphs=True)
            prompt = torch.randint(0, engine.vocab_size, (PROMPT,)).tolist()
            engine.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0.0))
            engine.add_request("p", prompt, SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0))
            engine.step()
            for _ in range(10):
                engine.step()
            steps = 50
            torch.cuda.synchronize()
            start = time.perf_counter()
            durations, _ = profile_kernels(engine.step, steps)
            step_us = 1e6 * (time.perf_counter() - start) / steps  # profiled: slower than unprofiled steps
            while engine.has_unfinished():
                engine.step()
            engine.pop_output("p")
            table = kernel_table(durations, steps, step_us)
            print_kernel_table("engine_profile", table, top=15)
            # Idle GPU time: in engine steps, and in back-to-back replays of the same batch-1 graph (each replay feeds
            # the next one's inputs on the device, so this is a valid continuing decode).
            engine.add_request("q", prompt, SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0))
            for _ in range(10):
                engine.step()
            table["idle_engine_steps"] = idle_gaps(engine.step, steps)
            graph = engine.runner._graphs[engine.runner._buckets[0]][0]
            table["idle_graph_replays"] = idle_gaps(graph.replay, steps)
            table["graph_replay_ms_per_step"] = replay_ms(graph, steps)
            print("engine_profile idle:", json.dumps({k: v for k, v in table.items() if k != "by_name"}, indent=1),
                  flush=True)
            while engine.has_unfinished():
                engine.step()
            engine.pop_output("q")
            engine.close()
            return table

    @part("prefill")
    def _() -> dict:
        if "prefill" not in args.parts:
            return {"skipped": True}
        length = args.prefill_tokens
        engine = InferenceEngine(model, max_batch_size=1, max_sequence_length=length + 1)
        prompt = torch.randint(0, engine.vocab_size, (length,), device="cuda")
        engine.runner.prefill(0, prompt[:1024])  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        engine.runner.prefill(0, prompt)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return {
            "tokens": length,
            "seconds": seconds,
            "tokens_per_s": length / seconds,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(),
            "resident_before_bytes": before,
            "peak_over_resident_bytes": torch.cuda.max_memory_allocated() - before,
            "cache_memory_bytes": engine.cache_memory_bytes(),
        }

    if args.hf:

        @part("hf_generate")
        def _() -> dict:
            from transformers import NemotronHForCausalLM

            with tempfile.TemporaryDirectory() as directory:
                model.save_pretrained(directory)
                hf = NemotronHForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).cuda().eval()
            out = {}
            new = min(args.new_tokens, 64)
            for batch in args.batch_sizes:
                ids = torch.randint(0, model.config.vocab_size, (batch, PROMPT), device="cuda")
                with torch.no_grad():
                    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False, pad_token_id=0)
                    hf.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    hf.generate(ids, **kwargs)
                    torch.cuda.synchronize()
                out[f"batch_{batch}_tokens_per_s"] = batch * new / (time.perf_counter() - start)
            del hf
            return out

    print(json.dumps(RESULTS, indent=1, default=str))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_decode.json"), "w") as handle:
            json.dump(RESULTS, handle, indent=1, default=str)


if __name__ == "__main__":
    main()
