"""Megatron-LM compatible indexed dataset: a flat token file (``.bin``) plus an index (``.idx``).

Why this exists: pretraining corpora are tokenized once and then read randomly many times. A contiguous binary file
of token ids that is memory-mapped costs no parse time and no RAM, and the small index says where each sequence
starts. The byte layout is Megatron-LM's (``megatron.core.datasets.indexed_dataset``) so corpora prepared by either
project can be used by the other.

``.idx`` layout (all little endian)::

    offset 0   9 bytes   magic b"MMIDIDX\\x00\\x00"
    offset 9   u64       version (always 1)
    offset 17  u8        dtype code of the tokens in the .bin (see ``DTYPE_CODES``)
    offset 18  u64       sequence_count  (N)
    offset 26  u64       document_count  (D = number of documents + 1; the first entry is always 0)
    offset 34  i32[N]    sequence lengths in tokens
               i64[N]    sequence pointers: byte offset of each sequence in the .bin
               i64[D]    document indices: sequence index at which each document ends (prefix form, [0, ..., N])
               i8[N]     sequence modes (only for "multimodal" datasets)

``.bin`` layout: the tokens of every sequence back to back with the dtype of the header, no padding.

Unlike Megatron's reader, this one validates what it maps: a truncated or corrupted file raises
``IndexedDatasetError`` naming the file and the byte offset of the problem instead of returning garbage later.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

import numpy as np

__all__ = [
    "DTYPE_CODES",
    "HEADER_SIZE",
    "INDEX_MAGIC",
    "INDEX_VERSION",
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "IndexedDatasetError",
    "dtype_code",
    "dtype_from_code",
    "get_bin_path",
    "get_idx_path",
    "optimal_dtype",
]

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# magic (9) + version (8) + dtype code (1) + sequence count (8) + document count (8)
HEADER_SIZE = 34

# Megatron's DType enum: code -> numpy dtype. The codes are part of the on-disk format.
DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF_DTYPE: dict[np.dtype, int] = {np.dtype(t): c for c, t in DTYPE_CODES.items()}


class IndexedDatasetError(ValueError):
    """A ``.idx`` / ``.bin`` pair that cannot be read; carries the offending path and byte offset."""

    def __init__(self, path: str, offset: int | None, message: str) -> None:
        self.path = path
        self.offset = offset
        where = f"{path}" if offset is None else f"{path} at byte offset {offset}"
        super().__init__(f"{where}: {message}")


def get_idx_path(path_prefix: str) -> str:
    """Path of the index file of a dataset prefix (Megatron convention: ``prefix + '.idx'``)."""
    return path_prefix + ".idx"


def get_bin_path(path_prefix: str) -> str:
    """Path of the token file of a dataset prefix (Megatron convention: ``prefix + '.bin'``)."""
    return path_prefix + ".bin"


def dtype_code(dtype: Any) -> int:
    """On-disk code of a numpy dtype; raises ``ValueError`` for dtypes the format cannot store."""
    dt = np.dtype(dtype)
    if dt not in _CODE_OF_DTYPE:
        raise ValueError(f"dtype {dt} cannot be stored in an indexed dataset; use one of "
                         f"{sorted(str(np.dtype(t)) for t in DTYPE_CODES.values())}")
    return _CODE_OF_DTYPE[dt]


def dtype_from_code(code: int) -> type[np.number]:
    """numpy dtype of an on-disk code; raises ``ValueError`` for unknown codes."""
    if code not in DTYPE_CODES:
        raise ValueError(f"unknown dtype code {code}; valid codes are {sorted(DTYPE_CODES)}")
    return DTYPE_CODES[code]


def optimal_dtype(vocab_size: int | None) -> type[np.number]:
    """Smallest token dtype for a vocabulary, with Megatron's threshold (uint16 below 65500 ids, else int32).

    Using the same rule as Megatron's ``DType.optimal_dtype`` makes our ``.bin`` files byte-identical to the ones its
    ``preprocess_data.py`` writes for the same tokens.
    """
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def _tmp_path(path: str) -> str:
    """Sibling temporary name used until a file is complete; the rename makes it appear atomically."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.tmp.{os.getpid()}")


