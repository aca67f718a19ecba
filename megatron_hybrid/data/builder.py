"""Build the train / valid / test datasets from a blend of indexed datasets (Megatron's BlendedMegatronDatasetBuilder).

Cases, as in Megatron:
- one prefix, no weights: each split is a ``GPTDataset`` over that split's documents with the requested samples.
- weighted blend (``0.3 A 0.7 B``): each prefix gets ``ceil(ceil(n * w) * (1 + surplus))`` samples per split and a
  ``BlendedDataset`` of ``sum(ceil(n * w))`` samples mixes them with the greedy index.
- several prefixes without weights: one epoch of each, blended in proportion to their sizes (``min(n, total)``
  samples, or all of them when n is None).
``blend_per_split`` gives each split its own blend (the ``split`` string is then ignored).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from megatron_hybrid.data.blended_dataset import BlendedDataset
from megatron_hybrid.data.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron_hybrid.data.indexed_dataset import IndexedDataset
from megatron_hybrid.data.utils import Split, normalize, parse_data_path

__all__ = ["build_train_valid_test_datasets", "get_size_per_split_per_dataset"]

Blend = tuple[list[str], list[float] | None]
TopLevel = GPTDataset | BlendedDataset


def get_size_per_split_per_dataset(weights: Sequence[float], sizes: Sequence[int | None],
                                   surplus: float = 0.0) -> list[list[int | None]]:
    """Samples to request from each dataset per split: ``ceil(ceil(size * w) * (1 + surplus))``."""
    return [[None if s is None else int(math.ceil(math.ceil(s * w) * (1 + surplus))) for s in sizes]
            for w in weights]


def _as_blend(value: str | Sequence[str] | Blend | None) -> Blend | None:
    if value is None:
        return None
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], list):
        return value  # already parsed
    return parse_data_path(value)  # type: ignore[arg-type]


def _build_splits(prefix: str, split_matrix: Sequence[tuple[float, float] | None], sizes: Sequence[int | None],
                  config: GPTDatasetConfig) -> list[GPTDataset | None]:
    """GPTDatasets of every non-empty split of one prefix (documents split by contiguous ranges, as Megatron)."""
    low = IndexedDataset(prefix, mmap=config.mmap_bin_files)
    n = len(low)
    out: list[GPTDataset | None] = []
    for split in Split:
        bounds = split_matrix[split.value]
        if bounds is None:
            out.append(None)
            continue
        beg, end = int(round(bounds[0] * float(n))), int(round(bounds[1] * float(n)))
        indices = np.arange(beg, end, dtype=np.int32)
        out.append(GPTDataset(low, prefix, indices, sizes[split.value], split, config))
    return out


def _build_blend(blend: Blend, split_matrix: Sequence[tuple[float, float] | None], sizes: Sequence[int | None],
                 config: GPTDatasetConfig) -> list[TopLevel | None]:
    prefixes, weights = blend
    if len(prefixes) == 1 and weights is None:
        return list(_build_splits(prefixes[0], split_matrix, sizes, config))
    if weights is not None:
        weights = normalize(weights)
        targets = get_size_per_split_per_dataset(weights, sizes)
        buffers = get_size_per_split_per_dataset(weights, sizes, surplus=config.mid_level_dataset_surplus)
    else:
        buffers = [[None] * len(Split) for _ in prefixes]
    per_prefix = [_build_splits(p, split_matrix, buf, config) for p, buf in zip(prefixes, buffers)]
    result: list[TopLevel | None] = []
    for split in Split:
        i = split.value
        if split_matrix[i] is None:
            result.append(None)
            continue
        members = [per_prefix[k][i] for k in range(len(prefixes))]
        assert all(m is not None for m in members)
        datasets = [m for m in members if m is not None]
        if weights is not None:
            if sizes[i] is None:
                raise ValueError("a weighted blend needs the number of samples of every split it builds")
            size: int | None = sum(int(targets[k][i] or 0) for k in range(len(prefixes)))
            blend_weights: list[float] = list(weights)
        else:
            lengths = [len(d) for d in datasets]
            blend_weights = [float(x) for x in lengths]
            size = None if sizes[i] is None else min(int(sizes[i] or 0), sum(lengths))
            if size is None:
                blend_weights = [int(x) for x in lengths]  # type: ignore[misc]
        result.append(BlendedDataset(datasets, blend_weights, size, config))
    return result


def build_train_valid_test_datasets(
    data_path: str | Sequence[str] | Blend | None,
    train_valid_test_num_samples: Sequence[int | None],
    config: GPTDatasetConfig,
    *,
    blend_per_split: Sequence[str | Sequence[str] | Blend | None] | None = None,
) -> tuple[TopLevel | None, TopLevel | None, TopLevel | None]:
    """Datasets for the three splits (None where a split is empty).

    Args:
        data_path: Megatron ``--data-path``: ``"prefix"``, ``["0.3", "A", "0.7", "B"]``, ``"0.3 A 0.7 B"`` or an
            already parsed ``(prefixes, weights)``. Split into train/valid/test by ``config.split``.
        train_valid_test_num_samples: samples wanted per split (e.g. ``train_iters * global_batch_size``); None
            for a split means one epoch.
        config: dataset options (sequence length, seed, masks, cache).
        blend_per_split: alternatively one blend per split (``[train, valid, test]``), each used whole.

    In a ``torch.distributed`` job call it on every rank: rank 0 builds missing index caches, the others wait on a
    barrier and load them.
    """
    sizes = list(train_valid_test_num_samples)
    if len(sizes) != len(Split):
        raise ValueError("train_valid_test_num_samples needs three entries (train, valid, test)")
    if blend_per_split is not None:
        if len(blend_per_split) != len(Split):
            raise ValueError("blend_per_split needs three entries (train, valid, test); use None for a missing one")
        out: list[TopLevel | None] = []
        for split in Split:
            blend = _as_blend(blend_per_split[split.value])
            if blend is None:
                out.append(None)
                continue
            matrix: list[tuple[float, float] | None] = [None] * len(Split)
            matrix[split.value] = (0.0, 1.0)
            spoof_sizes: list[int | None] = [0] * len(Split)
            spoof_sizes[split.value] = sizes[split.value]
            out.append(_build_blend(blend, matrix, spoof_sizes, config)[split.value])
        return out[0], out[1], out[2]
    blend = _as_blend(data_path)
    if blend is None:
        raise ValueError("give data_path or blend_per_split")
    train, valid, test = _build_blend(blend, config.split_matrix, sizes, config)
    return train, valid, test
