"""tools/preprocess_data.py end to end: Megatron file names and layout, identical output for any worker count."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import numpy as np
from data_helpers import PYTHON, REPO_ROOT, python_env

from megatron_hybrid.data import IndexedDataset
from megatron_hybrid.data.preprocess import preprocess_jsonl
from megatron_hybrid.tokenizers import build_tokenizer


def _run(jsonl: Path, bpe_dir: Path, prefix: Path, workers: int) -> subprocess.CompletedProcess:
    cmd = [PYTHON, str(REPO_ROOT / "tools" / "preprocess_data.py"), "--input", str(jsonl), "--json-keys", "text",
           "title", "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(bpe_dir), "--append-eod",
           "--workers", str(workers), "--chunksize", "7", "--log-interval", "50", "--output-prefix", str(prefix)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=python_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_end_to_end_one_and_two_workers_identical(tmp_path: Path, jsonl_corpus: Path, bpe_dir: Path,
                                                   mcore: object) -> None:
    one = _run(jsonl_corpus, bpe_dir, tmp_path / "w1" / "corpus", workers=1)
    _run(jsonl_corpus, bpe_dir, tmp_path / "w2" / "corpus", workers=2)
    assert "Processed 50 documents" in one.stderr and "Processed 100 documents" in one.stderr
    assert "Done: 120 documents" in one.stderr
    for key in ("text", "title"):
        for ext in (".bin", ".idx"):
            name = f"corpus_{key}_document{ext}"
            assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name

    tok = build_tokenizer("HuggingFaceTokenizer", str(bpe_dir))
    lines = [json.loads(x) for x in jsonl_corpus.read_text(encoding="utf-8").splitlines()]
    prefix = str(tmp_path / "w1" / "corpus_text_document")
    ours = IndexedDataset(prefix)
    theirs = mcore.indexed_dataset.IndexedDataset(prefix)  # type: ignore[attr-defined]
    assert len(ours) == len(theirs) == len(lines) and ours.dtype == np.uint16
    np.testing.assert_array_equal(ours.document_indices, np.arange(len(lines) + 1))
    for i, obj in enumerate(lines):
        want = tok.tokenize(obj["text"]) + [tok.eod]
        assert ours[i].tolist() == want
        np.testing.assert_array_equal(theirs[i], ours[i])
    assert tok.detokenize(ours[3][:-1]) == lines[3]["text"]


def test_in_process_api_multiple_files_and_gpt2_bpe(tmp_path: Path, jsonl_corpus: Path, bpe_dir: Path) -> None:
    head = tmp_path / "head.jsonl"
    head.write_text("".join(jsonl_corpus.read_text(encoding="utf-8").splitlines(keepends=True)[:5]), "utf-8")
    kwargs = {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": str(bpe_dir / "vocab.json"),
              "merge_file": str(bpe_dir / "merges.txt")}
    log = io.StringIO()
    stats = preprocess_jsonl([str(head), str(head)], str(tmp_path / "two"), kwargs, log_interval=2, log_file=log)
    assert stats.documents == 10 and stats.skipped == 0 and "Processed 2 documents" in log.getvalue()
    ds = IndexedDataset(str(tmp_path / "two_text_document"))
    assert len(ds) == 10
    for i in range(5):
        np.testing.assert_array_equal(ds[i], ds[i + 5])  # the two files in order, no EOD without --append-eod
    hf = build_tokenizer("HuggingFaceTokenizer", str(bpe_dir))
    first = json.loads(head.read_text(encoding="utf-8").splitlines()[0])["text"]
    assert ds[0].tolist() == hf.tokenize(first)


def test_bounded_imap_keeps_order_across_blocks() -> None:
    import multiprocessing

    from megatron_hybrid.data import preprocess

    items = [(i + 1, 10 * i, f'{{"text": "{i} {i}"}}\n'.encode()) for i in range(23)]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2, initializer=preprocess._init_worker,
                  initargs=({"tokenizer_type": "NullTokenizer", "vocab_size": 50}, ["text"], True, np.uint16)) as pool:
        out = list(preprocess._bounded_imap(pool, iter(items), chunksize=2, block=5))
    assert [r[0] for r in out] == list(range(1, 24))
    assert [r[3][0].tolist() for r in out] == [[i, i, 49] for i in range(23)]
