"""Exact resume for real: a training process killed with SIGKILL right after a checkpoint appears, resumed from it,
logs bitwise-identical lm_loss (and grad norm, lr) for every later iteration compared with an uninterrupted run.
Also: a TP=2 run's checkpoint loads for inference at TP=1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from training_helpers import REPO_ROOT, run_flags

from megatron_hybrid.checkpoint import load_model_for_inference, read_tracker
from megatron_hybrid.parallel.sharding import gather_full_state_dict
from megatron_hybrid.parallel.testing import run_distributed
from megatron_hybrid.training import pretrain

ITERS = 48


def _flags(data: str, save: str, metrics: str) -> list[str]:
    # dropout on: the resumed run must also continue the RNG stream exactly
    return run_flags(data, iters=ITERS, extra=[
        "--save", save, "--save-interval", "8", "--metrics-jsonl", metrics, "--hidden-dropout", "0.1",
        "--attention-dropout", "0.1", "--eval-iters", "1", "--eval-interval", "4", "--split", "90,10,0"])


def _env(tmp_path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0", TRITON_CACHE_DIR=str(tmp_path / "triton"))
    env.pop("WORLD_SIZE", None)
    return env


def _records(path) -> dict[int, dict]:
    lines = [json.loads(line) for line in open(path, encoding="utf-8")]
    return {r["iteration"]: r for r in lines if r["kind"] == "train"}


def test_sigkill_then_resume_is_bitwise_identical(byte_data: str, tmp_path) -> None:
    script = [sys.executable, str(REPO_ROOT / "pretrain_mamba.py")]
    env = _env(tmp_path)
    full = tmp_path / "full"
    subprocess.run(script + _flags(byte_data, str(full), str(full / "m.jsonl")), check=True, env=env,
                   capture_output=True, timeout=600)
    reference = _records(full / "m.jsonl")
    assert sorted(reference) == list(range(1, ITERS + 1))

    killed = tmp_path / "killed"
    argv = script + _flags(byte_data, str(killed), str(killed / "m.jsonl"))
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (killed / "latest_checkpointed_iteration.txt").exists():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    resumed_from = read_tracker(killed)
    assert 8 <= resumed_from < ITERS
    before = _records(killed / "m.jsonl")
    for it, record in before.items():  # what the killed run logged matches too
        assert record["lm_loss"] == reference[it]["lm_loss"], it

    subprocess.run(argv + ["--load", str(killed)], check=True, env=env, capture_output=True, timeout=600)
    after = _records(killed / "m.jsonl")
    assert sorted(after) == list(range(1, ITERS + 1))  # the log was cut back to the checkpoint, then continued
    for it in range(resumed_from + 1, ITERS + 1):
        for key in ("lm_loss", "grad_norm", "lr", "consumed_samples"):
            assert after[it][key] == reference[it][key], (it, key, after[it][key], reference[it][key])
    valid_full = [json.loads(x) for x in open(full / "m.jsonl") if '"valid"' in x]
    valid_resumed = [json.loads(x) for x in open(killed / "m.jsonl") if '"valid"' in x]
    assert valid_resumed == valid_full


def _train_tp2(rank: int, world_size: int, argv: list[str]) -> dict[str, torch.Tensor]:
    result = pretrain(argv)
    return {k: v.clone() for k, v in gather_full_state_dict(result.model, result.model.groups).items()}


def test_tp2_checkpoint_loads_at_tp1_for_inference(byte_data: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    save = tmp_path / "tp2"
    argv = run_flags(byte_data, iters=2, extra=["--tensor-model-parallel-size", "2", "--save", str(save)])
    full = run_distributed(_train_tp2, 2, argv, timeout=180)[0]
    model, config, tokenizer_args = load_model_for_inference(save)
    assert tokenizer_args["tokenizer_type"] == "NullTokenizer" and config.vocab_size == 257
    for name, value in model.state_dict().items():
        assert torch.equal(value, full[name]), name


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
