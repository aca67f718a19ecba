"""Weighted mixture of datasets with Megatron's deterministic greedy blending index.

Why greedy rather than random: at every prefix of the sample stream each dataset has contributed as close to its
weight as possible (sample ``t`` goes to the dataset whose share lags its target ``w_i * t`` the most; ties go to
the lowest index), so short runs and resumed runs see the intended mixture, and the index is reproducible.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from megatron_hybrid.data.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron_hybrid.data.utils import build_on_rank0_then_load, description_hash, normalize

__all__ = ["BlendedDataset", "build_blending_indices", "build_exhaustive_blending_indices"]


def build_blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """``size`` draws following normalised ``weights``: (dataset id int16 [size], sample id in it int64 [size]).

    Same arithmetic as Megatron's C++ ``build_blending_indices`` (float64 error ``w_i * max(t, 1) - count_i``,
    first maximum wins), hence the same arrays.
    """
    w = [float(x) for x in weights]
    n = len(w)
    dataset_index = np.zeros(size, dtype=np.int16)
    dataset_sample_index = np.zeros(size, dtype=np.int64)
    counts = [0] * n
    ds_out: list[int] = [0] * size
    sample_out: list[int] = [0] * size
    rng_n = range(1, n)
    for t in range(size):
        td = float(t) if t > 1 else 1.0
        best, best_err = 0, w[0] * td - counts[0]
        for i in rng_n:
            err = w[i] * td - counts[i]
            if err > best_err:
                best, best_err = i, err
        ds_out[t] = best
        sample_out[t] = counts[best]
        counts[best] += 1
    dataset_index[:] = ds_out
    dataset_sample_index[:] = sample_out
    return dataset_index, dataset_sample_index


def build_exhaustive_blending_indices(sizes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Draw exactly ``sizes[i]`` samples from dataset ``i``, interleaved in proportion (Megatron's exhaustive mode)."""
    sizes = [int(s) for s in sizes]
    total = sum(sizes)
    weights = [s / float(total) for s in sizes] if total else [0.0] * len(sizes)
    counts = [0] * len(sizes)
    unspent = [i for i, s in enumerate(sizes) if s > 0]
    ds_out = np.zeros(total, dtype=np.int16)
    sample_out = np.zeros(total, dtype=np.int64)
    for t in range(total):
        td = float(t) if t > 1 else 1.0
        best, best_err = -1, -np.inf
        for i in unspent:
            err = weights[i] * td - counts[i]
            if err > best_err:
                best, best_err = i, err
        ds_out[t] = best
        sample_out[t] = counts[best]
        counts[best] += 1
        if counts[best] == sizes[best]:
            unspent.remove(best)
    return ds_out, sample_out


class BlendedDataset(torch.utils.data.Dataset):
    """Samples drawn from ``datasets`` in proportion to ``weights`` (Megatron's ``BlendedDataset``).

    ``size`` None means exhaustive: ``weights`` are integer sample counts, each dataset is drawn exactly that often.
    The blending index is cached next to the member datasets' indices (same ``path_to_cache`` rules).
    """

    def __init__(self, datasets: Sequence[GPTDataset], weights: Sequence[float], size: int | None,
                 config: GPTDatasetConfig) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("BlendedDataset needs one weight per dataset and at least one dataset")
        if len(datasets) >= 32767:
            raise ValueError("at most 32766 datasets can be blended (int16 dataset index)")
        if any(w <= 0 for w in weights):
            raise ValueError(f"blend weights must be positive, got {list(weights)}")
        self.datasets = list(datasets)
        self.split = self.datasets[0].index_split
        self.size = size
        self.config = config
        self.weights = normalize(weights) if size is not None else [int(w) for w in weights]
        self.unique_identifiers: OrderedDict[str, Any] = OrderedDict(
            [
                ("class", type(self).__name__),
                ("datasets", [d.unique_identifiers for d in self.datasets]),
                ("split", self.split.name),
                ("weights", self.weights),
                ("size", size),
            ]
        )
        self.unique_description, self.unique_description_hash = description_hash(self.unique_identifiers)
        arrays = build_on_rank0_then_load(*self._cache_paths(), self.unique_description, self._build)
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]

    def _cache_paths(self) -> tuple[dict[str, str] | None, str | None]:
        if not self.config.cache_indices:
            return None, None
        first_files, _ = self.datasets[0]._cache_paths()
        assert first_files is not None
        cache_dir = os.path.dirname(first_files["document_index"])
        if self.config.path_to_cache is not None:
            cache_dir = self.config.path_to_cache
        base = f"{self.unique_description_hash}-{type(self).__name__}-{self.split.name}"
        files = {name: os.path.join(cache_dir, f"{base}-{name}.npy")
                 for name in ("dataset_index", "dataset_sample_index")}
        return files, os.path.join(cache_dir, f"{base}-description.txt")

    def _build(self) -> dict[str, np.ndarray]:
        if self.size is not None:
            dataset_index, dataset_sample_index = build_blending_indices(self.weights, self.size)
        else:
            dataset_index, dataset_sample_index = build_exhaustive_blending_indices(self.weights)
        ids, counts = np.unique(dataset_index, return_counts=True)
        for i, count in zip(ids.tolist(), counts.tolist()):
            if len(self.datasets[i]) < count:
                raise IndexError(f"the {self.split.name} blend requests {count} samples from dataset {i} "
                                 f"({self.datasets[i].dataset_path}) which has only {len(self.datasets[i])}; "
                                 "increase mid_level_dataset_surplus")
        return {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index}

    def __len__(self) -> int:
        return int(self.dataset_index.shape[0])

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"sample {idx} out of range for {n} samples")
        dataset_id = int(self.dataset_index[idx])
        return self.datasets[dataset_id][int(self.dataset_sample_index[idx])]
