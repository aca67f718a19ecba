"""GPT samples: Megatron's index semantics (vs a naive reference and vs megatron-core), masks, splits, caching."""

from __future__ import annotations

import multiprocessing
import os
import traceback
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import EOD, random_docs

from megatron_hybrid.data import (
    PAD_TOKEN_ID,
    GPTDataset,
    GPTDatasetConfig,
    IndexedDataset,
    Split,
    build_sample_index,
    build_train_valid_test_datasets,
    get_ltor_masks_and_position_ids,
)


def _gpt(prefix: str, num_samples: int | None, cache: Path | None, split: Split = Split.train,
         indices: np.ndarray | None = None, **cfg_kwargs: object) -> GPTDataset:
    low = IndexedDataset(prefix)
    cfg = GPTDatasetConfig(**{"seq_length": 16, "random_seed": 5, "eod": EOD, "path_to_cache": str(cache) if cache
                              else None, "cache_indices": cache is not None, **cfg_kwargs})  # type: ignore[arg-type]
    idx = np.arange(len(low), dtype=np.int32) if indices is None else indices
    return GPTDataset(low, prefix, idx, num_samples, split, cfg)


def test_sample_index_matches_megatron_cpp_helper(mcore: object) -> None:
    helpers = mcore.helpers  # type: ignore[attr-defined]
    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(400):
        n = int(rng.integers(1, 25))
        sizes = rng.integers(0 if trial % 4 == 0 else 1, 25, size=n).astype(np.int32)  # some empty documents
        if sizes.sum() < 3 or sizes[-1] == 0:
            continue
        epochs = int(rng.integers(1, 4))
        doc_index = np.tile(np.arange(n, dtype=np.int32), epochs)
        rng.shuffle(doc_index)
        doc_index = np.concatenate([doc_index[doc_index != n - 1], [n - 1]]).astype(np.int32)
        seq = int(rng.integers(2, 17))
        for drop_last in (True, False):
            for extra in (True, False):
                args = (sizes, doc_index, seq, epochs, int(sizes.sum()), drop_last, extra)
                want = helpers.build_sample_idx(*args)
                got = build_sample_index(*args)
                assert got.dtype == want.dtype and got.shape == want.shape
                np.testing.assert_array_equal(got, want, err_msg=str(args))
                checked += 1
    assert checked > 1000


