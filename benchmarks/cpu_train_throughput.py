"""CPU training-step throughput of megatron_hybrid's MambaModel against transformers NemotronH (not a test).

Both models run the SAME weights on the same batch: a random ``NemotronHForCausalLM`` of the peer's tiny config
(/work/shared/peers/cpu_peer_hf_nemotronh.py: hidden 256, pattern ``M-*-M-M-*-M-``, vocab 8192, 8 heads / 4 kv heads
of dim 32, ffn 1024 squared ReLU, Mamba 8 heads x 64, state 64, 2 groups, chunk 128, untied) is saved with
``save_pretrained`` and loaded with ``megatron_hybrid.from_pretrained``. The converted config is checked field by field
against the ``cpu-bench`` preset, so the benchmark measures the model the preset describes.

A training step is forward + backward + ``AdamW.step()`` + ``zero_grad`` on a ``[batch, seq]`` batch of random ids
(default 4 x 512) in float32. Before timing, numerics are checked: the loss of the first step (same weights) and of a
second step (after one AdamW update of each) must agree to ``--rtol``, and every parameter's gradient of the first
step (mapped onto our names and layouts) to ``--grad-rtol`` in relative L2 norm.
Then both models are timed in the same process, alternating step by step (so drifts of the machine hit both alike),
for ``--steps`` timed steps after ``--warmup`` steps; tokens/s and the headline ratio come from the median wall time.
Also reported: the ratio of the fastest steps and of the median process CPU time (all threads), which move less when
other processes share the cores (the 1-minute load average is recorded). Threads: ``--threads`` (2) for both.

    python benchmarks/cpu_train_throughput.py [--steps 7] [--warmup 2] [--threads 2] [--compile] [--skip-hf]

Prints a table and one JSON object; with $OUT set the JSON is also written to $OUT/cpu_train_throughput.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

try:
    import megatron_hybrid  # noqa: F401  (an installed package, or the checkout below)
except ModuleNotFoundError:  # `python benchmarks/cpu_train_throughput.py` from a checkout without `pip install -e`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_hybrid import from_pretrained  # noqa: E402
from megatron_hybrid.interop.hf import load_hf_config, state_dict_from_hf  # noqa: E402
from megatron_hybrid.models.presets import get_preset  # noqa: E402

PRESET = "cpu-bench"
# Fields that do not change the network's computation (initialisation ranges of fresh weights, the storage dtype that
# from_pretrained takes from the checkpoint).
_NON_COMPUTE_FIELDS = {"mamba_dt_min", "mamba_dt_max", "mamba_dt_init_floor", "mamba_A_init_range", "init_method_std"}


def hf_model(seed: int = 0):
    """The peer's NemotronH, built exactly as /work/shared/peers/cpu_peer_hf_nemotronh.py builds it."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(seed)
    config = NemotronHConfig(
        vocab_size=8192, hidden_size=256, hybrid_override_pattern="M-*-M-M-*-M-", num_attention_heads=8,
        num_key_value_heads=4, head_dim=32, intermediate_size=1024, mamba_num_heads=8, mamba_head_dim=64,
        ssm_state_size=64, n_groups=2, chunk_size=128, mlp_hidden_act="relu2", tie_word_embeddings=False,
    )
    return NemotronHForCausalLM(config)


def preset_mismatches(model_config) -> list[str]:
    """Fields (affecting the computation) where the converted HF config and the ``cpu-bench`` preset differ."""
    preset = get_preset(PRESET, params_dtype=model_config.params_dtype)
    problems = []
    for field in dataclasses.fields(preset):
        if field.name in _NON_COMPUTE_FIELDS:
            continue
        ours, theirs = getattr(preset, field.name), getattr(model_config, field.name)
        if ours != theirs:
            problems.append(f"{field.name}: preset {ours!r} != transformers {theirs!r}")
    return problems


def hf_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """transformers' causal-LM loss: mean cross entropy of position t predicting token t + 1."""
    return model(input_ids=ids, labels=ids).loss


