"""Sharded, atomic, pickle-free training checkpoints (see :mod:`megatron_hybrid.checkpoint.checkpointing`)."""

from megatron_hybrid.checkpoint.checkpointing import (
    FORMAT,
    METADATA_FILE,
    TRACKER_FILE,
    CheckpointError,
    LoadedCheckpoint,
    checkpoint_iterations,
    iteration_dir,
    load_checkpoint,
    load_model_state,
    read_metadata,
    read_tracker,
    resolve_checkpoint_dir,
    save_checkpoint,
)
from megatron_hybrid.checkpoint.inference import hybrid_config_from_dict, load_model_for_inference
from megatron_hybrid.checkpoint.rng import get_rng_state, set_rng_state

__all__ = [
    "FORMAT",
    "METADATA_FILE",
    "TRACKER_FILE",
    "CheckpointError",
    "LoadedCheckpoint",
    "checkpoint_iterations",
    "get_rng_state",
    "hybrid_config_from_dict",
    "iteration_dir",
    "load_checkpoint",
    "load_model_for_inference",
    "load_model_state",
    "read_metadata",
    "read_tracker",
    "resolve_checkpoint_dir",
    "save_checkpoint",
    "set_rng_state",
]
