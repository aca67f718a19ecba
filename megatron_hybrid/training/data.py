"""Datasets and loaders of a run: Megatron-format data through :mod:`megatron_hybrid.data`, or synthetic tokens."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from megatron_hybrid.data import GPTDatasetConfig, build_pretraining_data_loader, build_train_valid_test_datasets
from megatron_hybrid.parallel.state import ParallelGroups
from megatron_hybrid.training.arguments import ResolvedRun, RunConfig

__all__ = ["MockGPTDataset", "build_datasets", "micro_batches"]


class MockGPTDataset(torch.utils.data.Dataset):
    """``--mock-data``: ``num_samples`` samples of uniform random tokens, a pure function of (seed, index).

    For throughput runs and smoke tests without data files; nothing in it is learnable beyond the unigram
    distribution, so the loss only falls to about ln(vocab_size).
    """

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int) -> None:
        self.num_samples = num_samples
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(idx))
        text = torch.randint(0, self.vocab_size, (self.seq_length + 1,), generator=generator)
        return {
            "tokens": text[:-1].clone(),
            "labels": text[1:].clone(),
            "loss_mask": torch.ones(self.seq_length, dtype=torch.float32),
            "position_ids": torch.arange(self.seq_length),
        }


def build_datasets(run: RunConfig, resolved: ResolvedRun, tokenizer: Any) -> tuple[Any, Any, Any]:
    """(train, valid, test) datasets sized for the run (valid / test: ``--eval-iters`` global batches; None when
    their split is empty or evaluation is off). Collective when torch.distributed is initialised (rank 0 builds the
    index caches)."""
    t = run.training
    eval_samples = t.eval_iters * resolved.global_batch_size
    if t.mock_data:
        vocab = tokenizer.vocab_size
        train = MockGPTDataset(resolved.train_samples, t.seq_length, vocab, t.seed)
        held_out = MockGPTDataset(eval_samples, t.seq_length, vocab, t.seed + 1) if eval_samples else None
        return train, held_out, None
    config = GPTDatasetConfig(
        seq_length=t.seq_length,
        random_seed=t.seed,
        split=t.split,
        eod=tokenizer.eod,
        reset_position_ids=t.reset_position_ids,
        reset_attention_mask=t.reset_attention_mask,
        eod_mask_loss=t.eod_mask_loss,
        path_to_cache=t.data_cache_path,
        mmap_bin_files=t.mmap_bin_files,
    )
    sizes = [resolved.train_samples, eval_samples, eval_samples]
    if t.data_path:
        train, valid, test = build_train_valid_test_datasets(t.data_path, sizes, config)
    else:
        blends = [t.train_data_path, t.valid_data_path if eval_samples else None,
                  t.test_data_path if eval_samples else None]
        train, valid, test = build_train_valid_test_datasets(None, sizes, config, blend_per_split=blends)
    if train is None:
        raise ValueError(f"--split {t.split!r} leaves no training documents")
    if not eval_samples:
        valid = test = None
    return train, valid, test


def micro_batches(dataset: Any, run: RunConfig, groups: ParallelGroups, consumed_samples: int
                  ) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro batches from ``consumed_samples`` on (Megatron's sampler; resumable by that integer).

    Creating a DataLoader iterator draws a seed from torch's global generator; it is drawn inside ``fork_rng`` so
    that the training RNG stream (dropout) does not depend on when loaders are created: needed for exact resume.
    """
    t = run.training
    with torch.random.fork_rng(devices=[]):
        loader = build_pretraining_data_loader(
            dataset, consumed_samples, t.micro_batch_size, groups.dp_rank, groups.dp_size,
            dataloader_type=t.dataloader_type, num_workers=t.num_workers, seed=t.seed,
        )
        iterator = iter(loader)
    return iterator
