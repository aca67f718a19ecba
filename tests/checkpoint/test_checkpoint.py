"""Checkpoint save / load: exact round trip, atomicity under a crash mid-save, corrupted or missing shards,
--keep-last-n, no unpickling, inference loading."""

from __future__ import annotations

import json
import os
import pickle
import random

import numpy as np
import pytest
import torch
from training_helpers import BYTE_VOCAB, run_flags

import megatron_hybrid.checkpoint.checkpointing as ckpt
from megatron_hybrid.checkpoint import (
    CheckpointError,
    checkpoint_iterations,
    get_rng_state,
    load_checkpoint,
    load_model_for_inference,
    read_tracker,
    save_checkpoint,
    set_rng_state,
)
from megatron_hybrid.models.mamba_model import MambaModel
from megatron_hybrid.training import TrainOptimizer, parse_args


def _setup(seed: int) -> tuple[MambaModel, TrainOptimizer]:
    torch.manual_seed(seed)
    run = parse_args(run_flags("unused"))
    model = MambaModel(run.model_config(BYTE_VOCAB))
    return model, TrainOptimizer(model, model.groups, lr=1e-2, betas=(0.9, 0.95))


def _train(model: MambaModel, optimizer: TrainOptimizer, steps: int = 2) -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        tokens = torch.randint(0, BYTE_VOCAB, (2, 16), generator=generator)
        optimizer.zero_grad()
        model(tokens, labels=tokens.roll(-1, 1)).mean().backward()
        optimizer.clip_and_step(1.0)


def _save(root, iteration: int, model, optimizer, **kw) -> str:
    return save_checkpoint(root, iteration, model, optimizer=optimizer, scheduler_state={"num_steps": iteration * 8},
                           consumed_train_samples=iteration * 8, run_config={"hello": "world"}, **kw)


def test_round_trip_restores_everything(tmp_path) -> None:
    model, optimizer = _setup(0)
    _train(model, optimizer)
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"not really sentencepiece")
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    rng = get_rng_state()
    path = _save(tmp_path / "ck", 2, model, optimizer,
                 tokenizer_args={"tokenizer_type": "GPTSentencePieceTokenizer", "tokenizer_model": str(tok)})
    assert path.endswith("iter_0000002") and read_tracker(tmp_path / "ck") == 2
    assert sorted(os.listdir(path)) == ["metadata.json", "model_tp00_pp000.safetensors",
                                        "optim_tp00_pp000_dp000.safetensors", "rng_rank00000.json", "tokenizer"]
    expected_next = (random.random(), np.random.rand(), torch.rand(3))
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}

    fresh, fresh_optimizer = _setup(1)
    loaded = load_checkpoint(tmp_path / "ck", fresh, optimizer=fresh_optimizer)
    assert loaded.iteration == 2 and loaded.consumed_train_samples == 16
    assert loaded.scheduler_state == {"num_steps": 16} and loaded.metadata["args"] == {"hello": "world"}
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    ours, theirs = optimizer.named_states(), fresh_optimizer.named_states()
    assert ours.keys() == theirs.keys() and len(ours) == len(list(model.parameters()))
    for name in ours:
        for key in ours[name]:
            assert torch.equal(ours[name][key], theirs[name][key]), (name, key)
    set_rng_state(loaded.rng_state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert again[:2] == expected_next[:2] and torch.equal(again[2], expected_next[2])
    assert rng == json.loads(json.dumps(rng))

    # both continue identically
    _train(model, optimizer, 1)
    _train(fresh, fresh_optimizer, 1)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name

    inference, config, tokenizer_args = load_model_for_inference(tmp_path / "ck", iteration=2)
    assert config == model.config and not inference.training
    for name, value in inference.state_dict().items():
        assert torch.equal(value, saved_weights[name]), name
    assert tokenizer_args["tokenizer_model"] == os.path.join(path, "tokenizer", "tok.model")
    assert open(tokenizer_args["tokenizer_model"], "rb").read() == b"not really sentencepiece"


def test_inference_model_matches_saved_weights(tmp_path) -> None:
    model, optimizer = _setup(0)
    _train(model, optimizer)
    _save(tmp_path, 3, model, optimizer)
    inference, _, _ = load_model_for_inference(tmp_path / "iter_0000003")
    tokens = torch.randint(0, BYTE_VOCAB, (2, 12))
    torch.testing.assert_close(inference(tokens), model.eval()(tokens), rtol=0, atol=0)


def test_crash_mid_save_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch) -> None:
    model, optimizer = _setup(0)
    _train(model, optimizer, 1)
    _save(tmp_path, 1, model, optimizer)
    weights_at_1 = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, optimizer, 1)

    real = ckpt._save_tensors
    calls = {"n": 0}

    def dies_on_optimizer_file(path, tensors):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash while writing the optimizer shard")
        return real(path, tensors)

    monkeypatch.setattr(ckpt, "_save_tensors", dies_on_optimizer_file)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, model, optimizer)
    monkeypatch.setattr(ckpt, "_save_tensors", real)
    assert read_tracker(tmp_path) == 1 and checkpoint_iterations(tmp_path) == [1]
    assert os.path.isdir(tmp_path / "iter_0000002.tmp") and not os.path.exists(tmp_path / "iter_0000002")

    # a crash after the directory rename but before the tracker update: still the previous one
    monkeypatch.setattr(ckpt, "_write_tracker", lambda root, it: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        _save(tmp_path, 2, model, optimizer)
    monkeypatch.undo()
    assert read_tracker(tmp_path) == 1

    fresh, fresh_optimizer = _setup(1)
    loaded = load_checkpoint(tmp_path, fresh, optimizer=fresh_optimizer)
    assert loaded.iteration == 1
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, weights_at_1[name]), name

    _save(tmp_path, 2, model, optimizer)  # a later save completes and cleans up
    assert read_tracker(tmp_path) == 2 and not os.path.exists(tmp_path / "iter_0000002.tmp")


