"""Sharded training checkpoints: every rank writes its own part, a crash never leaves a half-written "latest".

Format (``FORMAT``), one directory per saved iteration, Megatron's layout::

    <save>/latest_checkpointed_iteration.txt     the newest COMPLETE iteration ("10"), replaced atomically
    <save>/iter_0000010/
        metadata.json                            written last: what is where, plus run state (see below)
        model_tp00_pp000.safetensors             this (tp, pp) rank's local parameter shards, written by dp rank 0
        optim_tp00_pp000_dp000.safetensors       Adam states (exp_avg, exp_avg_sq, step) of the parameters that
                                                 data-parallel rank 0 owns (all of them without ZeRO)
        rng_rank00000.json                       python / numpy / torch / CUDA generator states of global rank 0
        tokenizer/                               copy of the tokenizer files (small), so a checkpoint is
                                                 self-contained for inference

Why our own files instead of ``torch.distributed.checkpoint``: DCP's ``.metadata`` is a pickle, and loading must
never unpickle anything. Tensors are in safetensors files (a JSON header and raw bytes); everything else is JSON.

Tensors are named by their FULL (TP=1) state-dict name. ``metadata.json`` records, for each, the full shape, dtype,
``tp_dim`` and ``tp_components`` (see :mod:`megatron_hybrid.parallel.sharding`) and which file holds each tensor-
parallel rank's shard. Loading into a different TP size therefore unshards and reshards on the fly, and since
layers keep their global index and Adam states are named by parameter, other data-parallel and pipeline sizes load
the same way: a pipeline stage reads the tensors of the layers it owns, whichever stage's file holds them. The last
stage's copy of a tied embedding (``output_layer.weight`` marked ``shared_embedding``) is not a tensor of the
unsplit model: it is not saved, and loads from ``embedding.word_embeddings.weight`` (weights and Adam states).
``metadata.json`` also holds: ``iteration``, ``consumed_train_samples``, the scheduler state, ``args`` (the run
configuration), ``model_config`` (HybridConfig), ``tokenizer`` (how to rebuild it), the parallel layout (tensor,
pipeline, context, data sizes) and the size and SHA-256 of every file, checked on load, so a truncated or corrupted
shard is reported by name.

Atomicity: all ranks write into ``iter_XXXXXXX.tmp``; after a barrier rank 0 writes ``metadata.json``, fsyncs,
renames the directory to ``iter_XXXXXXX`` and only then replaces the tracker file (temp file + ``os.replace``). A
crash at any point leaves the previous checkpoint and tracker untouched. Multi-node runs need ``--save`` on a
filesystem shared by all nodes (as Megatron does).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megatron_hybrid.checkpoint.rng import get_rng_state
from megatron_hybrid.parallel.sharding import is_tensor_parallel, shard_tensor, unshard_tensors
from megatron_hybrid.parallel.state import ParallelGroups
from megatron_hybrid.parallel.tied_embeddings import is_shared_embedding_copy

__all__ = [
    "FORMAT",
    "METADATA_FILE",
    "TRACKER_FILE",
    "CheckpointError",
    "LoadedCheckpoint",
    "checkpoint_iterations",
    "iteration_dir",
    "load_checkpoint",
    "load_model_state",
    "read_metadata",
    "read_tracker",
    "resolve_checkpoint_dir",
    "save_checkpoint",
]

FORMAT = "megatron_hybrid.sharded_safetensors/1"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
METADATA_FILE = "metadata.json"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")
_OPT_SEP = "#"
_TOKENIZER_COPY_LIMIT = 64 * 1024 * 1024
_EMBEDDING_KEY = "embedding.word_embeddings.weight"
_LAYER_KEY_RE = re.compile(r"^decoder\.layers\.(\d+)\.")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or does not match the model; the message names the file."""


# ----------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------


