"""Bad input is reported with the file and the position (byte offset / line number), never silently used."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from data_helpers import PYTHON, REPO_ROOT, python_env, write_dataset

from megatron_hybrid.data import IndexedDataset, IndexedDatasetError
from megatron_hybrid.data.indexed_dataset import HEADER_SIZE
from megatron_hybrid.data.preprocess import PreprocessError, preprocess_jsonl

N_SEQ = 5  # sequences of the fixture dataset


@pytest.fixture
def good(tmp_path: Path) -> str:
    return write_dataset(tmp_path / "good", [np.arange(i + 2) for i in range(N_SEQ)], np.uint16)


def _patch(path: str, offset: int, data: bytes) -> None:
    raw = bytearray(Path(path).read_bytes())
    raw[offset:offset + len(data)] = data
    Path(path).write_bytes(bytes(raw))


def _truncate(path: str, size: int) -> None:
    raw = Path(path).read_bytes()
    Path(path).write_bytes(raw[:size])


def _expect(prefix: str, *fragments: str) -> IndexedDatasetError:
    with pytest.raises(IndexedDatasetError) as info:
        IndexedDataset(prefix)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    return info.value


def test_wrong_magic(good: str) -> None:
    _patch(good + ".idx", 0, b"NOTMAGIC\x00")
    err = _expect(good, good + ".idx", "byte offset 0", "bad magic")
    assert err.path == good + ".idx" and err.offset == 0


def test_wrong_version(good: str) -> None:
    _patch(good + ".idx", 9, struct.pack("<Q", 2))
    _expect(good, good + ".idx", "byte offset 9", "unsupported index version 2")


def test_wrong_dtype_code(good: str) -> None:
    _patch(good + ".idx", 17, bytes([42]))
    _expect(good, "byte offset 17", "unknown dtype code 42")


@pytest.mark.parametrize("size, where", [(0, "truncated header"), (20, "truncated header"),
                                         (HEADER_SIZE + 6, "inside the sequence lengths"),
                                         (HEADER_SIZE + 4 * N_SEQ + 3, "inside the sequence pointers"),
                                         (HEADER_SIZE + 12 * N_SEQ + 8, "inside the document indices")])
def test_truncated_index(good: str, size: int, where: str) -> None:
    _truncate(good + ".idx", size)
    _expect(good, good + ".idx", f"byte offset {size}", where)


def test_index_with_trailing_garbage(good: str) -> None:
    size = os.path.getsize(good + ".idx")
    with open(good + ".idx", "ab") as f:
        f.write(b"\x01\x02\x03")
    _expect(good, f"byte offset {size}", "3 unexpected trailing bytes")


def test_corrupted_pointer(good: str) -> None:
    pointer_2 = HEADER_SIZE + 4 * N_SEQ + 8 * 2
    _patch(good + ".idx", pointer_2, struct.pack("<q", 12345))
    _expect(good, f"byte offset {pointer_2}", "sequence 2 points to byte 12345")


def test_corrupted_length(good: str) -> None:
    _patch(good + ".idx", HEADER_SIZE + 4, struct.pack("<i", -7))
    _expect(good, f"byte offset {HEADER_SIZE + 4}", "sequence 1 has negative length -7")


def test_corrupted_document_indices(good: str) -> None:
    docs_off = HEADER_SIZE + 12 * N_SEQ
    _patch(good + ".idx", docs_off + 8 * N_SEQ, struct.pack("<q", 99))  # last entry must equal N_SEQ
    _expect(good, f"byte offset {docs_off + 8 * N_SEQ}", "last document index is 99")


def test_truncated_and_padded_bin(good: str) -> None:
    size = os.path.getsize(good + ".bin")
    _truncate(good + ".bin", size - 3)
    _expect(good, good + ".bin", f"byte offset {size - 3}", "data file truncated", f"{size} bytes")
    Path(good + ".bin").write_bytes(b"\x00" * (size + 4))
    _expect(good, good + ".bin", "trailing bytes")


# ---------------------------------------------------------------------------------------------------------- JSONL
NULL_TOK = {"tokenizer_type": "NullTokenizer", "vocab_size": 1000}

BAD_LINES = {
    "invalid JSON": b'{"text": "1 2",,}\n',
    "not valid UTF-8": b'{"text": "1 \xff 2"}\n',
    "missing JSON key 'text'": b'{"body": "1 2"}\n',
    "empty document: key 'text' tokenizes to no tokens": b'{"text": "   "}\n',
    "empty line": b"\n",
    "expected a JSON object, got list": b"[1, 2]\n",
    "value of key 'text' is int, expected a string": b'{"text": 5}\n',
    "cannot tokenize key 'text'": b'{"text": "one two"}\n',
}


def _jsonl(tmp_path: Path, bad: bytes, position: int = 2) -> tuple[Path, int]:
    """Four good lines with ``bad`` at index ``position``; returns the path and the bad line's byte offset."""
    lines = [json.dumps({"text": f"{i} {i + 1} {i + 2}"}).encode() + b"\n" for i in range(4)]
    lines.insert(position, bad)
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(lines))
    return path, sum(len(x) for x in lines[:position])