def test_corrupted_missing_or_truncated_shards_are_named(tmp_path) -> None:
    model, optimizer = _setup(0)
    _train(model, optimizer, 1)
    path = _save(tmp_path, 1, model, optimizer)
    shard = os.path.join(path, "model_tp00_pp000.safetensors")
    original = open(shard, "rb").read()
    fresh, fresh_optimizer = _setup(1)

    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match=r"model_tp00_pp000\.safetensors is corrupted: SHA-256"):
        load_checkpoint(tmp_path, fresh)
    open(shard, "wb").write(original[:-100])
    with pytest.raises(CheckpointError, match=r"model_tp00_pp000\.safetensors is truncated or corrupted"):
        load_checkpoint(tmp_path, fresh)
    open(shard, "wb").write(b"\x00" * len(original))  # right size, garbage header, no verification
    with pytest.raises(CheckpointError, match=r"model_tp00_pp000\.safetensors cannot be read"):
        load_checkpoint(tmp_path, fresh, verify=False)
    os.remove(shard)
    with pytest.raises(CheckpointError, match=r"model_tp00_pp000\.safetensors is missing"):
        load_checkpoint(tmp_path, fresh)
    open(shard, "wb").write(original)
    os.remove(os.path.join(path, "optim_tp00_pp000_dp000.safetensors"))
    with pytest.raises(CheckpointError, match=r"optim_tp00_pp000_dp000\.safetensors is missing"):
        load_checkpoint(tmp_path, fresh, optimizer=fresh_optimizer)
    assert load_checkpoint(tmp_path, fresh, optimizer=fresh_optimizer, load_optim=False).iteration == 1

    meta = os.path.join(path, "metadata.json")
    open(meta, "w").write("{ not json")
    with pytest.raises(CheckpointError, match=r"metadata\.json is unreadable or corrupted"):
        load_checkpoint(tmp_path, fresh)
    os.remove(meta)
    with pytest.raises(CheckpointError, match=r"metadata\.json is missing"):
        load_checkpoint(tmp_path, fresh)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("garbage")
    with pytest.raises(CheckpointError, match=r"latest_checkpointed_iteration\.txt: expected an iteration number"):
        load_checkpoint(tmp_path, fresh)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("7")
    with pytest.raises(CheckpointError, match=r"iter_0000007 does not exist"):
        load_checkpoint(tmp_path, fresh)
    assert load_checkpoint(tmp_path / "empty", fresh) is None


def test_keep_last_n(tmp_path) -> None:
    model, optimizer = _setup(0)
    _train(model, optimizer, 1)
    for iteration in range(1, 6):
        _save(tmp_path, iteration, model, optimizer, keep_last_n=2)
    assert checkpoint_iterations(tmp_path) == [4, 5] and read_tracker(tmp_path) == 5
    assert sorted(os.listdir(tmp_path)) == ["iter_0000004", "iter_0000005", "latest_checkpointed_iteration.txt"]


def test_loading_never_unpickles(tmp_path, monkeypatch) -> None:
    model, optimizer = _setup(0)
    _train(model, optimizer, 1)
    _save(tmp_path, 1, model, optimizer)

    def forbidden(*args, **kwargs):
        raise AssertionError("checkpoint loading must not unpickle")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    fresh, fresh_optimizer = _setup(1)
    assert load_checkpoint(tmp_path, fresh, optimizer=fresh_optimizer).iteration == 1
    load_model_for_inference(tmp_path)