def our_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """The same loss from our per-token losses: labels shifted left, the last position (no target) dropped."""
    per_token = model(ids, labels=torch.roll(ids, -1, dims=1))  # [b, s]
    return per_token[:, :-1].mean()


def make_step(model, loss_fn: Callable, ids: torch.Tensor, lr: float) -> tuple[Callable[[], float], object]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)

    def step() -> float:
        loss = loss_fn(model, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step, optimizer


def rel_err(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def check_parity(ours, hf, ids: torch.Tensor, our_step: Callable[[], float], hf_step: Callable[[], float],
                 optimizers: tuple) -> dict:
    """Losses of step 1 (same weights), every gradient of step 1, and the losses of step 2 (after one AdamW update).

    The gradients are compared tensor by tensor after mapping transformers' names and layouts onto ours (the same
    conversion as the weights: ``state_dict_from_hf``); the figure is ``||g_ours - g_hf|| / ||g_hf||``, worst tensor.
    """
    ours_l, hf_l = our_loss(ours, ids), hf_loss(hf, ids)
    ours_l.backward()
    hf_l.backward()
    hf_grads = state_dict_from_hf({name: p.grad for name, p in hf.named_parameters()}, ours.config)
    worst, worst_name = 0.0, ""
    for name, param in ours.named_parameters():
        reference = hf_grads[name]
        err = ((param.grad - reference).norm() / reference.norm().clamp_min(1e-30)).item()
        if err > worst:
            worst, worst_name = err, name
    for optimizer in optimizers:  # the step-1 update of each model, then step 2 through the timed step functions
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    ours_step1, hf_step1 = ours_l.item(), hf_l.item()
    ours_step2, hf_step2 = our_step(), hf_step()
    return {
        "loss_step1": {"ours": ours_step1, "transformers": hf_step1, "rel_err": rel_err(ours_step1, hf_step1)},
        "grad_max_rel_err": worst,
        "grad_worst_param": worst_name,
        "loss_step2": {"ours": ours_step2, "transformers": hf_step2, "rel_err": rel_err(ours_step2, hf_step2)},
    }


def timed(step: Callable[[], float]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one step; CPU time is all threads' and includes OpenMP spin-waits."""
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - wall, time.process_time() - cpu


def cpu_model_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=7, help="timed steps per model (median reported; >= 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model before timing")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for both models")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--rtol", type=float, default=1e-5, help="max relative loss difference accepted")
    parser.add_argument("--grad-rtol", type=float, default=1e-4,
                        help="max relative L2 difference of any parameter's gradient accepted")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of our model (informational)")
    parser.add_argument("--skip-hf", action="store_true", help="time only our model (no parity check, no ratio)")
    parser.add_argument("--date", default=None, help="date to record (default: today)")
    args = parser.parse_args()
    if args.steps < 5:
        parser.error("--steps must be >= 5")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    hf = hf_model()
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        hf_config = load_hf_config(directory)
        ours = from_pretrained(directory, dtype=torch.float32)
    ours.train()
    hf.train()
    mismatches = preset_mismatches(ours.config)
    if mismatches:
        raise SystemExit(f"the {PRESET!r} preset does not describe the transformers model: " + "; ".join(mismatches))
    params = sum(p.numel() for p in ours.parameters())
    hf_params = sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, hf_config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    tokens = args.batch * args.seq

    our_step, our_optimizer = make_step(ours, our_loss, ids, args.lr)
    results: dict[str, object] = {
        "benchmark": "cpu_train_throughput",
        "date": args.date or datetime.date.today().isoformat(),
        "machine": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "batch": args.batch,
        "seq": args.seq,
        "params": params,
        "steps_timed": args.steps,
        "warmup": args.warmup,
    }

    if not args.skip_hf:
        import transformers

        results["transformers"] = transformers.__version__
        if hf_params != params:
            raise SystemExit(f"parameter counts differ: ours {params}, transformers {hf_params}")
        hf_step, hf_optimizer = make_step(hf, hf_loss, ids, args.lr)
        parity = check_parity(ours, hf, ids, our_step, hf_step, (our_optimizer, hf_optimizer))
        results["parity"] = parity
        print(f"loss step 1: ours {parity['loss_step1']['ours']:.8f} transformers "
              f"{parity['loss_step1']['transformers']:.8f} rel err {parity['loss_step1']['rel_err']:.2e}; "
              f"gradients: max rel err {parity['grad_max_rel_err']:.2e} ({parity['grad_worst_param']}); "
              f"loss step 2 rel err {parity['loss_step2']['rel_err']:.2e}", flush=True)
        worst_loss = max(parity["loss_step1"]["rel_err"], parity["loss_step2"]["rel_err"])
        if not (worst_loss <= args.rtol and parity["grad_max_rel_err"] <= args.grad_rtol):
            raise SystemExit(f"numerics differ: loss rel err {worst_loss:.3e} (limit {args.rtol:.1e}), gradient rel "
                             f"err {parity['grad_max_rel_err']:.3e} (limit {args.grad_rtol:.1e})")

    runners = {"ours": our_step}
    if not args.skip_hf:
        runners["transformers"] = hf_step
    for _ in range(args.warmup):
        for run in runners.values():
            run()
    results["load_average_before"] = os.getloadavg()[0]
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    for _ in range(args.steps):
        for name, run in runners.items():  # alternating: one step of each in turn
            samples[name].append(timed(run))
    results["load_average_after"] = os.getloadavg()[0]

    if args.compile:
        compiled = torch.compile(ours)
        compiled_step, _ = make_step(compiled, our_loss, ids, args.lr)
        results["compile_first_step_s"] = timed(compiled_step)[0]
        for _ in range(args.warmup):
            compiled_step()
        samples["ours_compiled"] = [timed(compiled_step) for _ in range(args.steps)]

    figures = {}
    for name, pairs in samples.items():
        wall = [w for w, _ in pairs]
        cpu = [c for _, c in pairs]
        median = statistics.median(wall)
        figures[name] = {"step_s_median": median, "tokens_per_s": tokens / median, "step_s_min": min(wall),
                         "step_s_max": max(wall), "cpu_s_median": statistics.median(cpu)}
    results["results"] = figures
    if "transformers" in figures:
        reference = figures["transformers"]
        for name, fig in figures.items():
            if name != "transformers":
                fig["ratio_over_transformers"] = fig["tokens_per_s"] / reference["tokens_per_s"]
                fig["ratio_over_transformers_min"] = reference["step_s_min"] / fig["step_s_min"]
                fig["ratio_over_transformers_cpu"] = reference["cpu_s_median"] / fig["cpu_s_median"]
        results["ratio_ours_over_transformers"] = figures["ours"]["ratio_over_transformers"]

    print(f"\nCPU training step, float32, batch {args.batch} x {args.seq}, {args.threads} threads, "
          f"{results['machine']}, torch {torch.__version__}, load average {results['load_average_before']:.1f}")
    print(f"{'model':<15}{'step s (median)':>16}{'min':>8}{'max':>8}{'cpu s':>8}{'tokens/s':>10}{'vs HF':>8}"
          f"{'(min)':>7}{'(cpu)':>7}")
    for name, fig in figures.items():
        ratios = ""
        if "ratio_over_transformers" in fig:
            ratios = (f"{fig['ratio_over_transformers']:>7.2f}x{fig['ratio_over_transformers_min']:>6.2f}x"
                      f"{fig['ratio_over_transformers_cpu']:>6.2f}x")
        print(f"{name:<15}{fig['step_s_median']:>16.3f}{fig['step_s_min']:>8.3f}{fig['step_s_max']:>8.3f}"
              f"{fig['cpu_s_median']:>8.3f}{fig['tokens_per_s']:>10,.0f}{ratios}")
    print(json.dumps(results, indent=1))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "cpu_train_throughput.json"), "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