def iteration_dir(root: str | os.PathLike, iteration: int) -> str:
    """``<root>/iter_0000010``."""
    return os.path.join(os.fspath(root), f"iter_{iteration:07d}")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json_atomic(path: str, data: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _file_record(path: str) -> dict[str, Any]:
    _fsync_path(path)
    return {"bytes": os.path.getsize(path), "sha256": _sha256(path)}


def _save_tensors(path: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    from safetensors.torch import save_file

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    try:
        save_file(cpu, path, metadata={"format": FORMAT})
    except RuntimeError:  # tensors sharing storage: give each its own copy
        save_file({k: v.clone() for k, v in cpu.items()}, path, metadata={"format": FORMAT})
    return _file_record(path)


def read_tracker(root: str | os.PathLike) -> int | None:
    """The iteration named by ``<root>/latest_checkpointed_iteration.txt``, or None if there is no tracker."""
    path = os.path.join(os.fspath(root), TRACKER_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path}: expected an iteration number, found {text!r}")
    return int(text)


def checkpoint_iterations(root: str | os.PathLike) -> list[int]:
    """Iterations of the COMPLETE checkpoints under ``root`` (those with a metadata.json), ascending."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _ITER_RE.match(name)
        if match and os.path.exists(os.path.join(root, name, METADATA_FILE)):
            found.append(int(match.group(1)))
    return sorted(found)


def resolve_checkpoint_dir(path: str | os.PathLike, iteration: int | None = None) -> str | None:
    """The iteration directory to load: ``path`` itself if it holds a metadata.json, else ``iteration`` (or the
    tracker's) under ``path``. None when ``path`` holds no checkpoint at all."""
    path = os.fspath(path)
    if os.path.exists(os.path.join(path, METADATA_FILE)):
        return path
    if iteration is None:
        iteration = read_tracker(path)
        if iteration is None:
            return None
    directory = iteration_dir(path, iteration)
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory {directory} does not exist (named by "
                              f"{os.path.join(path, TRACKER_FILE)} or --ckpt-step)")
    return directory


def read_metadata(directory: str) -> dict[str, Any]:
    """Parse and check ``<directory>/metadata.json``."""
    path = os.path.join(directory, METADATA_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"{path} is missing: {directory} is not a complete checkpoint (a save was "
                              "interrupted?)")
    try:
        with open(path, encoding="utf-8") as f:
            metadata = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is unreadable or corrupted: {exc}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else type(metadata).__name__
        raise CheckpointError(f"{path}: unknown checkpoint format {found!r} (expected {FORMAT!r})")
    return metadata


# ----------------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------------


def _saved_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as saved: without a last pipeline stage's copy of the tied embedding."""
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if not is_shared_embedding_copy(v)}


def _checkpoint_names(model: nn.Module) -> dict[str, str]:
    """Checkpoint name of every state-dict entry of ``model``: its own name, except the tied-embedding copy, which
    is stored as the embedding."""
    return {k: _EMBEDDING_KEY if is_shared_embedding_copy(v) else k
            for k, v in model.state_dict(keep_vars=True).items()}


def _stage_owns(model: nn.Module, key: str) -> bool:
    """Whether checkpoint tensor ``key`` (a name of the unsplit model) belongs to ``model``, which may be one
    pipeline stage (embedding on the first, final norm and output layer on the last, a range of layers each)."""
    if key.startswith("embedding."):
        return getattr(model, "pre_process", True)
    if key.startswith(("output_layer.", "decoder.final_norm.")):
        return getattr(model, "post_process", True)
    match = _LAYER_KEY_RE.match(key)
    layer_range = getattr(getattr(model, "decoder", None), "layer_range", None)
    if match and layer_range is not None:
        return layer_range[0] <= int(match.group(1)) < layer_range[1]
    return True


def _tensor_entry(tensor: torch.Tensor) -> dict[str, Any]:
    entry: dict[str, Any] = {"shape": list(tensor.shape), "dtype": _dtype_name(tensor.dtype)}
    if is_tensor_parallel(tensor):
        entry["tp_dim"] = int(tensor.tp_dim)
        entry["tp_components"] = [int(c) for c in tensor.tp_components]
    return entry


def _copy_tokenizer_files(tokenizer_args: Mapping[str, Any], target: str) -> dict[str, Any]:
    """Copy the tokenizer's files into ``target``; return the args with paths relative to the checkpoint."""
    args = dict(tokenizer_args)
    paths = {key: args.get(key) for key in ("tokenizer_model", "vocab_file", "merge_file") if args.get(key)}
    sources = []
    for path in paths.values():
        if os.path.isdir(path):
            sources.extend(os.path.join(path, n) for n in sorted(os.listdir(path))
                           if os.path.isfile(os.path.join(path, n)))
        elif os.path.isfile(path):
            sources.append(path)
    if not sources or sum(os.path.getsize(s) for s in sources) > _TOKENIZER_COPY_LIMIT:
        return args
    os.makedirs(target, exist_ok=True)
    for key, path in paths.items():
        if os.path.isdir(path):
            for name in sorted(os.listdir(path)):
                if os.path.isfile(os.path.join(path, name)):
                    shutil.copyfile(os.path.join(path, name), os.path.join(target, name))
            args[key] = "tokenizer"
        else:
            shutil.copyfile(path, os.path.join(target, os.path.basename(path)))
            args[key] = os.path.join("tokenizer", os.path.basename(path))
    args["files_in_checkpoint"] = True
    return args


def _config_to_dict(config: Any) -> dict[str, Any]:
    import dataclasses

    result = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, torch.dtype):
            value = _dtype_name(value)
        elif isinstance(value, tuple):
            value = list(value)
        result[f.name] = value
    return result


def save_checkpoint(
    root: str | os.PathLike,
    iteration: int,
    model: nn.Module,
    groups: ParallelGroups | None = None,
    *,
    optimizer: Any = None,
    scheduler_state: Mapping[str, Any] | None = None,
    consumed_train_samples: int = 0,
    run_config: Mapping[str, Any] | None = None,
    tokenizer_args: Mapping[str, Any] | None = None,
    keep_last_n: int | None = None,
    save_rng: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Save a sharded checkpoint of ``iteration`` under ``root`` (collective: every rank calls it).

    ``optimizer`` is a :class:`megatron_hybrid.training.optimizer.TrainOptimizer` (None: weights only). Returns the
    final directory. After the save, only the newest ``keep_last_n`` checkpoints are kept (None: all).
    """
    groups = groups if groups is not None else ParallelGroups.single()
    root = os.fspath(root)
    rank = _rank()
    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):
            if name.startswith("iter_") and name.endswith((".tmp", ".old")):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        os.makedirs(tmp)
    _barrier()

    tp, pp, dp = groups.tp_rank, groups.pp_rank, groups.dp_cp_rank
    manifest: dict[str, Any] = {"rank": rank, "tp_rank": tp, "pp_rank": pp, "dp_rank": dp, "files": {},
                                "model": {}, "optimizer": {}}
    if dp == 0:
        state = _saved_state(model)
        name = f"model_tp{tp:02d}_pp{pp:03d}.safetensors"
        manifest["files"][name] = _save_tensors(os.path.join(tmp, name), dict(state))
        manifest["model"] = {key: {**_tensor_entry(t), "file": name} for key, t in state.items()}
    if optimizer is not None:
        params = dict(model.named_parameters())
        # The tied-embedding copy's states equal the embedding's (same values, same gradients): saved once, as those.
        states = {n: st for n, st in optimizer.named_states().items() if not is_shared_embedding_copy(params[n])}
        if states and (optimizer.distributed or dp == 0):
            name = f"optim_tp{tp:02d}_pp{pp:03d}_dp{dp:03d}.safetensors"
            tensors = {f"{pname}{_OPT_SEP}{key}": value for pname, st in states.items() for key, value in st.items()}
            manifest["files"][name] = _save_tensors(os.path.join(tmp, name), tensors)
            for pname, st in states.items():
                param = params[pname]
                entry: dict[str, Any] = {"file": name, "states": {}}
                if is_tensor_parallel(param):
                    entry["tp_dim"] = int(param.tp_dim)
                    entry["tp_components"] = [int(c) for c in param.tp_components]
                for key, value in st.items():
                    entry["states"][key] = {"shape": list(value.shape), "dtype": _dtype_name(value.dtype),
                                            "sharded": value.shape == param.shape and is_tensor_parallel(param)}
                manifest["optimizer"][pname] = entry
    if save_rng:
        name = f"rng_rank{rank:05d}.json"
        _write_json_atomic(os.path.join(tmp, name), get_rng_state())
        manifest["files"][name] = _file_record(os.path.join(tmp, name))
    _write_json_atomic(os.path.join(tmp, f"manifest_rank{rank:05d}.json"), manifest)
    _barrier()

    if rank == 0:
        metadata = _assemble_metadata(tmp, groups, iteration, consumed_train_samples, scheduler_state, run_config,
                                      tokenizer_args, model, optimizer, extra)
        _write_json_atomic(os.path.join(tmp, METADATA_FILE), metadata)
        _fsync_path(tmp)
        if os.path.exists(final):  # re-saving an iteration: swap the old copy out, then drop it
            os.rename(final, final + ".old")
        os.rename(tmp, final)
        _fsync_path(root)
        _write_tracker(root, iteration)
        shutil.rmtree(final + ".old", ignore_errors=True)
        if keep_last_n is not None:
            _prune(root, keep_last_n, protect=iteration)
    _barrier()
    return final


def _assemble_metadata(tmp: str, groups: ParallelGroups, iteration: int, consumed: int,
                       scheduler_state: Mapping[str, Any] | None, run_config: Mapping[str, Any] | None,
                       tokenizer_args: Mapping[str, Any] | None, model: nn.Module, optimizer: Any,
                       extra: Mapping[str, Any] | None) -> dict[str, Any]:
    manifests = []
    for rank in range(_world()):
        path = os.path.join(tmp, f"manifest_rank{rank:05d}.json")
        with open(path, encoding="utf-8") as f:
            manifests.append(json.load(f))
    tp_size = groups.tp_size
    files: dict[str, Any] = {}
    model_index: dict[str, Any] = {}
    optim_index: dict[str, Any] = {}
    for m in manifests:
        files.update(m["files"])
        for key, entry in m["model"].items():
            target = model_index.setdefault(key, {k: v for k, v in entry.items() if k not in ("file", "shape")}
                                            | {"local_shape": entry["shape"], "shards": [None] * tp_size})
            target["shards"][m["tp_rank"]] = entry["file"]
        for pname, entry in m["optimizer"].items():
            target = optim_index.setdefault(pname, {k: v for k, v in entry.items() if k != "file"}
                                            | {"shards": [None] * tp_size})
            target["shards"][m["tp_rank"]] = entry["file"]
    for entry in model_index.values():
        shape = list(entry["local_shape"])
        if "tp_dim" in entry:
            shape[entry["tp_dim"]] *= tp_size
        entry["shape"] = shape
    tokenizer = dict(tokenizer_args) if tokenizer_args else None
    if tokenizer:
        tokenizer = _copy_tokenizer_files(tokenizer, os.path.join(tmp, "tokenizer"))
    for m in range(len(manifests)):
        os.remove(os.path.join(tmp, f"manifest_rank{m:05d}.json"))
    config = getattr(model, "config", None)
    return {
        "format": FORMAT,
        "iteration": iteration,
        "consumed_train_samples": consumed,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "parallel": {
            "tensor_model_parallel_size": tp_size,
            "pipeline_model_parallel_size": groups.pp_size,
            "context_parallel_size": groups.cp_size,
            "data_parallel_size": groups.dp_size,
            "world_size": _world(),
            "distributed_optimizer": bool(getattr(optimizer, "distributed", False)),
        },
        "model_config": _config_to_dict(config) if config is not None else None,
        "tokenizer": tokenizer,
        "args": dict(run_config) if run_config is not None else None,
        "scheduler": dict(scheduler_state) if scheduler_state is not None else None,
        "extra": dict(extra) if extra else {},
        "files": files,
        "model": model_index,
        "optimizer": optim_index,
    }


def _write_tracker(root: str, iteration: int) -> None:
    path = os.path.join(root, TRACKER_FILE)
    tmp = os.path.join(root, f".{TRACKER_FILE}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(root)


def _prune(root: str, keep_last_n: int, protect: int) -> None:
    if keep_last_n < 1:
        raise ValueError(f"keep_last_n must be >= 1, got {keep_last_n}")
    iterations = checkpoint_iterations(root)
    for it in iterations[:-keep_last_n]:
        if it != protect:
            shutil.rmtree(iteration_dir(root, it), ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` restored, and the run state the caller applies itself."""

    path: str
    iteration: int
    consumed_train_samples: int
    metadata: dict[str, Any]
    scheduler_state: dict[str, Any] | None = None
    rng_state: dict[str, Any] | None = None
    optimizer_loaded: bool = False
    notes: list[str] = field(default_factory=list)


class _ShardReader:
    """Reads tensors from a checkpoint's safetensors files, verifying each file once (size, SHA-256)."""

    def __init__(self, directory: str, metadata: dict[str, Any], verify: bool) -> None:
        self.directory = directory
        self.files = metadata.get("files", {})
        self.verify = verify
        self.checked: set[str] = set()
        self.handles: dict[str, Any] = {}

    def _check(self, name: str) -> str:
        path = os.path.join(self.directory, name)
        if name in self.checked:
            return path
        if not os.path.exists(path):
            raise CheckpointError(f"checkpoint file {path} is missing")
        record = self.files.get(name)
        if record is None:
            raise CheckpointError(f"checkpoint file {path} is not listed in {METADATA_FILE}")
        size = os.path.getsize(path)
        if size != record["bytes"]:
            raise CheckpointError(f"checkpoint file {path} is truncated or corrupted: {size} bytes, expected "
                                  f"{record['bytes']}")
        if self.verify and _sha256(path) != record["sha256"]:
            raise CheckpointError(f"checkpoint file {path} is corrupted: SHA-256 does not match {METADATA_FILE}")
        self.checked.add(name)
        return path

    def get(self, name: str, key: str) -> torch.Tensor:
        path = self._check(name)
        if name not in self.handles:
            from safetensors import SafetensorError, safe_open

            try:
                self.handles[name] = safe_open(path, framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(f"checkpoint file {path} cannot be read: {exc}") from None
        try:
            return self.handles[name].get_tensor(key)
        except Exception as exc:  # SafetensorError has no stable base class across versions
            raise CheckpointError(f"checkpoint file {path}: cannot read tensor {key!r}: {exc}") from None

    def read_json(self, name: str) -> Any:
        path = self._check(name)
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except ValueError as exc:
            raise CheckpointError(f"checkpoint file {path} is corrupted: {exc}") from None


def _read_local(reader: _ShardReader, entry: Mapping[str, Any], key: str, groups: ParallelGroups,
                sharded: bool) -> torch.Tensor:
    """This rank's shard of one tensor, resharding when the checkpoint's TP size differs from ours."""
    shards = entry["shards"]
    saved_tp = len(shards)
    if any(s is None for s in shards):
        raise CheckpointError(f"{reader.directory}: tensor {key!r} lacks the shard of some tensor-parallel rank")
    if not sharded:
        return reader.get(shards[groups.tp_rank if groups.tp_size == saved_tp else 0], key)
    if saved_tp == groups.tp_size:
        return reader.get(shards[groups.tp_rank], key)
    full = unshard_tensors([reader.get(f, key) for f in shards], entry["tp_dim"], entry["tp_components"])
    return shard_tensor(full, entry["tp_dim"], entry["tp_components"], groups.tp_rank, groups.tp_size)


@torch.no_grad()
def load_model_state(directory: str, metadata: dict[str, Any], model: nn.Module, groups: ParallelGroups,
                     *, verify: bool = True, strict: bool = True) -> None:
    """Copy the checkpoint's weights into ``model`` (any TP size, any pipeline layout; layers by global name).

    ``model`` may be one pipeline stage: ``strict`` then compares against the tensors that stage owns.
    """
    reader = _ShardReader(directory, metadata, verify)
    index = metadata["model"]
    own = model.state_dict(keep_vars=True)
    names = _checkpoint_names(model)
    expected = set(names.values())
    missing = sorted(k for k in expected if k not in index)
    unexpected = sorted(k for k in index if k not in expected and _stage_owns(model, k))
    if strict and (missing or unexpected):
        raise CheckpointError(f"{directory} does not match the model: missing {missing or 'none'}, "
                              f"unexpected {unexpected or 'none'}")
    for key, target in own.items():
        source = names[key]
        if source not in index:
            continue
        entry = index[source]
        value = _read_local(reader, entry, source, groups, "tp_dim" in entry)
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(f"{directory}: tensor {key!r} has shape {tuple(value.shape)} in the checkpoint "
                                  f"(full {tuple(entry['shape'])}) but {tuple(target.shape)} in the model")
        target.copy_(value)


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    groups: ParallelGroups | None = None,
    *,
    optimizer: Any = None,
    iteration: int | None = None,
    load_optim: bool = True,
    load_rng: bool = True,
    verify: bool = True,
    strict: bool = True,
) -> LoadedCheckpoint | None:
    """Load the checkpoint at ``path`` (a ``--save`` root: tracker or ``iteration``; or an ``iter_*`` directory).

    Restores the model weights and (``load_optim``) the optimizer states in place. Returns the rest (iteration, data
    position, scheduler state, this rank's RNG states) for the caller to apply at the right moment, or None when
    ``path`` holds no checkpoint. Never unpickles: safetensors and JSON only.
    """
    groups = groups if groups is not None else ParallelGroups.single()
    directory = resolve_checkpoint_dir(path, iteration)
    if directory is None:
        return None
    metadata = read_metadata(directory)
    load_model_state(directory, metadata, model, groups, verify=verify, strict=strict)
    result = LoadedCheckpoint(
        path=directory,
        iteration=int(metadata["iteration"]),
        consumed_train_samples=int(metadata.get("consumed_train_samples", 0)),
        metadata=metadata,
        scheduler_state=metadata.get("scheduler"),
    )
    reader = _ShardReader(directory, metadata, verify)
    if optimizer is not None and load_optim:
        index = metadata.get("optimizer") or {}
        if not index:
            result.notes.append(f"{directory} holds no optimizer states; Adam starts from zero")
        else:
            states: dict[str, dict[str, torch.Tensor]] = {}
            names = _checkpoint_names(model)
            for pname in optimizer.owned_names:
                source = names.get(pname, pname)
                entry = index.get(source)
                if entry is None:
                    continue  # never stepped (e.g. every step so far was skipped)
                states[pname] = {
                    key: _read_local(reader, entry, f"{source}{_OPT_SEP}{key}", groups, info["sharded"])
                    for key, info in entry["states"].items()
                }
            optimizer.load_named_states(states)
            result.optimizer_loaded = True
    if load_rng:
        name = f"rng_rank{_rank():05d}.json"
        if metadata["parallel"]["world_size"] != _world():
            result.notes.append("world size changed since the save: RNG states are not restored")
        elif name not in metadata.get("files", {}):
            result.notes.append(f"{directory} holds no RNG state for this rank")
        else:
            result.rng_state = reader.read_json(name)
    return result
