"""Load a training checkpoint as a ready-to-run model for generation and serving (any tensor-parallel size)."""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from megatron_hybrid.checkpoint.checkpointing import (
    CheckpointError,
    load_model_state,
    read_metadata,
    resolve_checkpoint_dir,
)
from megatron_hybrid.config import HybridConfig
from megatron_hybrid.models.mamba_model import MambaModel
from megatron_hybrid.parallel.state import ParallelGroups

__all__ = ["hybrid_config_from_dict", "load_model_for_inference"]


def hybrid_config_from_dict(data: dict[str, Any]) -> HybridConfig:
    """Rebuild the HybridConfig saved in ``metadata.json`` (dtype names back to torch dtypes, lists to tuples)."""
    values = dict(data)
    dtype = values.get("params_dtype")
    if isinstance(dtype, str):
        values["params_dtype"] = getattr(torch, dtype)
    for key in ("mamba_A_init_range", "mamba_dt_limit"):
        if isinstance(values.get(key), list):
            values[key] = tuple(math.inf if v == "inf" else v for v in values[key])
    known = {f for f in HybridConfig.__dataclass_fields__}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CheckpointError(f"the checkpoint's model_config has fields this version does not know: {unknown}")
    return HybridConfig(**values)


def load_model_for_inference(
    checkpoint_dir: str | os.PathLike,
    groups: ParallelGroups | None = None,
    iteration: int | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    verify: bool = True,
) -> tuple[MambaModel, HybridConfig, dict[str, Any]]:
    """``(model, config, tokenizer_args)`` from a training checkpoint, model in eval mode.

    ``checkpoint_dir`` is a ``--save`` directory (the tracker's iteration, or ``iteration``) or one ``iter_*``
    directory. ``groups`` picks the tensor-parallel layout to load into (default: a single process); the weights are
    resharded from whatever TP size the run used. The model is built on the meta device and materialised directly
    from the checkpoint, so no time is spent on a random initialisation. ``tokenizer_args`` holds
    ``tokenizer_type`` / ``tokenizer_model`` / ``vocab_file`` / ``merge_file`` / ``vocab_size`` /
    ``make_vocab_size_divisible_by`` for :func:`megatron_hybrid.tokenizers.build_tokenizer`, with paths pointing at
    the copy inside the checkpoint when it has one.
    """
    groups = groups if groups is not None else ParallelGroups.single()
    directory = resolve_checkpoint_dir(checkpoint_dir, iteration)
    if directory is None:
        raise CheckpointError(f"{os.fspath(checkpoint_dir)} holds no checkpoint (no metadata.json and no "
                              "latest_checkpointed_iteration.txt)")
    metadata = read_metadata(directory)
    if not metadata.get("model_config"):
        raise CheckpointError(f"{directory}: metadata.json has no model_config")
    config = hybrid_config_from_dict(metadata["model_config"]).replace(sequence_parallel=False)
    with torch.device("meta"):
        model = MambaModel(config, groups)
    model.to_empty(device=device or "cpu")
    load_model_state(directory, metadata, model, groups, verify=verify, strict=True)
    if dtype is not None:
        model.to(dtype)
    tokenizer_args = dict(metadata.get("tokenizer") or {})
    if tokenizer_args.pop("files_in_checkpoint", False):
        for key in ("tokenizer_model", "vocab_file", "merge_file"):
            if tokenizer_args.get(key):
                tokenizer_args[key] = os.path.join(directory, tokenizer_args[key])
    return model.eval(), config, tokenizer_args