@pytest.mark.parametrize("reason", list(BAD_LINES))
def test_bad_jsonl_line_is_located(tmp_path: Path, reason: str) -> None:
    path, offset = _jsonl(tmp_path, BAD_LINES[reason])
    out = tmp_path / "out" / "ds"
    with pytest.raises(PreprocessError) as info:
        preprocess_jsonl(str(path), str(out), NULL_TOK, append_eod=True, log_file=io.StringIO())
    msg = str(info.value)
    assert msg.startswith(f"{path}:3 (byte offset {offset}): "), msg
    assert reason in msg
    assert (info.value.lineno, info.value.byte_offset) == (3, offset)
    assert not any(p.suffix in (".bin", ".idx") for p in (tmp_path / "out").iterdir())  # nothing half-written


def test_bad_lines_reported_by_workers_too(tmp_path: Path) -> None:
    path, offset = _jsonl(tmp_path, BAD_LINES["missing JSON key 'text'"], position=4)
    with pytest.raises(PreprocessError, match=rf":5 \(byte offset {offset}\): missing JSON key"):
        preprocess_jsonl(str(path), str(tmp_path / "ds"), NULL_TOK, workers=2, chunksize=1, log_file=io.StringIO())


def test_skip_bad_lines_counts_and_reports(tmp_path: Path) -> None:
    good = [json.dumps({"text": f"{i} {i}"}).encode() + b"\n" for i in range(6)]
    bad = list(BAD_LINES.values())
    mixed = [x for pair in zip(good, bad) for x in pair] + bad[len(good):]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(mixed))
    stats = preprocess_jsonl(str(path), str(tmp_path / "ds"), NULL_TOK, append_eod=True, skip_bad_lines=True,
                             log_file=io.StringIO())
    assert stats.documents == 6 and stats.skipped == len(BAD_LINES)
    assert any(":2 (byte offset" in m and "invalid JSON" in m for m in stats.skipped_messages)
    ds = IndexedDataset(str(tmp_path / "ds_text_document"))
    assert [x.tolist() for x in ds[0:6]] == [[i, i, 999] for i in range(6)]


def test_cli_reports_error_and_skips(tmp_path: Path) -> None:
    path, offset = _jsonl(tmp_path, BAD_LINES["invalid JSON"], position=1)
    cmd = [PYTHON, str(REPO_ROOT / "tools" / "preprocess_data.py"), "--input", str(path), "--output-prefix",
           str(tmp_path / "ds"), "--tokenizer-type", "NullTokenizer", "--vocab-size", "1000"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=python_env(), timeout=120)
    assert proc.returncode == 1
    assert f"error: {path}:2 (byte offset {offset}): invalid JSON" in proc.stderr
    assert not (tmp_path / "ds_text_document.bin").exists()
    proc = subprocess.run(cmd + ["--skip-bad-lines"], capture_output=True, text=True, env=python_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Skipped 1 bad line(s)." in proc.stderr and f"{path}:2 (byte offset {offset})" in proc.stderr
    assert len(IndexedDataset(str(tmp_path / "ds_text_document"))) == 4