def _as_array(values: Any, dtype: Any) -> np.ndarray:
    """Token container (list, numpy array, CPU torch tensor) -> 1-D numpy array of ``dtype``, checking range."""
    if hasattr(values, "detach") and hasattr(values, "cpu"):  # torch.Tensor without importing torch
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    target = np.dtype(dtype)
    if arr.size and arr.dtype != target and np.issubdtype(target, np.integer):
        info = np.iinfo(target)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < info.min or hi > info.max:
            raise ValueError(f"token ids in [{lo}, {hi}] do not fit the dataset dtype {target}")
    return arr.astype(target, copy=False)


class IndexedDatasetBuilder:
    """Writes a ``.bin`` / ``.idx`` pair, readable by this module and by Megatron-LM.

    API mirrors Megatron's ``IndexedDatasetBuilder``: ``add_item`` appends one sequence, ``end_document`` closes a
    document made of the items added since the last one, ``add_document`` appends a whole document at once,
    ``add_index`` appends another dataset, ``finalize(idx_path)`` writes the index.

    Writes are atomic: tokens go to a hidden temporary file next to ``bin_path`` and both files are renamed into
    place only by ``finalize`` (``.bin`` first, then ``.idx``), so a crash or an ``abort()`` never leaves a
    half-written dataset that looks valid. Usable as a context manager: an exception inside the block aborts.
    """

    def __init__(self, bin_path: str, dtype: Any = np.int32, multimodal: bool = False) -> None:
        self.bin_path = bin_path
        self.dtype = np.dtype(dtype).type
        self._code = dtype_code(self.dtype)
        self.multimodal = multimodal
        self.sequence_lengths: list[int] = []
        self.document_indices: list[int] = [0]
        self.sequence_modes: list[int] | None = [] if multimodal else None
        self._tmp_bin = _tmp_path(bin_path)
        self._data_file = open(self._tmp_bin, "wb")  # noqa: SIM115 - closed in finalize/abort
        self._finalized = False

    # -- appending ------------------------------------------------------------------------------------------------
    def add_item(self, tokens: Any, mode: int = 0) -> None:
        """Append one sequence (call ``end_document`` to close the document it belongs to)."""
        arr = _as_array(tokens, self.dtype)
        self._data_file.write(arr.tobytes(order="C"))
        self.sequence_lengths.append(int(arr.size))
        if self.sequence_modes is not None:
            self.sequence_modes.append(int(mode))

    def end_document(self) -> None:
        """Close the current document: the sequences added since the previous one form a document."""
        self.document_indices.append(len(self.sequence_lengths))

    def add_document(self, tokens: Any, lengths: Sequence[int], modes: Sequence[int] | None = None) -> None:
        """Append a whole document: ``tokens`` is the concatenation of sequences whose sizes are ``lengths``."""
        arr = _as_array(tokens, self.dtype)
        lengths = [int(n) for n in lengths]
        if sum(lengths) != arr.size:
            raise ValueError(f"document lengths sum to {sum(lengths)} but {arr.size} tokens were given")
        self._data_file.write(arr.tobytes(order="C"))
        self.sequence_lengths.extend(lengths)
        self.document_indices.append(len(self.sequence_lengths))
        if self.sequence_modes is not None:
            self.sequence_modes.extend([int(m) for m in modes] if modes is not None else [0] * len(lengths))

    def add_index(self, path_prefix: str) -> None:
        """Append every sequence and document of another dataset (same dtype) to this one."""
        other = IndexedDataset(path_prefix, multimodal=self.multimodal)
        if np.dtype(other.dtype) != np.dtype(self.dtype):
            raise ValueError(f"cannot append {path_prefix} of dtype {np.dtype(other.dtype)} to a builder of dtype "
                             f"{np.dtype(self.dtype)}")
        offset = len(self.sequence_lengths)
        self.sequence_lengths.extend(other.sequence_lengths.tolist())
        self.document_indices.extend((other.document_indices[1:] + offset).tolist())
        if self.sequence_modes is not None:
            self.sequence_modes.extend(other.sequence_modes.tolist())
        with open(get_bin_path(path_prefix), "rb") as f:
            while chunk := f.read(1 << 24):
                self._data_file.write(chunk)
        other.close()

    # -- completion -----------------------------------------------------------------------------------------------
    def finalize(self, idx_path: str) -> None:
        """Write the index and atomically publish both files."""
        if self._finalized:
            raise RuntimeError("finalize() was already called")
        self._data_file.close()
        if self.document_indices[-1] != len(self.sequence_lengths):
            # Megatron requires the last document to end at the last sequence; close a dangling one.
            self.document_indices.append(len(self.sequence_lengths))
        tmp_idx = _tmp_path(idx_path)
        try:
            write_index(tmp_idx, self.dtype, self.sequence_lengths, self.document_indices, self.sequence_modes)
            os.replace(self._tmp_bin, self.bin_path)
            os.replace(tmp_idx, idx_path)
        except BaseException:
            for p in (tmp_idx, self._tmp_bin):
                if os.path.exists(p):
                    os.remove(p)
            raise
        self._finalized = True

    def abort(self) -> None:
        """Discard everything written so far (no file appears at the final paths)."""
        if not self._data_file.closed:
            self._data_file.close()
        if os.path.exists(self._tmp_bin):
            os.remove(self._tmp_bin)
        self._finalized = True

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None and not self._finalized:
            self.abort()


