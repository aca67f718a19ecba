"""Deterministic data-parallel batch samplers and the pretraining DataLoader (Megatron's data_samplers.py).

Why: training must resume at the exact sample it stopped at. The position is one integer, ``consumed_samples``
(global samples already used = iterations * global batch size), saved in the checkpoint; the samplers derive every
rank's next micro batch from it without any other state.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch

__all__ = ["MegatronPretrainingRandomSampler", "MegatronPretrainingSampler", "build_pretraining_data_loader"]


class MegatronPretrainingSampler:
    """Sequential sampler: global batch ``k`` is samples ``[c + k*m*d, c + (k+1)*m*d)``, rank ``r`` takes slice ``r``.

    (``c`` consumed samples, ``m`` micro batch size, ``d`` data-parallel size.) Yields lists of ``m`` dataset
    indices. With ``drop_last=False`` the trailing partial global batch is split the same way (ranks may get fewer
    or no samples).
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, data_parallel_rank: int,
                 data_parallel_size: int, drop_last: bool = True) -> None:
        if total_samples <= 0:
            raise ValueError(f"no sample to consume: total_samples={total_samples}")
        if not 0 <= consumed_samples < total_samples:
            raise ValueError(f"no samples left to consume: consumed_samples={consumed_samples}, "
                             f"total_samples={total_samples}")
        if micro_batch_size <= 0:
            raise ValueError("micro_batch_size must be positive")
        if data_parallel_size <= 0 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.micro_batch_times_data_parallel_size = micro_batch_size * data_parallel_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        """Micro batches this rank will yield."""
        remaining = self.total_samples - self.consumed_samples
        full = remaining // self.micro_batch_times_data_parallel_size
        if self.drop_last or remaining % self.micro_batch_times_data_parallel_size == 0:
            return full
        start, _ = self._start_end()
        return full + (1 if start < remaining % self.micro_batch_times_data_parallel_size else 0)

    def _start_end(self) -> tuple[int, int]:
        start = self.data_parallel_rank * self.micro_batch_size
        return start, start + self.micro_batch_size

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro_batch_times_data_parallel_size
        start, end = self._start_end()
        batch_start = self.consumed_samples
        while batch_start + step <= self.total_samples:
            yield list(range(batch_start + start, batch_start + end))
            batch_start += step
        if not self.drop_last and batch_start < self.total_samples:
            last = list(range(batch_start, self.total_samples))[start:end]
            if last:
                yield last


class MegatronPretrainingRandomSampler:
    """Shuffled ("cyclic") sampler: each epoch every rank draws a seeded permutation of its own bucket of samples.

    Epoch ``e`` uses ``torch.Generator().manual_seed(seed + e)``; the position inside the epoch comes from
    ``consumed_samples``, so resuming reproduces the exact order. Samples that do not fill a whole global batch at
    the end of the dataset are never used (as in Megatron).
    """

    def __init__(self, dataset: Sized, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, seed: int = 0) -> None:
        if total_samples <= 0:
            raise ValueError(f"no sample to consume: total_samples={total_samples}")
        if micro_batch_size <= 0 or data_parallel_size <= 0 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError("invalid micro batch size or data-parallel rank/size")
        self.dataset = dataset
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.micro_batch_times_data_parallel_size = micro_batch_size * data_parallel_size
        self.last_batch_size = total_samples % self.micro_batch_times_data_parallel_size
        self.seed = seed

    def __len__(self) -> int:
        return self.total_samples // self.micro_batch_times_data_parallel_size

    def __iter__(self) -> Iterator[list[int]]:
        active_total_samples = self.total_samples - self.last_batch_size
        if active_total_samples <= 0:
            return
        epoch = self.consumed_samples // active_total_samples
        current_epoch_samples = self.consumed_samples % active_total_samples
        bucket_size = (self.total_samples // self.micro_batch_times_data_parallel_size) * self.micro_batch_size
        bucket_offset = current_epoch_samples // self.data_parallel_size
        start_idx = self.data_parallel_rank * bucket_size
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        random_idx = torch.randperm(bucket_size, generator=g).tolist()
        idx_range = [start_idx + x for x in random_idx[bucket_offset:]]
        batch: list[int] = []
        for idx in idx_range:
            batch.append(idx)
            if len(batch) == self.micro_batch_size:
                self.consumed_samples += self.micro_batch_times_data_parallel_size
                yield batch
                batch = []


def build_pretraining_data_loader(dataset: torch.utils.data.Dataset, consumed_samples: int, micro_batch_size: int,
                                  data_parallel_rank: int = 0, data_parallel_size: int = 1, *,
                                  dataloader_type: str = "single", num_workers: int = 0, seed: int = 0,
                                  drop_last: bool = True, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """DataLoader yielding this rank's micro batches (dicts of [micro_batch, seq] tensors) from ``consumed_samples``.

    ``dataloader_type`` "single" = ``MegatronPretrainingSampler`` (the dataset is already shuffled by its shuffle
    index), "cyclic" = ``MegatronPretrainingRandomSampler``.
    """
    total = len(dataset)  # type: ignore[arg-type]
    sampler: MegatronPretrainingSampler | MegatronPretrainingRandomSampler
    if dataloader_type == "single":
        sampler = MegatronPretrainingSampler(total, consumed_samples, micro_batch_size, data_parallel_rank,
                                             data_parallel_size, drop_last=drop_last)
    elif dataloader_type == "cyclic":
        sampler = MegatronPretrainingRandomSampler(dataset, total, consumed_samples, micro_batch_size,  # type: ignore[arg-type]
                                                   data_parallel_rank, data_parallel_size, seed=seed)
    else:
        raise ValueError(f"unknown dataloader_type {dataloader_type!r}; expected 'single' or 'cyclic'")
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       pin_memory=pin_memory, persistent_workers=num_workers > 0)
