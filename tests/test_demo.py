"""``make demo`` (megatron_hybrid.demo): the quick end-to-end run in a subprocess, and its pieces in-process."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_hybrid import demo

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run_demo(*args: str, timeout: float = 240.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-m", "megatron_hybrid.demo", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_quick_demo_end_to_end_and_cache_reuse(tmp_path: Path) -> None:
    work = tmp_path / "work"
    result = _run_demo("--quick", "--work-dir", str(work), "--seed", "3")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    run_dir = work / "run-quick"

    # checkpoint: tracker + a complete iteration directory (with the tokenizer copy)
    iteration = int((run_dir / "latest_checkpointed_iteration.txt").read_text().strip())
    assert iteration == demo.QUICK.train_iters
    ckpt = run_dir / f"iter_{iteration:07d}"
    assert (ckpt / "metadata.json").is_file()
    assert any(p.suffix == ".safetensors" and p.name.startswith("model_") for p in ckpt.iterdir())
    assert (ckpt / "tokenizer" / "tokenizer.json").is_file()

    # loss curve beside it: a real PNG
    png = run_dir / "loss_curve.png"
    data = png.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE)

    # the loss fell, from about ln(V)
    summary = json.loads((run_dir / "summary.json").read_text())
    losses = summary["losses"]
    assert math.isclose(losses["ln_vocab"], math.log(demo.QUICK.vocab_size), rel_tol=1e-6)
    assert abs(losses["start"] - losses["ln_vocab"]) < 1.0
    assert losses["end"] < losses["start"] - 0.3, losses
    train = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"]
    assert len(train) == demo.QUICK.train_iters  # one record per iteration
    assert f"start {losses['start']:.3f}" in out and f"ln V = {losses['ln_vocab']:.3f}" in out

    # a generation was printed and saved
    sample = (run_dir / "sample.txt").read_text()
    continuation = summary["sample"]["continuation"]
    assert summary["sample"]["num_tokens"] > 0 and continuation
    assert summary["sample"]["prompt"] + continuation in sample
    assert summary["sample"]["prompt"] + continuation in out
    assert "fallback" not in summary["sample"]["method"], summary["sample"]["method"]

    # progress display: plain lines (not a TTY here) with iteration, loss, tokens/s and ETA
    progress = [line for line in out.splitlines() if line.startswith("iter ")]
    assert progress and all(k in progress[-1] for k in ("loss", "tok/s", "ETA"))
    assert f"{demo.QUICK.train_iters}/{demo.QUICK.train_iters}" in progress[-1]
    for name in ("checkpoint", "loss curve", "metrics"):
        assert any(line.startswith(name) for line in out.splitlines()), name

    # second run: corpus, tokenizer and dataset come from the cache; the run directory starts over
    again = _run_demo("--quick", "--work-dir", str(work), "--iters", "2")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for stage in ("corpus", "tokenizer", "dataset"):
        assert any(line.startswith(stage) and "reused" in line for line in again.stdout.splitlines()), stage
    assert (run_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert not ckpt.exists()


def test_stdlib_corpus_files_are_deterministic_and_filtered(tmp_path: Path) -> None:
    files = demo.stdlib_source_files()
    assert files == demo.stdlib_source_files()
    assert "os.py" in files and all(f.endswith(".py") for f in files)
    for f in files:
        assert not set(Path(f).parts[:-1]) & demo.EXCLUDED_DIRS, f
    root = demo.stdlib_root()
    assert sum(os.path.getsize(os.path.join(root, f)) for f in files) >= 5_000_000

    subset = demo.stdlib_source_files(max_bytes=100_000)
    assert subset == files[: len(subset)]
    manifest = demo.build_corpus(str(tmp_path / "c.jsonl"), max_bytes=100_000)
    lines = (tmp_path / "c.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == manifest["documents"] > 0
    first = json.loads(lines[0])
    assert first["path"] == subset[0]
    with open(os.path.join(root, subset[0]), encoding="utf-8") as f:
        assert first["text"] == f.read()


@pytest.mark.parametrize("is_tty", [True, False])
def test_progress_display(is_tty: bool) -> None:
    stream = io.StringIO()
    display = demo.ProgressDisplay(stream, is_tty=is_tty, plain_every=5)
    for i in range(1, 11):
        display({"iteration": i, "train_iters": 10, "lm_loss": 8.0 - 0.1 * i, "lr": 1e-3, "tokens_per_sec": 1234.0,
                 "elapsed_s": float(i), "eta_s": float(10 - i)})
    display.close()
    text = stream.getvalue()
    if is_tty:  # one line rewritten in place, ended once
        assert text.count("\r") == 10 and text.count("\n") == 1 and text.endswith("\n")
    else:  # iterations 1, 5 and 10 as plain lines
        lines = text.splitlines()
        assert len(lines) == 3 and "\r" not in text
        assert lines[-1].startswith("iter 10/10") and "1,234 tok/s" in lines[-1] and "ETA 0:00" in lines[-1]


def test_plot_loss_curve_writes_png(tmp_path: Path) -> None:
    path = tmp_path / "loss.png"
    losses = [8.3 - 0.01 * i for i in range(200)]
    demo.plot_loss_curve(str(path), losses, ln_vocab=math.log(4096), valid_loss=6.5, title="t")
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert not [p for p in tmp_path.iterdir() if p.name != "loss.png"]  # no temporary file left behind


def test_run_dir_not_created_by_the_demo_is_never_wiped(tmp_path: Path) -> None:
    precious = tmp_path / "run"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not created by the demo"):
        demo._prepare_run_dir(str(precious))
    assert (precious / "keep.txt").read_text() == "mine"


def test_split_trailing_spaces() -> None:
    assert demo.split_trailing_spaces("def ") == ("def", " ")
    assert demo.split_trailing_spaces("x =  ") == ("x =", "  ")
    assert demo.split_trailing_spaces("def") == ("def", "")
    assert demo.split_trailing_spaces("   ") == ("   ", "")
    assert demo.split_trailing_spaces("") == ("", "")
