"""Blended datasets: Megatron's greedy index, ratios within 1%, --data-path parsing, builder parity with Megatron."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import EOD

from megatron_hybrid.data import (
    BlendedDataset,
    GPTDataset,
    GPTDatasetConfig,
    build_blending_indices,
    build_exhaustive_blending_indices,
    build_train_valid_test_datasets,
    parse_data_path,
)


def _two_sources(make_dataset) -> tuple[str, str]:
    """Source A only has tokens < 500, source B only tokens >= 500 (then EOD)."""
    rng = np.random.default_rng(0)
    a = [np.concatenate([rng.integers(0, 500, int(rng.integers(5, 40))), [EOD]]) for _ in range(60)]
    b = [np.concatenate([rng.integers(500, 999, int(rng.integers(5, 40))), [EOD]]) for _ in range(90)]
    return make_dataset("a", a), make_dataset("b", b)


@pytest.mark.parametrize("weights, size", [([0.3, 0.7], 5000), ([0.2, 0.5, 0.3], 3001),
                                           ([0.05, 0.15, 0.3, 0.1, 0.4], 4000), ([1.0], 10)])
def test_greedy_index_matches_megatron(mcore: object, weights: list[float], size: int) -> None:
    helpers = mcore.helpers  # type: ignore[attr-defined]
    want_ds, want_sample = np.zeros(size, np.int16), np.zeros(size, np.int64)
    helpers.build_blending_indices(want_ds, want_sample, np.asarray(weights), len(weights), size, False)
    got_ds, got_sample = build_blending_indices(weights, size)
    np.testing.assert_array_equal(got_ds, want_ds)
    np.testing.assert_array_equal(got_sample, want_sample)
    counts = np.bincount(got_ds, minlength=len(weights))
    assert np.all(np.abs(counts - np.asarray(weights) * size) <= 1.0)


def test_exhaustive_index_matches_megatron(mcore: object) -> None:
    sizes = [17, 5, 40]
    want_ds, want_sample = np.zeros(62, np.int16), np.zeros(62, np.int64)
    mcore.helpers.build_exhaustive_blending_indices(want_ds, want_sample,  # type: ignore[attr-defined]
                                                    np.asarray(sizes, np.int64), 3)
    got_ds, got_sample = build_exhaustive_blending_indices(sizes)
    np.testing.assert_array_equal(got_ds, want_ds)
    np.testing.assert_array_equal(got_sample, want_sample)


def test_blend_ratios_within_one_percent(make_dataset, tmp_path: Path) -> None:
    a, b = _two_sources(make_dataset)
    cfg = GPTDatasetConfig(seq_length=16, split="90,10,0", eod=EOD, path_to_cache=str(tmp_path / "cache"))
    train, valid, test = build_train_valid_test_datasets(["0.3", a, "0.7", b], [3000, 200, 0], cfg)
    assert isinstance(train, BlendedDataset) and isinstance(valid, BlendedDataset) and test is None
    assert len(train) >= 3000 and len(valid) >= 200
    for ds in (train, valid):
        # measured on the samples themselves: which source did each come from?
        content = [ds[i]["tokens"][ds[i]["tokens"] != EOD] for i in range(len(ds))]
        from_b = np.array([bool((c >= 500).all()) for c in content])
        from_a = np.array([bool((c < 500).all()) for c in content])
        assert (from_a ^ from_b).all()
        assert abs(from_b.mean() - 0.7) <= 0.01 and abs(from_a.mean() - 0.3) <= 0.01
        # and at every prefix of 100+ samples (the greedy index never drifts)
        running = np.cumsum(from_b) / np.arange(1, len(ds) + 1)
        assert np.all(np.abs(running[99:] - 0.7) <= 0.01)
    # a second build loads the cached blend index
    train2, _, _ = build_train_valid_test_datasets(f"0.3 {a} 0.7 {b}", [3000, 200, 0], cfg)
    assert isinstance(train2, BlendedDataset) and isinstance(train2.dataset_index, np.memmap)
    np.testing.assert_array_equal(train2.dataset_index, train.dataset_index)


@pytest.mark.parametrize("weighted", [True, False])
def test_builder_matches_megatron(make_dataset, tmp_path: Path, mcore: object, weighted: bool) -> None:
    a, b = _two_sources(make_dataset)
    blend = ([a, b], [0.4, 0.6] if weighted else None)
    sizes = [700, 60, 20] if weighted else [300, None, None]

    class Tok:
        vocab_size, eod = 1000, EOD
        unique_identifiers = {"class": "Tok"}

    gd, bb = mcore.gpt_dataset, mcore.builder  # type: ignore[attr-defined]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mcfg = gd.GPTDatasetConfig(random_seed=3, sequence_length=16, blend=blend, split="80,15,5", tokenizer=Tok(),
                                   reset_position_ids=True, reset_attention_mask=False, eod_mask_loss=True,
                                   create_attention_mask=False, path_to_cache=None)
        theirs = bb.BlendedMegatronDatasetBuilder(gd.GPTDataset, sizes, lambda: True, mcfg).build()
    cfg = GPTDatasetConfig(seq_length=16, random_seed=3, split="80,15,5", eod=EOD, reset_position_ids=True,
                           eod_mask_loss=True, path_to_cache=str(tmp_path / "cache"))
    ours = build_train_valid_test_datasets(blend, sizes, cfg)
    for t, o in zip(theirs, ours):
        assert type(t).__name__ == type(o).__name__ == "BlendedDataset"
        assert len(t) == len(o)
        for i in range(len(o)):
            x, y = t[i], o[i]
            for key in ("tokens", "labels", "loss_mask", "position_ids"):
                assert torch.equal(x[key], y[key]), (key, i)


def test_blend_per_split(make_dataset, tmp_path: Path) -> None:
    a, b = _two_sources(make_dataset)
    cfg = GPTDatasetConfig(seq_length=16, eod=EOD, path_to_cache=str(tmp_path / "cache"))
    train, valid, test = build_train_valid_test_datasets(None, [100, 10, None], cfg,
                                                         blend_per_split=[f"1 {a} 1 {b}", a, None])
    assert isinstance(train, BlendedDataset) and isinstance(valid, GPTDataset) and test is None
    np.testing.assert_array_equal(valid.indices, np.arange(60))  # the whole of A


def test_parse_data_path() -> None:
    assert parse_data_path("0.3 A 0.7 B") == (["A", "B"], [0.3, 0.7])
    assert parse_data_path(["30", "A", "70", "B"]) == (["A", "B"], [30.0, 70.0])
    assert parse_data_path(["A"]) == (["A"], None)
    assert parse_data_path("A B C") == (["A", "B", "C"], None)
    assert parse_data_path(None) is None
    for bad in ("0.3 A B", "A 0.3", "0.3 A 0.7", ""):
        with pytest.raises(ValueError):
            parse_data_path(bad)
