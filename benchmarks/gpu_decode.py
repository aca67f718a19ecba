"""GPU generation benchmark of the 800M configuration (run by hand on an H100/H200; not a test).

1. Device ceiling: device-to-device copy bandwidth (bytes read + written per second).
2. HBM roofline of decoding: a decode step must read every weight once (the input embedding excepted: a step reads
   only its rows), so ``tokens/s <= batch x bandwidth / weight bytes`` (the caches add to the bytes at batch 16; the
   figure printed is the weight-only bound).
3. Decode tokens/s of the InferenceEngine at batch 1 and 16 (prompt 128 tokens, ``--new-tokens`` greedy), eager and
   with CUDA graphs; decode-only (the first step, which prefills, excluded) and end to end; fraction of the roofline.
4. Prefill of one 65,536-token prompt (``--prefill-tokens``): time and peak GPU memory (and the cache memory).
5. Optionally (``--hf``) transformers NemotronH ``generate`` on the same weights, batch 1 and 16.

The model is random (the 800M preset: 48 layers ``M-M-M--M-*...``, hidden 1024, vocab 256000 untied) in bfloat16.
Prints one JSON object and writes it to $OUT/gpu_decode.json when $OUT is set. mamba_ssm's Triton kernels are used
when importable (put a mamba_ssm wheel's contents on PYTHONPATH; ``ops.kernel_backend_info()`` is recorded).

    PYTHONPATH=.:/path/to/site python benchmarks/gpu_decode.py [--new-tokens 256] [--prefill-tokens 65536] [--hf]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
import traceback

import torch

from megatron_hybrid import ops
from megatron_hybrid.inference import InferenceEngine, SamplingParams
from megatron_hybrid.models.mamba_model import MambaModel
from megatron_hybrid.models.presets import get_preset

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prefill-tokens", type=int, default=65536)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--hf", action="store_true", help="also time transformers NemotronH generate")
    parser.add_argument("--parts", nargs="+", default=["decode", "prefill"],
                        choices=["decode", "prefill"], help="which measurements to run (the roofline always)")
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
    for graphs in (False, True) if "decode" in args.parts else ():
        label = "cuda_graphs" if graphs else "eager"

        @part(f"decode_{label}")
        def _(graphs: bool = graphs) -> dict:
            engine = InferenceEngine(model, max_batch_size=max_batch, max_sequence_length=PROMPT + args.new_tokens,
                                     use_cuda_graphs=graphs)
            out = {"cache_memory_bytes": engine.cache_memory_bytes()}
            for batch in args.batch_sizes:
                run = run_decode(engine, batch, args.new_tokens)
                run["fraction_of_roofline"] = run["decode_tokens_per_s"] / (batch * roofline)
                out[f"batch_{batch}"] = run
            engine.close()
            del engine
            gc.collect()  # release the engine's caches and graph pools before the next part measures memory
            return out

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