def write_index(idx_path: str, dtype: Any, sequence_lengths: Sequence[int] | np.ndarray,
                document_indices: Sequence[int] | np.ndarray,
                sequence_modes: Sequence[int] | np.ndarray | None = None) -> None:
    """Write an ``.idx`` file (non atomically; ``IndexedDatasetBuilder.finalize`` adds the atomic rename)."""
    lengths = np.asarray(sequence_lengths, dtype=np.int64)
    if lengths.size and lengths.min() < 0:
        raise ValueError("sequence lengths must be non-negative")
    if lengths.size and lengths.max() > np.iinfo(np.int32).max:
        raise ValueError("a sequence is longer than the int32 length field allows")
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(lengths.size, dtype=np.int64)
    if lengths.size > 1:
        np.cumsum(lengths[:-1] * itemsize, out=pointers[1:])
    docs = np.asarray(document_indices, dtype=np.int64)
    with open(idx_path, "wb") as f:
        f.write(INDEX_MAGIC)
        f.write(struct.pack("<Q", INDEX_VERSION))
        f.write(struct.pack("<B", dtype_code(dtype)))
        f.write(struct.pack("<Q", lengths.size))
        f.write(struct.pack("<Q", docs.size))
        f.write(lengths.astype("<i4").tobytes(order="C"))
        f.write(pointers.astype("<i8").tobytes(order="C"))
        f.write(docs.astype("<i8").tobytes(order="C"))
        if sequence_modes is not None:
            f.write(np.asarray(sequence_modes, dtype=np.int8).tobytes(order="C"))