def _naive_samples(low: IndexedDataset, document_index: np.ndarray, seq_length: int, extra: int,
                   drop_last: bool) -> list[np.ndarray]:
    """Concatenate the documents in (shuffled) document order and cut consecutive windows."""
    stream = np.concatenate([low[int(d)] for d in document_index]).astype(np.int64)
    if drop_last:
        n = (len(stream) - extra) // seq_length
    else:
        n = -(-(len(stream) - extra) // seq_length)
    out = []
    for j in range(n):
        window = stream[j * seq_length: j * seq_length + seq_length + extra]
        out.append(np.concatenate([window, np.full(seq_length + extra - len(window), PAD_TOKEN_ID)]))
    return out


@pytest.mark.parametrize(
    "num_samples, split, extra, drop_last",
    [
        (None, Split.train, True, True),  # exactly one epoch
        (150, Split.train, True, True),  # several epochs, last one separate (small remainder)
        (117, Split.train, True, True),  # several epochs, last one blended in (large remainder)
        (40, Split.train, False, True),  # no extra label token
        (None, Split.valid, True, False),  # keep the partial last validation sample (padded)
    ],
)
def test_samples_match_naive_reference(make_dataset, tmp_path: Path, num_samples: int | None, split: Split,
                                       extra: bool, drop_last: bool) -> None:
    prefix = make_dataset("ds", random_docs(1, 30))
    low = IndexedDataset(prefix)
    ds = _gpt(prefix, num_samples, tmp_path / "cache", split=split, add_extra_token_to_sequence=extra,
              drop_last_partial_validation_sequence=drop_last)
    docs = np.arange(len(low))
    tokens_per_epoch = int(low.sequence_lengths.sum())
    epochs = len(ds.document_index) // len(docs)
    assert len(ds.document_index) == epochs * len(docs)
    if num_samples is not None:
        assert len(ds) >= num_samples
        assert (epochs - 1) * tokens_per_epoch < num_samples * 16 + int(extra) <= epochs * tokens_per_epoch
    # every epoch block of the document index holds each document exactly as often as epochs allow
    assert Counter(ds.document_index.tolist()) == {int(d): epochs for d in docs}
    expected = _naive_samples(low, ds.document_index, 16, int(extra), drop_last)
    assert len(ds) == len(expected)
    assert sorted(ds.shuffle_index.tolist()) == list(range(len(ds)))
    for i in range(len(ds)):
        text, _ = ds.get_text(i)
        np.testing.assert_array_equal(text, expected[int(ds.shuffle_index[i])], err_msg=f"sample {i}")
        sample = ds[i]
        want = torch.from_numpy(expected[int(ds.shuffle_index[i])])
        if extra:
            want_tokens, want_labels = want[:-1], want[1:]
        else:
            want_tokens, want_labels = want, torch.cat([want[1:], torch.tensor([PAD_TOKEN_ID])])
        assert torch.equal(sample["tokens"], want_tokens.clamp(min=0))
        assert torch.equal(sample["labels"], want_labels.clamp(min=0))
        assert torch.equal(sample["loss_mask"], (want_labels != PAD_TOKEN_ID).float())
    if num_samples == 150:
        # separate final epoch: the last block is a permutation of the documents on its own
        assert sorted(ds.document_index[-len(docs):].tolist()) == docs.tolist()
        n_first = (((epochs - 1) * tokens_per_epoch) - 1) // 16
        assert sorted(ds.shuffle_index[:n_first].tolist()) == list(range(n_first))
    if split == Split.valid and not drop_last:
        assert (expected[-1] == PAD_TOKEN_ID).any()  # the partial sample is really exercised


@pytest.mark.parametrize("num_samples", [None, 90, 150, 400])
def test_indices_and_samples_match_megatron_core(make_dataset, tmp_path: Path, mcore: object,
                                                 num_samples: int | None) -> None:
    prefix = make_dataset("ds", random_docs(2, 40))
    gd = mcore.gpt_dataset  # type: ignore[attr-defined]

    class Tok:
        vocab_size, eod = 1000, EOD
        unique_identifiers = {"class": "Tok"}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mcfg = gd.GPTDatasetConfig(random_seed=5, sequence_length=16, blend=([prefix], None), split="1,0,0",
                                   tokenizer=Tok(), reset_position_ids=True, reset_attention_mask=False,
                                   eod_mask_loss=True, create_attention_mask=False,
                                   path_to_cache=str(tmp_path / "mcache"))
        low_m = gd.IndexedDataset(prefix)
        theirs = gd.GPTDataset(low_m, prefix, np.arange(40, dtype=np.int32), num_samples, gd.Split.train, mcfg)
    ours = _gpt(prefix, num_samples, tmp_path / "cache", reset_position_ids=True, eod_mask_loss=True)
    np.testing.assert_array_equal(ours.document_index, theirs.document_index)
    np.testing.assert_array_equal(ours.sample_index, theirs.sample_index)
    np.testing.assert_array_equal(ours.shuffle_index, theirs.shuffle_index)
    assert ours.sample_index.dtype == theirs.sample_index.dtype
    assert len(ours) == len(theirs)
    for i in range(len(ours)):
        a, b = ours[i], theirs[i]
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(a[key], b[key]), (key, i)


def test_masks_position_ids_and_seq_idx() -> None:
    tokens = torch.tensor([5, 6, EOD, 7, EOD, EOD, 8, 9])
    loss_mask, pos, seq_idx = get_ltor_masks_and_position_ids(tokens, EOD, reset_position_ids=True,
                                                              eod_mask_loss=True, want_seq_idx=True)
    assert loss_mask.tolist() == [1, 1, 0, 1, 0, 0, 1, 1]
    assert pos.tolist() == [0, 1, 2, 0, 1, 0, 0, 1]
    assert seq_idx is not None and seq_idx.dtype == torch.int32
    assert seq_idx.tolist() == [0, 0, 0, 1, 1, 2, 3, 3]
    loss_mask, pos, seq_idx = get_ltor_masks_and_position_ids(tokens, EOD, False, False, False)
    assert loss_mask.tolist() == [1.0] * 8 and pos.tolist() == list(range(8)) and seq_idx is None


def test_sample_dict_contents(make_dataset, tmp_path: Path) -> None:
    prefix = make_dataset("ds", random_docs(3, 20, max_len=10))
    ds = _gpt(prefix, None, None, reset_attention_mask=True, eod_mask_loss=True)  # seq_idx via the Megatron name
    sample = ds[3]
    assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids", "seq_idx"}
    for key, dtype in (("tokens", torch.int64), ("labels", torch.int64), ("loss_mask", torch.float32),
                       ("position_ids", torch.int64), ("seq_idx", torch.int32)):
        assert sample[key].shape == (16,) and sample[key].dtype == dtype
    tokens = sample["tokens"]
    starts = torch.zeros(16, dtype=torch.int32)
    starts[1:] = (tokens[:-1] == EOD).int()
    assert torch.equal(sample["seq_idx"], torch.cumsum(starts, 0, dtype=torch.int32))
    assert torch.equal(sample["position_ids"], torch.arange(16))  # reset_position_ids is off
    assert torch.equal(sample["loss_mask"], (tokens != EOD).float())
    assert "seq_idx" not in _gpt(prefix, None, None)[0]
    assert ds[None]["loss_mask"].sum() == 0  # batch-padding sample
    with pytest.raises(ValueError, match="need the end-of-document id"):
        GPTDatasetConfig(seq_length=8, return_seq_idx=True)


def test_split_by_documents(make_dataset, tmp_path: Path) -> None:
    docs = [np.full(5, k, dtype=np.int64) for k in range(100)]  # document k holds only the token k
    prefix = make_dataset("ds", docs)
    cfg = GPTDatasetConfig(seq_length=8, split="80,15,5", path_to_cache=str(tmp_path / "cache"))
    train, valid, test = build_train_valid_test_datasets(prefix, [None, None, None], cfg)
    for ds, (lo, hi) in ((train, (0, 80)), (valid, (80, 95)), (test, (95, 100))):
        assert isinstance(ds, GPTDataset)
        np.testing.assert_array_equal(np.sort(ds.indices), np.arange(lo, hi))
        seen = np.unique(np.concatenate([ds[i]["tokens"].numpy() for i in range(len(ds))]))
        assert seen.min() >= lo and seen.max() < hi
    train, valid, test = build_train_valid_test_datasets(prefix, [10, 10, 10], GPTDatasetConfig(seq_length=8,
                                                         split="99,1,0", cache_indices=False))
    assert test is None and valid is not None and len(valid.indices) == 1
    with pytest.raises(ValueError, match="valid split has no documents"):
        build_train_valid_test_datasets(prefix, [10, 10, 0], GPTDatasetConfig(seq_length=8, split="999,1,0",
                                                                              cache_indices=False))


def test_cache_built_once_reused_and_keyed_by_config(make_dataset, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = make_dataset("ds", random_docs(4, 25))
    cache = tmp_path / "cache"
    first = _gpt(prefix, 100, cache)
    files = sorted(os.listdir(cache))
    assert len(files) == 4 and all(f.startswith(first.unique_description_hash) for f in files)
    assert not any(".tmp" in f for f in files)

    def fail(self: GPTDataset) -> None:
        raise AssertionError("indices rebuilt despite a complete cache")

    monkeypatch.setattr(GPTDataset, "_build_indices", fail)
    again = _gpt(prefix, 100, cache)
    assert isinstance(again.sample_index, np.memmap)  # loaded, memory-mapped
    for name in ("document_index", "sample_index", "shuffle_index"):
        np.testing.assert_array_equal(getattr(again, name), getattr(first, name))
    monkeypatch.undo()
    other = _gpt(prefix, 100, cache, random_seed=6)  # another seed -> another cache entry
    assert other.unique_description_hash != first.unique_description_hash
    assert len(os.listdir(cache)) == 8
    # default location: <directory of the data prefix>/cache/GPTDataset_indices
    default = _gpt(prefix, None, None, cache_indices=True)
    assert os.path.isfile(os.path.join(os.path.dirname(prefix), "cache", "GPTDataset_indices",
                                       f"{default.unique_description_hash}-GPTDataset-train-description.txt"))


def _rank_main(rank: int, tmp: str, prefix: str, results: multiprocessing.Queue) -> None:
    try:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2)
        builds = []
        original = GPTDataset._build_indices

        def counting(self: GPTDataset) -> dict[str, np.ndarray]:
            builds.append(rank)
            return original(self)

        GPTDataset._build_indices = counting  # type: ignore[method-assign]
        ds = _gpt(prefix, 200, Path(tmp) / "cache")
        results.put((rank, len(builds), ds.shuffle_index[:50].tolist(), ds[7]["tokens"].tolist()))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report to the parent
        results.put((rank, -1, traceback.format_exc(), None))


def test_distributed_rank0_builds_others_load(make_dataset, tmp_path: Path) -> None:
    prefix = make_dataset("ds", random_docs(5, 30))
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, str(tmp_path), prefix, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict((r, (n, a, b)) for r, n, a, b in (results.get(timeout=60) for _ in procs))
    for p in procs:
        p.join(timeout=30)
    assert got[0][0] == 1 and got[1][0] == 0, got  # rank 0 built, rank 1 waited and loaded
    assert got[0][1:] == got[1][1:]
