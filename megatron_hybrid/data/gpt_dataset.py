"""GPT-style pretraining samples: fixed windows of ``seq_length + 1`` tokens cut across document boundaries.

Semantics are Megatron-LM's ``GPTDataset`` (megatron/core/datasets/gpt_dataset.py), index for index, so a run can
move between the two frameworks without changing what the model sees:

- document index: the split's document ids repeated for as many epochs as ``num_samples`` needs and shuffled
  with ``numpy.random.RandomState(random_seed)``; when the last epoch would contribute less than 80% of an epoch of
  samples it is shuffled separately ("separate final epoch") so it is not mixed into the others.
- sample index ``[num_samples + 1, 2]``: (position in the document index, token offset) where each sample starts.
  Conceptually the shuffled documents are concatenated into one stream and sample ``i`` is
  ``stream[i * seq_length : i * seq_length + seq_length + 1]`` (consecutive samples share one token). Megatron
  builds it with a C++ loop; ``build_sample_index`` is a vectorised numpy equivalent (a ``searchsorted`` over
  cumulative document lengths) with identical output.
- shuffle index: a permutation of the samples (the separate final epoch, if any, is permuted on its own).

The three arrays are built once and cached as ``.npy`` files (see ``GPTDatasetConfig.path_to_cache``), keyed by
the md5 of a JSON description of everything they depend on.

Each sample is a dict of torch tensors: ``tokens`` [s] int64, ``labels`` [s] int64 (tokens shifted by one),
``loss_mask`` [s] float32, ``position_ids`` [s] int64 and, when requested, ``seq_idx`` [s] int32: the document
number of each token within the sample (0, 0, ..., 1, 1, ...), which the Mamba-2 scan and conv kernels use to
reset their state at document starts. A document ends at an EOD token (the token after an EOD starts the next
document), so data should be preprocessed with ``--append-eod`` for ``seq_idx`` / ``reset_position_ids`` to work.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from megatron_hybrid.data.indexed_dataset import IndexedDataset, get_bin_path, get_idx_path
from megatron_hybrid.data.utils import (
    Split,
    build_on_rank0_then_load,
    convert_split_vector_to_split_matrix,
    description_hash,
    parse_split,
)

__all__ = [
    "PAD_TOKEN_ID",
    "GPTDataset",
    "GPTDatasetConfig",
    "build_document_index",
    "build_sample_index",
    "build_shuffle_index",
    "get_ltor_masks_and_position_ids",
]

# Megatron's padding id for the (rare) partial last validation sample: never a real token, masked from the loss.
PAD_TOKEN_ID = -1
# Version of the cached index layout; part of the cache key so a format change never reads stale files.
_CACHE_FORMAT = 1


@dataclass
class GPTDatasetConfig:
    """Options of ``GPTDataset`` / ``build_train_valid_test_datasets`` (Megatron's GPTDatasetConfig subset).

    ``path_to_cache``: directory of the cached index ``.npy`` files. None -> ``<dir of the data prefix>/cache/
    GPTDataset_indices`` (next to the data, shared by all runs using it; the file names start with the md5 of the
    dataset description, so different configs never collide). ``cache_indices=False`` disables caching (every
    rank builds in memory; fine for small data).

    ``eod`` is the tokenizer's end-of-document id; required by ``eod_mask_loss``, ``reset_position_ids``,
    ``reset_attention_mask`` and ``return_seq_idx``. ``reset_attention_mask`` (Megatron's name) also returns
    ``seq_idx``: the hybrid model realises per-document attention/state resets from ``seq_idx`` rather than from a
    dense [s, s] mask.
    """

    seq_length: int
    random_seed: int = 1234
    split: str = "969,30,1"
    eod: int | None = None
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    return_seq_idx: bool = False
    path_to_cache: str | None = None
    cache_indices: bool = True
    add_extra_token_to_sequence: bool = True
    drop_last_partial_validation_sequence: bool = True
    mid_level_dataset_surplus: float = 0.005
    mmap_bin_files: bool = True

    def __post_init__(self) -> None:
        if self.seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {self.seq_length}")
        needs_eod = [name for name in ("eod_mask_loss", "reset_position_ids", "reset_attention_mask",
                                       "return_seq_idx") if getattr(self, name)]
        if needs_eod and self.eod is None:
            raise ValueError(f"{', '.join(needs_eod)} need the end-of-document id: set GPTDatasetConfig.eod "
                             "(tokenizer.eod)")
        self.split_vector = parse_split(self.split)
        self.split_matrix = convert_split_vector_to_split_matrix(self.split_vector)

    @property
    def wants_seq_idx(self) -> bool:
        """Whether samples carry ``seq_idx``."""
        return self.return_seq_idx or self.reset_attention_mask


def build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                         separate_final_epoch: bool) -> np.ndarray:
    """Document ids repeated ``num_epochs`` times and shuffled (int32); last epoch shuffled apart if asked."""
    if not separate_final_epoch or num_epochs == 1:
        index = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)
        rng.shuffle(index)
        return index
    first = build_document_index(documents, num_epochs - 1, rng, False)
    last = build_document_index(documents, 1, rng, False)
    return np.concatenate((first, last))


def build_sample_index(sizes: np.ndarray, document_index: np.ndarray, seq_length: int, num_epochs: int,
                       tokens_per_epoch: int, drop_last_partial_sequence: bool = True,
                       add_extra_token_to_sequence: bool = True) -> np.ndarray:
    """Vectorised equivalent of Megatron's C++ ``build_sample_idx``: rows (document-index position, offset).

    Row ``i`` is where sample ``i`` starts, i.e. global stream position ``P = i * seq_length`` expressed as the
    document holding it. The C++ loop stays on a document while it still owes tokens, so the row's document is the
    first one whose cumulative end reaches ``P + extra`` (``extra`` = 1 with the extra label token): with
    ``extra = 0`` a window ending exactly at a document end is recorded as (that document, its length), not as
    (next document, 0). Row 0 is always (0, 0). Past the end of the data (only the partial last sample when
    ``drop_last_partial_sequence`` is False) the row is (last, len(last) - extra). The sample count uses the same
    float32 ``ceil`` as the C++ code for the partial case.
    """
    extra = int(bool(add_extra_token_to_sequence))
    total = num_epochs * tokens_per_epoch
    if drop_last_partial_sequence:
        num_samples = (total - extra) // seq_length
    else:
        num_samples = int(math.ceil(np.float32(total - extra) / np.float32(seq_length)))
    num_samples = max(int(num_samples), 0)
    doc_sizes = np.asarray(sizes)[np.asarray(document_index)].astype(np.int64)
    cum_end = np.cumsum(doc_sizes)
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    rows = np.searchsorted(cum_end, starts + extra, side="left")
    past_end = rows >= len(document_index)
    rows = np.minimum(rows, max(len(document_index) - 1, 0))
    offsets = starts - (cum_end[rows] - doc_sizes[rows]) if len(document_index) else np.zeros_like(starts)
    if past_end.any():
        offsets[past_end] = doc_sizes[-1] - extra
    rows[0], offsets[0] = 0, 0
    max_value = max(len(document_index), int(np.max(sizes)) if len(sizes) else 0)
    dtype = np.int32 if max_value <= np.iinfo(np.int32).max else np.int64
    return np.stack([rows, offsets], axis=1).astype(dtype)


def build_shuffle_index(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    """Permutation of ``[0, num_samples)`` followed by a separate permutation of ``[num_samples, total_size)``."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


def get_ltor_masks_and_position_ids(tokens: torch.Tensor, eod: int | None, reset_position_ids: bool,
                                    eod_mask_loss: bool, want_seq_idx: bool
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Loss mask, position ids and (optionally) seq_idx for a left-to-right sample, Megatron's EOD semantics.

    An EOD token belongs to the document it ends; the next token starts a new document (positions restart at 0
    when ``reset_position_ids``, ``seq_idx`` increments). ``eod_mask_loss`` zeroes the loss where the *input*
    token is EOD (as Megatron does).
    """
    s = tokens.numel()
    loss_mask = torch.ones(s, dtype=torch.float32)
    if eod_mask_loss:
        loss_mask[tokens == eod] = 0.0
    position_ids = torch.arange(s, dtype=torch.int64)
    seq_idx = None
    if reset_position_ids or want_seq_idx:
        starts = torch.zeros(s, dtype=torch.bool)
        if s > 1:
            starts[1:] = tokens[:-1] == eod
        if reset_position_ids:
            start_pos = torch.where(starts, position_ids, torch.zeros_like(position_ids))
            start_pos = torch.cummax(start_pos, dim=0).values
            position_ids = position_ids - start_pos
        if want_seq_idx:
            seq_idx = torch.cumsum(starts.to(torch.int32), dim=0, dtype=torch.int32)
    return loss_mask, position_ids, seq_idx


class GPTDataset(torch.utils.data.Dataset):
    """Samples of one split of one indexed dataset (Megatron's mid-level dataset).

    Args:
        indexed_dataset: the low-level token store.
        dataset_path: its prefix (bookkeeping and cache key).
        indexed_indices: ids of the sequences (documents) of this split, int32.
        num_samples: samples wanted; None -> exactly one epoch. The dataset may hold a few more (the last epoch is
            fully indexed), as in Megatron.
        index_split: which split (only ``valid`` honours ``drop_last_partial_validation_sequence=False``).
        config: see ``GPTDatasetConfig``.
    """

    def __init__(self, indexed_dataset: IndexedDataset, dataset_path: str | None, indexed_indices: np.ndarray,
                 num_samples: int | None, index_split: Split, config: GPTDatasetConfig) -> None:
        self.dataset = indexed_dataset
        self.dataset_path = dataset_path
        self.indices = np.asarray(indexed_indices, dtype=np.int32)
        self.num_samples = num_samples
        self.index_split = index_split
        self.config = config
        if len(self.indices) == 0:
            raise ValueError(f"{dataset_path}: the {index_split.name} split has no documents (split "
                             f"{config.split!r} of {len(indexed_dataset)} documents); use a larger dataset or "
                             "another split")
        self.unique_identifiers: OrderedDict[str, Any] = OrderedDict(
            [
                ("class", type(self).__name__),
                ("format", _CACHE_FORMAT),
                ("dataset_path", os.path.abspath(dataset_path) if dataset_path else None),
                ("num_samples", num_samples),
                ("index_split", index_split.name),
                ("random_seed", config.random_seed),
                ("sequence_length", config.seq_length),
                ("split", config.split),
                ("split_matrix", config.split_matrix),
                ("add_extra_token_to_sequence", config.add_extra_token_to_sequence),
                ("drop_last_partial_sequence", self._drop_last_partial_sequence()),
                ("documents", [int(self.indices[0]), int(self.indices[-1]) + 1, len(self.indices)]),
                ("data_fingerprint", self._data_fingerprint()),
            ]
        )
        self.unique_description, self.unique_description_hash = description_hash(self.unique_identifiers)
        arrays = build_on_rank0_then_load(*self._cache_paths(), self.unique_description, self._build_indices)
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    # -- index construction ---------------------------------------------------------------------------------------
    def _drop_last_partial_sequence(self) -> bool:
        if self.index_split == Split.valid:
            return self.config.drop_last_partial_validation_sequence
        return True

    def _data_fingerprint(self) -> list[int]:
        """Cheap identity of the token files: a re-tokenized corpus at the same path gets a new cache entry."""
        prefix = self.dataset.path_prefix
        return [len(self.dataset), os.path.getsize(get_idx_path(prefix)), os.path.getsize(get_bin_path(prefix))]

    def _cache_paths(self) -> tuple[dict[str, str] | None, str | None]:
        if not self.config.cache_indices:
            return None, None
        cache_dir = self.config.path_to_cache
        if cache_dir is None:
            base_dir = os.path.dirname(os.path.abspath(self.dataset.path_prefix))
            cache_dir = os.path.join(base_dir, "cache", "GPTDataset_indices")
        base = f"{self.unique_description_hash}-{type(self).__name__}-{self.index_split.name}"
        files = {name: os.path.join(cache_dir, f"{base}-{name}.npy")
                 for name in ("document_index", "sample_index", "shuffle_index")}
        return files, os.path.join(cache_dir, f"{base}-description.txt")

    def _tokens_per_epoch(self) -> int:
        return int(np.sum(self.dataset.sequence_lengths[self.indices], dtype=np.int64))

    def _num_epochs(self, tokens_per_epoch: int) -> int:
        if self.num_samples is None:
            return 1
        needed = self.num_samples * self.config.seq_length + int(self.config.add_extra_token_to_sequence)
        return max(1, -(-needed // tokens_per_epoch))

    def _build_indices(self) -> dict[str, np.ndarray]:
        cfg = self.config
        extra = int(cfg.add_extra_token_to_sequence)
        tokens_per_epoch = self._tokens_per_epoch()
        if tokens_per_epoch <= extra:
            raise ValueError(f"{self.dataset_path}: the {self.index_split.name} split has {tokens_per_epoch} tokens; "
                             "at least 2 are needed to build a sample")
        num_epochs = self._num_epochs(tokens_per_epoch)
        separate_final_epoch = False
        num_samples_sans_final_epoch = 0
        if num_epochs > 1:
            assert self.num_samples is not None
            num_samples_sans_final_epoch = ((num_epochs - 1) * tokens_per_epoch - extra) // cfg.seq_length
            num_samples_from_final_epoch = self.num_samples - num_samples_sans_final_epoch
            num_samples_per_epoch = (tokens_per_epoch - extra) // cfg.seq_length
            assert 0 <= num_samples_from_final_epoch <= num_samples_per_epoch + 1
            separate_final_epoch = num_samples_from_final_epoch < int(0.80 * num_samples_per_epoch)
        rng = np.random.RandomState(cfg.random_seed)
        document_index = build_document_index(self.indices, num_epochs, rng, separate_final_epoch)
        sample_index = build_sample_index(np.asarray(self.dataset.sequence_lengths), document_index, cfg.seq_length,
                                          num_epochs, tokens_per_epoch, self._drop_last_partial_sequence(),
                                          cfg.add_extra_token_to_sequence)
        n = sample_index.shape[0] - 1
        shuffle_index = build_shuffle_index(num_samples_sans_final_epoch if separate_final_epoch else n, n, rng)
        return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}

    # -- access ---------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.sample_index.shape[0]) - 1

    def get_text(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw ``seq_length + 1`` token window (int64, padded with -1 if partial) and the document ids it spans."""
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"sample {idx} out of range for {n} samples")
        idx = int(self.shuffle_index[idx % n])
        extra = int(self.config.add_extra_token_to_sequence)
        doc_beg, off_beg = (int(v) for v in self.sample_index[idx])
        doc_end, off_end = (int(v) for v in self.sample_index[idx + 1])
        parts: list[np.ndarray] = []
        doc_ids: list[int] = []
        for i in range(doc_beg, doc_end + 1):
            doc = int(self.document_index[i])
            offset = off_beg if i == doc_beg else 0
            if i < doc_end:
                length = None
            else:
                length = off_end + extra - offset
            doc_ids.append(doc)
            parts.append(self.dataset.get(doc, offset=offset, length=length))
        want = self.config.seq_length + extra
        text = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        if text.size < want:
            text = np.concatenate([text, np.full(want - text.size, PAD_TOKEN_ID, dtype=np.int64)])
        return text, np.asarray(doc_ids, dtype=np.int64)

    def __getitem__(self, idx: int | None) -> dict[str, torch.Tensor]:
        text_np, _ = self.get_text(0 if idx is None else int(idx))
        text = torch.from_numpy(text_np)
        if self.config.add_extra_token_to_sequence:
            tokens, labels = text[:-1].clone(), text[1:].clone()
        else:
            tokens = text.clone()
            labels = torch.roll(text, shifts=-1)
            labels[-1] = PAD_TOKEN_ID
        cfg = self.config
        loss_mask, position_ids, seq_idx = get_ltor_masks_and_position_ids(
            tokens, cfg.eod, cfg.reset_position_ids, cfg.eod_mask_loss, cfg.wants_seq_idx)
        loss_mask[labels == PAD_TOKEN_ID] = 0.0
        tokens[tokens == PAD_TOKEN_ID] = 0
        labels[labels == PAD_TOKEN_ID] = 0
        if idx is None:  # batch-padding sample (Megatron convention): contributes no loss
            loss_mask.zero_()
        sample = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}
        if seq_idx is not None:
            sample["seq_idx"] = seq_idx
        return sample
