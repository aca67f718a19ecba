"""CPU decode throughput of megatron_hybrid's InferenceEngine against transformers NemotronH ``generate`` (not a test).

Same tiny config as /work/shared/peers/cpu_peer_hf_nemotronh.py (hidden 256, pattern ``M-*-M-M-*-M-``, vocab 8192,
8 heads / 4 kv heads of dim 32, ffn 1024 squared ReLU, Mamba 8 heads x 64, state 64, 2 groups, chunk 128). Both run the
SAME weights: a random NemotronH is saved with ``save_pretrained`` and loaded with ``megatron_hybrid.from_pretrained``.
Greedy, prompt 32 tokens, 64 new tokens, batch 1 and 16.

Tokens/s = batch x new tokens / wall time of the whole generation (prefill included, as the peer script measures);
``decode_only_tokens_per_s`` excludes the engine's first step (prefill of every prompt + one decode step). Each figure
is the median of ``--repeats`` runs after one warm-up. Prints JSON; writes it to $OUT/cpu_decode.json when OUT is set.

    python benchmarks/cpu_decode.py [--batch-sizes 1 16] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch

from megatron_hybrid import from_pretrained
from megatron_hybrid.inference import InferenceEngine, SamplingParams

PROMPT_LEN = 32
NEW_TOKENS = 64


def hf_model():
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(0)
    config = NemotronHConfig(
        vocab_size=8192, hidden_size=256, hybrid_override_pattern="M-*-M-M-*-M-", num_attention_heads=8,
        num_key_value_heads=4, head_dim=32, intermediate_size=1024, mamba_num_heads=8, mamba_head_dim=64,
        ssm_state_size=64, n_groups=2, chunk_size=128, mlp_hidden_act="relu2", tie_word_embeddings=False,
    )
    return NemotronHForCausalLM(config).eval()


def time_hf(model, prompts: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    def run() -> torch.Tensor:
        return model.generate(
            prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
            do_sample=False, pad_token_id=0,
        )

    with torch.no_grad():
        out = run()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    return statistics.median(times), out[:, PROMPT_LEN:]


def time_engine(engine: InferenceEngine, prompts: list[list[int]], repeats: int) -> tuple[float, float, list]:
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0)
    outputs = engine.generate(prompts, params)  # warm-up
    totals, decodes = [], []
    for _ in range(repeats):
        for index, prompt in enumerate(prompts):
            engine.add_request(f"bench-{index}", prompt, params)
        start = time.perf_counter()
        engine.step()  # prefill of every prompt + the first decode step
        after_first = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        end = time.perf_counter()
        for index in range(len(prompts)):
            engine.pop_output(f"bench-{index}")
        totals.append(end - start)
        decodes.append(end - after_first)
    return statistics.median(totals), statistics.median(decodes), [o.token_ids for o in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    hf = hf_model()
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        ours = from_pretrained(directory, dtype=torch.float32)
    results = {
        "device": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in ours.parameters()),
        "prompt_len": PROMPT_LEN,
        "new_tokens": NEW_TOKENS,
        "runs": {},
    }
    generator = torch.Generator().manual_seed(1)
    for batch in args.batch_sizes:
        prompts = torch.randint(3, 8192, (batch, PROMPT_LEN), generator=generator)
        engine = InferenceEngine(ours, max_batch_size=batch, max_sequence_length=PROMPT_LEN + NEW_TOKENS)
        total, decode_only, ours_tokens = time_engine(engine, prompts.tolist(), args.repeats)
        run = {
            "ours_tokens_per_s": batch * NEW_TOKENS / total,
            "ours_decode_only_tokens_per_s": batch * (NEW_TOKENS - 1) / decode_only,
            "ours_ms_per_step": 1000 * decode_only / (NEW_TOKENS - 1),
        }
        if not args.skip_hf:
            hf_time, hf_tokens = time_hf(hf, prompts, args.repeats)
            run["hf_tokens_per_s"] = batch * NEW_TOKENS / hf_time
            run["speedup"] = run["ours_tokens_per_s"] / run["hf_tokens_per_s"]
            # Informational: HF's decode step skips the dt clamp its prefill applies (time_step_min), so a few greedy
            # tokens may differ at this config; the exact-parity test uses a negligible clamp.
            run["greedy_tokens_equal_hf_fraction"] = (torch.tensor(ours_tokens) == hf_tokens).float().mean().item()
        results["runs"][f"batch_{batch}"] = run
        print(json.dumps({f"batch_{batch}": run}), flush=True)
    print(json.dumps(results, indent=1))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "cpu_decode.json"), "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
