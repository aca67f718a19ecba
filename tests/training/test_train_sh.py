"""examples/mamba/train.sh and the multi-node / SLURM examples: syntax, the options they build (checked by the real
parser, and against the model presets), and a real 30-iteration CPU run of the tiny model on stdlib text."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
from training_helpers import REPO_ROOT, stdlib_documents

from megatron_hybrid.models.presets import PRESETS
from megatron_hybrid.training import parse_args, resolve

SCRIPTS = ["examples/mamba/train.sh", "examples/mamba/train_multinode.sh", "examples/mamba/train.sbatch"]
TRAIN_SH = str(REPO_ROOT / "examples/mamba/train.sh")


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_valid_bash(script: str) -> None:
    subprocess.run(["bash", "-n", str(REPO_ROOT / script)], check=True)
    shellcheck = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
    if os.path.exists(shellcheck):
        result = subprocess.run([shellcheck, str(REPO_ROOT / script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout


def _dry_run(scale: str, *extra: str, env: dict[str, str] | None = None) -> list[str]:
    environ = dict(os.environ, MODEL_SCALE=scale, DRY_RUN="1", NPROC="1", HAS_GPU="0", PYTHON=sys.executable,
                   **(env or {}))
    out = subprocess.run(["bash", TRAIN_SH, "ck", "data/text_document", "tok.model", *extra], env=environ,
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if not line.startswith("train.sh:")]


def test_usage_and_bad_scale() -> None:
    result = subprocess.run(["bash", TRAIN_SH], capture_output=True, text=True)
    assert result.returncode == 2 and "CHECKPOINT_DIR DATA_PATH TOKENIZER_PATH" in result.stderr
    result = subprocess.run(["bash", TRAIN_SH, "a", "b", "c"], capture_output=True, text=True,
                            env=dict(os.environ, MODEL_SCALE="70B", DRY_RUN="1", NPROC="1"))
    assert result.returncode == 2 and "invalid MODEL_SCALE '70B'" in result.stderr


@pytest.mark.parametrize("scale", ["800M", "8B"])
def test_recipes_are_megatrons_example(scale: str) -> None:
    argv = _dry_run(scale)
    run = parse_args(argv)
    t, p = run.training, run.parallel
    assert (t.lr, t.min_lr, t.lr_decay_style, t.weight_decay, t.clip_grad) == (2.5e-4, 2.5e-5, "cosine", 0.1, 1.0)
    assert (t.adam_beta1, t.adam_beta2, t.seq_length, t.micro_batch_size) == (0.9, 0.95, 4096, 4)
    assert (t.train_samples, t.lr_warmup_samples, t.lr_decay_samples) == (73242188, 50000, 73192188)
    assert t.tokenizer_type == "GPTSentencePieceTokenizer" and t.save == t.load == "ck"
    assert p.tensor_model_parallel_size == (4 if scale == "8B" else 1)
    assert t.global_batch_size == (8 if scale == "8B" else 32)
    ours = run.model_config(256000)
    preset = PRESETS[scale]()
    for f in dataclasses.fields(preset):
        if f.name not in ("sequence_parallel", "make_vocab_size_divisible_by"):
            assert getattr(ours, f.name) == getattr(preset, f.name), f.name
    assert ours.padded_vocab_size == preset.padded_vocab_size
    # reduced iterations for a benchmark replace the sample-based schedule instead of contradicting it
    short = parse_args(_dry_run(scale, "--train-iters", "20"))
    assert short.training.train_iters == 20 and short.training.train_samples is None
    assert resolve(short, 8 if scale == "8B" else 1).train_iters == 20


def test_tiny_recipe_is_the_tiny_preset() -> None:
    run = parse_args(_dry_run("tiny") + ["--tokenizer-type", "NullTokenizer", "--vocab-size", "512"])
    ours = run.model_config(512)
    preset = PRESETS["tiny"]()
    for f in dataclasses.fields(preset):
        if f.name not in ("vocab_size", "make_vocab_size_divisible_by", "max_position_embeddings"):
            assert getattr(ours, f.name) == getattr(preset, f.name), f.name


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_train_sh_tiny_cpu_run_loss_decreases(tmp_path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for doc in stdlib_documents(150, max_chars=6000):
            f.write(json.dumps({"text": doc.decode("utf-8")}) + "\n")
    py = sys.executable
    subprocess.run([py, str(REPO_ROOT / "tools/train_tokenizer.py"), "--input", str(corpus), "--vocab-size", "1024",
                    "--output", str(tmp_path / "tok")], check=True, capture_output=True)
    subprocess.run([py, str(REPO_ROOT / "tools/preprocess_data.py"), "--input", str(corpus), "--output-prefix",
                    str(tmp_path / "stdlib"), "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                    str(tmp_path / "tok"), "--append-eod", "--log-interval", "0"], check=True, capture_output=True)
    env = dict(os.environ, NPROC="1", HAS_GPU="0", PYTHON=py, TRITON_CACHE_DIR=str(tmp_path / "triton"),
               OMP_NUM_THREADS="2")
    env.pop("MODEL_SCALE", None)
    result = subprocess.run(
        ["bash", TRAIN_SH, str(tmp_path / "ck"), str(tmp_path / "stdlib_text_document"), str(tmp_path / "tok"),
         "--train-iters", "30", "--seq-length", "128", "--max-position-embeddings", "128", "--micro-batch-size", "4",
         "--global-batch-size", "4", "--lr-warmup-iters", "3", "--log-interval", "5", "--eval-interval", "30",
         "--eval-iters", "2", "--save-interval", "30", "--lr", "2e-3"],
        env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in open(tmp_path / "ck" / "metrics.jsonl", encoding="utf-8")]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["iteration"] for r in train] == [5, 10, 15, 20, 25, 30]
    assert train[0]["lm_loss"] < math.log(1024) + 0.5
    assert train[-1]["lm_loss"] < train[0]["lm_loss"] - 1.0, [r["lm_loss"] for r in train]
    assert (tmp_path / "ck" / "iter_0000030" / "metadata.json").exists()
    assert any(r["kind"] == "valid" for r in records)
