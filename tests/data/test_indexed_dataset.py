"""Indexed dataset: round trip, the API surface, atomic writes, and byte compatibility with megatron-core."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_hybrid.data import IndexedDataset, IndexedDatasetBuilder
from megatron_hybrid.data.indexed_dataset import HEADER_SIZE, INDEX_MAGIC, dtype_code, optimal_dtype


def _docs(seed: int = 0) -> list[list[np.ndarray]]:
    """Documents made of 1-3 sequences of random length (some empty)."""
    rng = np.random.default_rng(seed)
    return [[rng.integers(0, 60000, size=int(rng.integers(0, 40))) for _ in range(int(rng.integers(1, 4)))]
            for _ in range(25)]


def _write(prefix: str, docs: list[list[np.ndarray]], dtype: type, use_items: bool) -> None:
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        if use_items:
            for seq in doc:
                builder.add_item(torch.from_numpy(seq))  # torch tensors are accepted too
            builder.end_document()
        else:
            builder.add_document(np.concatenate(doc), [len(s) for s in doc])
    builder.finalize(prefix + ".idx")


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64])
@pytest.mark.parametrize("use_items", [True, False])
def test_round_trip(tmp_path: Path, dtype: type, use_items: bool) -> None:
    docs = _docs()
    prefix = str(tmp_path / "ds")
    _write(prefix, docs, dtype, use_items)
    seqs = [s for doc in docs for s in doc]
    ds = IndexedDataset(prefix)
    assert len(ds) == len(seqs)
    assert ds.dtype == dtype
    np.testing.assert_array_equal(ds.sequence_lengths, [len(s) for s in seqs])
    expected_docs = np.cumsum([0] + [len(d) for d in docs])
    np.testing.assert_array_equal(ds.document_indices, expected_docs)
    starts = np.concatenate([[0], np.cumsum([len(s) for s in seqs])[:-1]])
    np.testing.assert_array_equal(ds.sequence_pointers, starts * np.dtype(dtype).itemsize)
    for i, s in enumerate(seqs):
        np.testing.assert_array_equal(ds[i], s)
        assert ds[i].dtype == dtype
    np.testing.assert_array_equal(ds[-1], seqs[-1])
    for got, want in zip(ds[3:11], seqs[3:11]):
        np.testing.assert_array_equal(got, want)
    assert ds[5:5] == []
    longest = int(np.argmax(ds.sequence_lengths))
    np.testing.assert_array_equal(ds.get(longest, offset=2, length=5), seqs[longest][2:7])
    np.testing.assert_array_equal(ds.get(longest, offset=3), seqs[longest][3:])
    assert ds.num_tokens == sum(len(s) for s in seqs)
    assert IndexedDataset.exists(prefix) and not IndexedDataset.exists(prefix + "_nope")
    # pread path and pickling (DataLoader workers) give the same tokens
    for other in (IndexedDataset(prefix, mmap=False), pickle.loads(pickle.dumps(ds))):
        for i in (0, longest, len(seqs) - 1):
            np.testing.assert_array_equal(other[i], seqs[i])
        np.testing.assert_array_equal(other.get(longest, 1, 3), seqs[longest][1:4])


def test_index_errors_and_bounds(tmp_path: Path) -> None:
    prefix = str(tmp_path / "ds")
    _write(prefix, [[np.arange(5)]], np.uint16, False)
    ds = IndexedDataset(prefix)
    with pytest.raises(IndexError, match="out of range"):
        ds[1]
    with pytest.raises(IndexError, match="outside sequence 0 of length 5"):
        ds.get(0, offset=3, length=4)
    with pytest.raises(ValueError, match="contiguous"):
        ds[0:1:2]
    with pytest.raises(TypeError):
        ds["0"]  # type: ignore[index]
    with pytest.raises(FileNotFoundError, match="missing"):
        IndexedDataset(str(tmp_path / "absent"))


def test_multimodal_modes_and_add_index(tmp_path: Path) -> None:
    a, b, merged = (str(tmp_path / n) for n in ("a", "b", "merged"))
    for prefix, base in ((a, 0), (b, 100)):
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32, multimodal=True)
        builder.add_item(np.arange(base, base + 3), mode=1)
        builder.add_item(np.arange(base, base + 2), mode=2)
        builder.end_document()
        builder.add_document(np.arange(base, base + 4), [1, 3], modes=[3, 4])
        builder.finalize(prefix + ".idx")
    builder = IndexedDatasetBuilder(merged + ".bin", dtype=np.int32, multimodal=True)
    builder.add_index(a)
    builder.add_index(b)
    builder.finalize(merged + ".idx")
    ds = IndexedDataset(merged, multimodal=True)
    assert len(ds) == 8
    np.testing.assert_array_equal(ds.sequence_modes, [1, 2, 3, 4, 1, 2, 3, 4])
    np.testing.assert_array_equal(ds.document_indices, [0, 2, 4, 6, 8])
    tokens, mode = ds[4]
    np.testing.assert_array_equal(tokens, [100, 101, 102])
    assert mode == 1
    # Opened without the flag, the modes are ignored (as Megatron does) and items are plain arrays.
    np.testing.assert_array_equal(IndexedDataset(merged)[7], [101, 102, 103])
    with pytest.raises(AttributeError, match="multimodal"):
        _ = IndexedDataset(merged).sequence_modes


def test_writes_are_atomic(tmp_path: Path) -> None:
    prefix = str(tmp_path / "ds")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    builder.add_document(np.arange(10), [10])
    assert not os.path.exists(prefix + ".bin") and not os.path.exists(prefix + ".idx")
    builder.finalize(prefix + ".idx")
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]  # no temporary left behind

    with pytest.raises(RuntimeError, match="boom"):
        with IndexedDatasetBuilder(str(tmp_path / "x.bin"), dtype=np.uint16) as b2:
            b2.add_document(np.arange(3), [3])
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]

    with pytest.raises(ValueError, match="do not fit"):
        IndexedDatasetBuilder(str(tmp_path / "y.bin"), dtype=np.uint16).add_item(np.array([70000]))
    with pytest.raises(ValueError, match="cannot be stored"):
        dtype_code(np.complex64)


def test_optimal_dtype_matches_megatron(mcore: object) -> None:
    DType = mcore.indexed_dataset.DType  # type: ignore[attr-defined]
    for vocab in (None, 100, 65499, 65500, 200000):
        assert optimal_dtype(vocab) == DType.optimal_dtype(vocab)
    for code, dt in ((1, np.uint8), (4, np.int32), (8, np.uint16), (6, np.float64)):
        assert dtype_code(dt) == code == DType.code_from_dtype(dt)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_ours_read_by_megatron_and_byte_identical(tmp_path: Path, mcore: object, dtype: type) -> None:
    docs = _docs(1)
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    _write(ours, docs, dtype, use_items=False)
    mid = mcore.indexed_dataset  # type: ignore[attr-defined]
    mb = mid.IndexedDatasetBuilder(theirs + ".bin", dtype=dtype)
    for doc in docs:
        mb.add_document(np.concatenate(doc).astype(np.int64), [len(s) for s in doc])
    mb.finalize(theirs + ".idx")
    for ext in (".bin", ".idx"):
        assert Path(ours + ext).read_bytes() == Path(theirs + ext).read_bytes(), ext

    m = mid.IndexedDataset(ours)
    seqs = [s for doc in docs for s in doc]
    assert len(m) == len(seqs)
    np.testing.assert_array_equal(m.document_indices, IndexedDataset(ours).document_indices)
    for i, s in enumerate(seqs):
        np.testing.assert_array_equal(m[i], s)
    i = int(np.argmax(m.sequence_lengths))
    np.testing.assert_array_equal(m.get(i, offset=1, length=4), seqs[i][1:5])


def test_megatron_written_read_by_ours(tmp_path: Path, mcore: object) -> None:
    mid = mcore.indexed_dataset  # type: ignore[attr-defined]
    prefix = str(tmp_path / "m")
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, 2**31 - 1, size=int(rng.integers(1, 30))) for _ in range(40)]
    mb = mid.IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32, multimodal=True)
    for k, s in enumerate(seqs):
        mb.add_item(torch.from_numpy(s), mode=k % 3)
        if k % 4 == 3:
            mb.end_document()
    mb.finalize(prefix + ".idx")
    ds = IndexedDataset(prefix, multimodal=True)
    assert len(ds) == 40 and ds.dtype == np.int32
    np.testing.assert_array_equal(ds.document_indices, np.arange(0, 41, 4))
    np.testing.assert_array_equal(ds.sequence_modes, [k % 3 for k in range(40)])
    for k, s in enumerate(seqs):
        tokens, mode = ds[k]
        np.testing.assert_array_equal(tokens, s)
        assert mode == k % 3
    raw = Path(prefix + ".idx").read_bytes()
    assert raw[:9] == INDEX_MAGIC and len(raw) == HEADER_SIZE + 40 * (4 + 8 + 1) + 11 * 8
