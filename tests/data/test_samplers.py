"""Data-parallel samplers: disjoint rank shards, and resuming at consumed_samples reproduces the exact stream."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import EOD, random_docs

from megatron_hybrid.data import (
    GPTDatasetConfig,
    MegatronPretrainingRandomSampler,
    MegatronPretrainingSampler,
    build_pretraining_data_loader,
    build_train_valid_test_datasets,
)


def test_sequential_sampler_shards_global_batches() -> None:
    mbs, dp = 3, 4
    per_rank = [list(MegatronPretrainingSampler(50, 0, mbs, r, dp)) for r in range(dp)]
    assert all(len(b) == 50 // (mbs * dp) for b in per_rank)
    for step in range(len(per_rank[0])):
        global_batch = [i for r in range(dp) for i in per_rank[r][step]]
        assert global_batch == list(range(step * mbs * dp, (step + 1) * mbs * dp))
    # without drop_last the trailing partial global batch [48, 50) is split by rank: all of it lands on rank 0
    keep = [MegatronPretrainingSampler(50, 0, mbs, r, dp, drop_last=False) for r in range(dp)]
    assert list(keep[0])[-1] == [48, 49] and list(keep[1])[-1] == [39, 40, 41]
    assert [len(s) for s in keep] == [5, 4, 4, 4] == [len(list(s)) for s in keep]
    with pytest.raises(ValueError, match="no samples left"):
        MegatronPretrainingSampler(50, 50, mbs, 0, dp)
    with pytest.raises(ValueError, match="data_parallel_rank"):
        MegatronPretrainingSampler(50, 0, mbs, 4, dp)


@pytest.mark.parametrize("sampler_cls", [MegatronPretrainingSampler, MegatronPretrainingRandomSampler])
def test_resume_at_consumed_samples(sampler_cls: type) -> None:
    mbs, dp, total = 2, 3, 100
    gbs = mbs * dp

    def make(rank: int, consumed: int) -> object:
        if sampler_cls is MegatronPretrainingSampler:
            return MegatronPretrainingSampler(total, consumed, mbs, rank, dp)
        return MegatronPretrainingRandomSampler(range(total), total, consumed, mbs, rank, dp, seed=1)

    for rank in range(dp):
        full = list(make(rank, 0))
        for steps_done in (0, 1, 7, len(full) - 1):
            assert list(make(rank, steps_done * gbs)) == full[steps_done:]
    # ranks never overlap within an epoch
    seen = [i for rank in range(dp) for batch in make(rank, 0) for i in batch]
    assert len(seen) == len(set(seen))


def test_data_loader_resume_gives_identical_batches(make_dataset, tmp_path: Path) -> None:
    prefix = make_dataset("ds", random_docs(7, 40))
    cfg = GPTDatasetConfig(seq_length=12, split="1,0,0", eod=EOD, return_seq_idx=True,
                           path_to_cache=str(tmp_path / "cache"))
    train, _, _ = build_train_valid_test_datasets(prefix, [200, 0, 0], cfg)
    assert train is not None
    mbs, dp = 4, 2
    for rank in range(dp):
        full = list(build_pretraining_data_loader(train, 0, mbs, rank, dp))
        assert full[0]["tokens"].shape == (mbs, 12) and full[0]["seq_idx"].dtype == torch.int32
        resumed = list(build_pretraining_data_loader(train, 5 * mbs * dp, mbs, rank, dp, num_workers=1))
        assert len(resumed) == len(full) - 5
        for a, b in zip(full[5:], resumed):
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a)
    # rank 0 step 1 holds global samples [8, 12)
    batch = list(build_pretraining_data_loader(train, 0, mbs, 0, dp))[1]
    np.testing.assert_array_equal(batch["tokens"].numpy(), np.stack([train[i]["tokens"] for i in range(8, 12)]))
