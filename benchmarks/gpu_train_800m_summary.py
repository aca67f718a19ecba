"""Summarise an 800M training run's ``metrics.jsonl`` next to the NemotronH peer (``benchmarks/gpu_train_800m.sh``).

Reads the per-iteration records that ``pretrain_mamba.py`` writes with ``--log-interval 1`` and reports, over the
steady-state iterations ``--from`` .. ``--to`` (the first ones include Triton compilation and autotuning): median
tokens/s, milliseconds per iteration, model TFLOP/s per device and MFU (both as the training loop logs them:
``training/flops.py``'s closed-form model FLOPs, 3 x forward, output layer over the padded vocabulary; MFU against the
dense bf16 peak of ``PEAK_TFLOPS`` for the device, 989.4 TFLOP/s for H100 SXM / H200), peak memory (the largest of the
per-iteration ``torch.cuda.max_memory_allocated`` peaks, GiB in the log, also given in GB), the first and last loss,
and the tokens/s ratio against each micro-batch size of the peer JSON (``gpu_peer_nemotronh_train.py``, whose FLOPs
use the same formula for the same architecture).

    python benchmarks/gpu_train_800m_summary.py --metrics run/metrics.jsonl [--peer peer.json] [--kernels k.json]
        [--extra key=value ...] --out summary.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
from typing import Any


def read_records(path: str) -> list[dict[str, Any]]:
    """The ``kind == "train"`` records of a metrics file, by iteration (a cut last line is ignored)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("kind", "train") == "train":
                records.append(record)
    return sorted(records, key=lambda r: r["iteration"])


def _median(records: list[dict[str, Any]], key: str) -> float | None:
    values = [float(r[key]) for r in records if r.get(key) is not None and math.isfinite(float(r[key]))]
    return statistics.median(values) if values else None


def _load_json(path: str | None) -> dict[str, Any] | None:
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as exc:
        return {"error": f"unreadable JSON {path}: {exc}"}


def summarise(records: list[dict[str, Any]], first: int, last: int | None, tokens_per_iteration: int | None
              ) -> dict[str, Any]:
    """Statistics of the training run (see the module docstring)."""
    if not records:
        return {"error": "no training records in metrics.jsonl"}
    last = last or records[-1]["iteration"]
    steady = [r for r in records if first <= r["iteration"] <= last]
    out: dict[str, Any] = {
        "iterations_logged": len(records),
        "last_iteration": records[-1]["iteration"],
        "steady_iterations": [first, last],
        "steady_count": len(steady),
        "loss_first": records[0]["lm_loss"],
        "loss_last": records[-1]["lm_loss"],
        "loss_mean_last_5": statistics.fmean(r["lm_loss"] for r in records[-5:]),
        "first_iteration_ms": records[0].get("ms_per_iteration"),
        "skipped_iterations": records[-1].get("skipped_iterations"),
    }
    if steady:
        tokens = _median(steady, "tokens_per_sec")
        tflops = _median(steady, "tflops_per_device")
        out.update({
            "tokens_per_s_median": tokens,
            "tokens_per_s_min": min(r["tokens_per_sec"] for r in steady),
            "tokens_per_s_max": max(r["tokens_per_sec"] for r in steady),
            "ms_per_iteration_median": _median(steady, "ms_per_iteration"),
            "tflops_per_device_median": tflops,
            "mfu_median": _median(steady, "mfu"),
            "model_flops_per_token": tflops * 1e12 / tokens if tokens and tflops else None,
        })
    memory = [r["memory_gb"] for r in records if r.get("memory_gb") is not None]
    if memory:
        out["peak_memory_gib"] = max(memory)
        out["peak_memory_gb"] = max(memory) * 2**30 / 1e9
    if tokens_per_iteration:
        out["tokens_per_iteration"] = tokens_per_iteration
    return out


MODEL_LINE = re.compile(r"^> model: (?P<pattern>\S+) \((?P<params>[\d.]+)(?P<unit>[KMB]?) parameters on this rank\), "
                        r"vocab (?P<vocab>\d+) \(padded (?P<padded>\d+)\)")


def model_from_log(path: str | None) -> dict[str, Any] | None:
    """The ``> model:`` line of the training log: layer pattern, parameters, tokenizer and padded vocabulary."""
    if not path or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("> model:"):
                m = MODEL_LINE.match(line)
                if m is None:
                    return {"line": line.strip()}
                scale = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}[m["unit"]]
                return {"layer_pattern": m["pattern"], "parameters": round(float(m["params"]) * scale),
                        "tokenizer_vocab": int(m["vocab"]), "padded_vocab": int(m["padded"]), "line": line.strip()}
    return None


def compare(ours: dict[str, Any], peer: dict[str, Any] | None) -> dict[str, Any]:
    """tokens/s ratios ours / peer for every peer micro-batch size that ran."""
    if not peer or not ours.get("tokens_per_s_median"):
        return {}
    ratios = {}
    for key, res in (peer.get("results") or {}).items():
        if isinstance(res, dict) and res.get("tokens_per_s"):
            ratios[f"ours_over_peer_{key}"] = round(ours["tokens_per_s_median"] / res["tokens_per_s"], 3)
    return ratios


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--metrics", required=True)
    p.add_argument("--peer", default=None, help="gpu_peer_nemotronh_train.py JSON")
    p.add_argument("--kernels", default=None, help="megatron_hybrid.ops.kernel_backend_info() JSON")
    p.add_argument("--train-log", default=None, help="pretrain_mamba.py output (its '> model:' line is reported)")
    p.add_argument("--from", dest="first", type=int, default=5, help="first steady-state iteration (default 5)")
    p.add_argument("--to", dest="last", type=int, default=None, help="last iteration (default: the last logged)")
    p.add_argument("--tokens-per-iteration", type=int, default=None)
    p.add_argument("--extra", nargs="*", default=[], help="key=value pairs copied into the summary (run settings)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    summary: dict[str, Any] = dict(kv.split("=", 1) for kv in args.extra if "=" in kv)
    if os.path.isfile(args.metrics):
        summary["ours"] = summarise(read_records(args.metrics), args.first, args.last, args.tokens_per_iteration)
    else:
        summary["ours"] = {"error": f"no metrics file {args.metrics} (training failed before its first log line)"}
    model = model_from_log(args.train_log)
    if model is not None:
        summary["model"] = model
    summary["peak_tflops_note"] = ("MFU = model TFLOP/s / dense bf16 peak of training/flops.py PEAK_TFLOPS "
                                   "(989.4 for H100 SXM / H200); FLOPs = training/flops.py closed form for both")
    peer = _load_json(args.peer)
    if peer is not None:
        summary["peer"] = peer
        summary["comparison"] = compare(summary["ours"], peer)
    kernels = _load_json(args.kernels)
    if kernels is not None:
        summary["kernels"] = kernels
    text = json.dumps(summary, indent=1)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    ours = summary["ours"]
    lines = [f"model: {json.dumps(model)}", f"ours: {json.dumps(ours)}"]
    if peer is not None:
        for key, res in (peer.get("results") or {}).items():
            lines.append(f"peer {key}: {json.dumps({k: v for k, v in res.items() if k != 'traceback'})}")
        if peer.get("error"):
            lines.append(f"peer error: {peer['error']}")
        lines.append(f"comparison: {json.dumps(summary.get('comparison', {}))}")
    print("\n".join(lines))
    return 0 if "error" not in ours else 1


if __name__ == "__main__":
    sys.exit(main())