class _Index:
    """Parsed and validated ``.idx`` file (arrays are views into a read-only memory map)."""

    def __init__(self, idx_path: str, multimodal: bool, validate: bool) -> None:
        self.path = idx_path
        try:
            file_size = os.path.getsize(idx_path)
        except OSError as e:
            raise IndexedDatasetError(idx_path, None, f"cannot open index file ({e.strerror})") from e
        with open(idx_path, "rb") as f:
            header = f.read(HEADER_SIZE)
        if header[:9] != INDEX_MAGIC and not (len(header) < 9 and INDEX_MAGIC.startswith(header)):
            raise IndexedDatasetError(idx_path, 0, f"bad magic {header[:9]!r}, expected {INDEX_MAGIC!r} "
                                      "(not a Megatron MMIDIDX index file)")
        if len(header) < HEADER_SIZE:
            raise IndexedDatasetError(idx_path, len(header), f"truncated header: file has {file_size} bytes, "
                                      f"the header alone needs {HEADER_SIZE}")
        (version,) = struct.unpack_from("<Q", header, 9)
        if version != INDEX_VERSION:
            raise IndexedDatasetError(idx_path, 9, f"unsupported index version {version}, expected {INDEX_VERSION}")
        (code,) = struct.unpack_from("<B", header, 17)
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(idx_path, 17, f"unknown dtype code {code}; valid codes are "
                                      f"{sorted(DTYPE_CODES)}")
        self.dtype: type[np.number] = DTYPE_CODES[code]
        self.dtype_code = code
        self.sequence_count, self.document_count = struct.unpack_from("<QQ", header, 18)
        n, d = self.sequence_count, self.document_count
        lengths_end = HEADER_SIZE + 4 * n
        pointers_end = lengths_end + 8 * n
        docs_end = pointers_end + 8 * d
        expected = docs_end + (n if multimodal else 0)
        if file_size < expected:
            what = ("sequence lengths" if file_size < lengths_end else "sequence pointers" if file_size < pointers_end
                    else "document indices" if file_size < docs_end else "sequence modes")
            raise IndexedDatasetError(idx_path, file_size, f"truncated index: the header declares {n} sequences and "
                                      f"{d} document entries, which need {expected} bytes, but the file ends at byte "
                                      f"{file_size} (inside the {what})")
        if file_size != expected and not (not multimodal and file_size == expected + n):
            raise IndexedDatasetError(idx_path, expected, f"index has {file_size - expected} unexpected trailing "
                                      f"bytes after byte {expected} (corrupted file or wrong multimodal flag)")
        self.has_modes_on_disk = file_size == docs_end + n and n > 0
        self._mmap = np.memmap(idx_path, mode="r", dtype=np.uint8) if file_size else np.zeros(0, np.uint8)
        buf = self._mmap
        self.sequence_lengths = np.frombuffer(buf, dtype="<i4", count=n, offset=HEADER_SIZE)
        self.sequence_pointers = np.frombuffer(buf, dtype="<i8", count=n, offset=lengths_end)
        self.document_indices = np.frombuffer(buf, dtype="<i8", count=d, offset=pointers_end)
        self.sequence_modes = np.frombuffer(buf, dtype=np.int8, count=n, offset=docs_end) if multimodal else None
        if validate:
            self._validate()

    def _validate(self) -> None:
        """Check the internal consistency Megatron's writer guarantees; report the first offending entry."""
        n, path = self.sequence_count, self.path
        docs = self.document_indices
        lengths_off = HEADER_SIZE
        pointers_off = lengths_off + 4 * n
        docs_off = pointers_off + 8 * n
        if docs.size == 0:
            raise IndexedDatasetError(path, 26, "document count is 0; a valid index has at least the leading 0 entry")
        if docs[0] != 0:
            raise IndexedDatasetError(path, docs_off, f"first document index is {int(docs[0])}, expected 0")
        if docs.size > 1:
            bad = np.flatnonzero(np.diff(docs) < 0)
            if bad.size:
                i = int(bad[0]) + 1
                raise IndexedDatasetError(path, docs_off + 8 * i, f"document indices decrease at entry {i} "
                                          f"({int(docs[i - 1])} -> {int(docs[i])})")
        if docs[-1] != n:
            raise IndexedDatasetError(path, docs_off + 8 * (docs.size - 1), f"last document index is "
                                      f"{int(docs[-1])} but there are {n} sequences")
        if n == 0:
            return
        neg = np.flatnonzero(self.sequence_lengths < 0)
        if neg.size:
            i = int(neg[0])
            raise IndexedDatasetError(path, lengths_off + 4 * i, f"sequence {i} has negative length "
                                      f"{int(self.sequence_lengths[i])}")
        itemsize = np.dtype(self.dtype).itemsize
        expected = np.zeros(n, dtype=np.int64)
        if n > 1:
            np.cumsum(self.sequence_lengths[:-1].astype(np.int64) * itemsize, out=expected[1:])
        wrong = np.flatnonzero(self.sequence_pointers != expected)
        if wrong.size:
            i = int(wrong[0])
            raise IndexedDatasetError(path, pointers_off + 8 * i, f"sequence {i} points to byte "
                                      f"{int(self.sequence_pointers[i])} of the .bin, expected {int(expected[i])} "
                                      "(pointers must follow the sequence lengths)")

    @property
    def total_bytes(self) -> int:
        """Bytes of the ``.bin`` that the index describes."""
        if self.sequence_count == 0:
            return 0
        last = self.sequence_count - 1
        return int(self.sequence_pointers[last]) + int(self.sequence_lengths[last]) * np.dtype(self.dtype).itemsize

    def close(self) -> None:
        """Release the memory map."""
        self.sequence_lengths = self.sequence_pointers = self.document_indices = None  # type: ignore[assignment]
        self.sequence_modes = None
        # Dropping the last reference unmaps the file (arrays already handed out keep it alive until freed).
        self._mmap = None  # type: ignore[assignment]


class IndexedDataset:
    """Memory-mapped reader of a ``.bin`` / ``.idx`` pair (same API as Megatron's ``IndexedDataset``).

    ``ds[i]`` is the i-th sequence as a numpy array of the file dtype (a tuple ``(tokens, mode)`` when
    ``multimodal``), ``ds[a:b]`` a list of them, ``ds.get(i, offset, length)`` a window inside one sequence without
    reading the rest. ``sequence_lengths`` and ``document_indices`` expose the index arrays. In Megatron's GPT
    pipeline every sequence is one document (``document_indices == arange(N + 1)``).

    ``mmap=False`` reads with ``pread`` instead of mapping the ``.bin`` (for filesystems where mmap is slow).
    ``validate=True`` (default) checks the index and the ``.bin`` size at open time: O(N) numpy work, and a clear
    ``IndexedDatasetError`` instead of wrong tokens if anything is off. Picklable (DataLoader workers re-open it).
    """

    def __init__(self, path_prefix: str, multimodal: bool = False, mmap: bool = True, validate: bool = True) -> None:
        self._init(path_prefix, multimodal, mmap, validate)

    def _init(self, path_prefix: str, multimodal: bool, mmap: bool, validate: bool) -> None:
        self.path_prefix = path_prefix
        self.multimodal = multimodal
        self.mmap = mmap
        self.validate = validate
        idx_path, bin_path = get_idx_path(path_prefix), get_bin_path(path_prefix)
        missing = [p for p in (idx_path, bin_path) if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"indexed dataset {path_prefix!r}: missing {', '.join(missing)}")
        self.index = _Index(idx_path, multimodal, validate)
        self._itemsize = np.dtype(self.index.dtype).itemsize
        bin_size = os.path.getsize(bin_path)
        expected = self.index.total_bytes
        if validate and bin_size != expected:
            kind = "truncated" if bin_size < expected else "has trailing bytes"
            raise IndexedDatasetError(bin_path, min(bin_size, expected), f"data file {kind}: the index describes "
                                      f"{expected} bytes ({expected // self._itemsize} tokens of "
                                      f"{np.dtype(self.index.dtype)}) but the file has {bin_size} bytes")
        self._bin_file = None
        self._bin_mmap: np.ndarray | None = None
        if mmap:
            self._bin_mmap = np.memmap(bin_path, mode="r", dtype=np.uint8) if bin_size else np.zeros(0, np.uint8)
        else:
            self._bin_file = open(bin_path, "rb")  # noqa: SIM115 - closed in close()

    # -- pickling (DataLoader workers) ---------------------------------------------------------------------------
    def __getstate__(self) -> tuple[str, bool, bool, bool]:
        return (self.path_prefix, self.multimodal, self.mmap, False)

    def __setstate__(self, state: tuple[str, bool, bool, bool]) -> None:
        self._init(*state)

    # -- reading --------------------------------------------------------------------------------------------------
    def _read(self, count: int, byte_offset: int) -> np.ndarray:
        if self._bin_mmap is not None:
            return np.frombuffer(self._bin_mmap, dtype=self.index.dtype, count=count, offset=byte_offset)
        assert self._bin_file is not None
        data = os.pread(self._bin_file.fileno(), count * self._itemsize, byte_offset)
        if len(data) != count * self._itemsize:
            raise IndexedDatasetError(get_bin_path(self.path_prefix), byte_offset + len(data),
                                      "unexpected end of data file")
        return np.frombuffer(data, dtype=self.index.dtype, count=count)

    def _check_idx(self, idx: int) -> int:
        n = self.index.sequence_count
        i = int(idx)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence index {idx} out of range for {n} sequences in {self.path_prefix}")
        return i

    def __len__(self) -> int:
        return self.index.sequence_count

    def __getitem__(self, idx: int | np.integer | slice) -> Any:
        if isinstance(idx, (int, np.integer)):
            i = self._check_idx(idx)
            tokens = self._read(int(self.index.sequence_lengths[i]), int(self.index.sequence_pointers[i]))
            return (tokens, self.index.sequence_modes[i]) if self.index.sequence_modes is not None else tokens
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("slices into an IndexedDataset must be contiguous (step 1)")
            if stop <= start:
                parts: list[np.ndarray] = []
            else:
                lengths = self.index.sequence_lengths[start:stop]
                flat = self._read(int(lengths.sum()), int(self.index.sequence_pointers[start]))
                parts = np.split(flat, np.cumsum(lengths)[:-1])
            if self.index.sequence_modes is not None:
                return parts, self.index.sequence_modes[start:stop]
            return parts
        raise TypeError(f"unexpected index type {type(idx).__name__}")

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> Any:
        """Tokens ``[offset, offset + length)`` of sequence ``idx`` (to its end when ``length`` is None)."""
        i = self._check_idx(idx)
        size = int(self.index.sequence_lengths[i])
        offset = int(offset)
        if length is None:
            length = size - offset
        length = int(length)
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"window [{offset}, {offset + length}) outside sequence {i} of length {size} "
                             f"in {self.path_prefix}")
        tokens = self._read(length, int(self.index.sequence_pointers[i]) + offset * self._itemsize)
        return (tokens, self.index.sequence_modes[i]) if self.index.sequence_modes is not None else tokens

    # -- index arrays ---------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> type[np.number]:
        """Token dtype stored in the ``.bin``."""
        return self.index.dtype

    @property
    def sequence_lengths(self) -> np.ndarray:
        """int32 [N]: tokens per sequence."""
        return self.index.sequence_lengths

    @property
    def sequence_pointers(self) -> np.ndarray:
        """int64 [N]: byte offset of each sequence in the ``.bin``."""
        return self.index.sequence_pointers

    @property
    def document_indices(self) -> np.ndarray:
        """int64 [D+1]: sequence index where each document ends, with a leading 0."""
        return self.index.document_indices

    @property
    def sequence_modes(self) -> np.ndarray:
        """int8 [N]: per-sequence modes (multimodal datasets only)."""
        if self.index.sequence_modes is None:
            raise AttributeError("sequence modes are only available when the dataset is opened with multimodal=True")
        return self.index.sequence_modes

    @property
    def num_tokens(self) -> int:
        """Total tokens in the dataset."""
        return int(self.index.sequence_lengths.sum(dtype=np.int64))

    @staticmethod
    def exists(path_prefix: str) -> bool:
        """Whether both files of the prefix exist."""
        return os.path.isfile(get_idx_path(path_prefix)) and os.path.isfile(get_bin_path(path_prefix))

    def close(self) -> None:
        """Release file handles and maps (the object is unusable afterwards)."""
        if getattr(self, "_bin_file", None) is not None:
            self._bin_file.close()  # type: ignore[union-attr]
            self._bin_file = None
        self._bin_mmap = None
        if getattr(self, "index", None) is not None:
            self.index.close()

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.path_prefix!r}, sequences={len(self)}, "
                f"documents={self.index.document_count - 1}, dtype={np.dtype(self.dtype)})")


def iter_documents(dataset: IndexedDataset) -> Iterable[np.ndarray]:
    """Yield each document's tokens (the concatenation of its sequences)."""
    docs = dataset.document_indices
    for d in range(len(docs) - 1):
        a, b = int(docs[d]), int(docs[d + 1])
        if b > a:
            yield np.concatenate(dataset[a:b]) if b - a > 1 else dataset[a]
        else:
            yield np.zeros(0, dtype=dataset.dtype)
