"""Building this rank's pipeline stage: which layers it owns, and weights equal to the unsplit model's.

Layout: the layer pattern is split by :func:`megatron_hybrid.models.layer_pattern.split_pattern_for_pipeline`: at
the ``|`` separators of ``hybrid_override_pattern`` when it has them (their stage count must equal the pipeline
size), else evenly (the pipeline size must divide the layer count). No interleaving (one model chunk per rank).

Initialisation: every layer draws its initial weights from the global torch generator in construction order. A stage
that builds only layers ``start..end`` from the run's seed would therefore get different weights than the same
layers of the unsplit model. :func:`build_pipeline_stage` replays the draws of everything built before its first
layer (the embedding, then layers ``0..start-1``), one module at a time and discarding each, so a model split over
any number of stages starts from exactly the weights of the pipeline-size-1 model of the same seed. That makes
pipeline runs comparable (and testable) against single-stage runs; the price is the initialisation *time* of the
preceding layers, not their memory (Megatron instead seeds each stage differently and gives up that equivalence).
"""

from __future__ import annotations

import torch

from megatron_hybrid.config import HybridConfig
from megatron_hybrid.models.layer_pattern import PIPELINE_SEPARATOR, split_pattern_for_pipeline
from megatron_hybrid.models.mamba_model import LanguageModelEmbedding, MambaModel
from megatron_hybrid.models.specs import local_stack_spec
from megatron_hybrid.parallel.state import ParallelGroups
from megatron_hybrid.spec import ModuleSpec, build_module

__all__ = ["build_pipeline_stage", "pipeline_layout_pattern", "stage_layer_ranges"]


def pipeline_layout_pattern(config: HybridConfig) -> str:
    """The pattern that defines the stage layout: the override pattern with its ``|`` separators if it has any,
    else the model's layer pattern (split evenly)."""
    override = config.hybrid_override_pattern
    if override and PIPELINE_SEPARATOR in override:
        return override
    return config.layer_pattern


def stage_layer_ranges(config: HybridConfig, pipeline_size: int) -> list[tuple[int, int]]:
    """Global ``(start, end)`` layer range of every pipeline rank, rank 0 first.

    Pipeline size 1 owns all layers (separators in the pattern are then ignored, as without pipelining). Raises
    ValueError naming the problem: more stages than layers, a ``|`` stage count that differs from the pipeline size,
    an empty stage, or a layer count the pipeline size does not divide.
    """
    num_layers = len(config.layer_pattern)
    if pipeline_size == 1:
        return [(0, num_layers)]
    if pipeline_size > num_layers:
        raise ValueError(f"pipeline-parallel size {pipeline_size} exceeds the model's {num_layers} layers: every "
                         "pipeline stage needs at least one layer")
    slices = split_pattern_for_pipeline(pipeline_layout_pattern(config), pipeline_size)
    return [(chunk.layer_offset, chunk.layer_offset + chunk.num_layers) for [chunk] in slices]


def build_pipeline_stage(
    config: HybridConfig,
    groups: ParallelGroups | None = None,
    stack_spec: ModuleSpec = local_stack_spec,
    *,
    pipeline_rank: int | None = None,
    pipeline_size: int | None = None,
) -> MambaModel:
    """This rank's stage of the model, initialised as the whole model would be from the current RNG state.

    ``pipeline_rank`` / ``pipeline_size`` default to the pipeline group of ``groups`` (they can be given to build any
    stage in one process, e.g. in tests). The first stage owns the embedding, the last the final norm and the output
    layer; with tied embeddings the last stage's output weight is a copy that
    :func:`megatron_hybrid.parallel.tied_embeddings.sync_tied_embedding_weights` must fill from the first stage.
    """
    groups = groups if groups is not None else ParallelGroups.single()
    rank = groups.pp_rank if pipeline_rank is None else pipeline_rank
    size = groups.pp_size if pipeline_size is None else pipeline_size
    if not 0 <= rank < size:
        raise ValueError(f"pipeline rank {rank} is outside a pipeline of size {size}")
    start, end = stage_layer_ranges(config, size)[rank]
    if size == 1:
        return MambaModel(config, groups, stack_spec)
    if rank > 0:
        # Replay MambaModel's construction order up to this stage's first layer: embedding, then layers 0..start-1.
        with torch.no_grad():
            LanguageModelEmbedding(config, groups)
            for index in range(start):
                build_module(stack_spec, config=config, groups=groups, layer_range=(index, index + 1),
                             post_process=False)
    return MambaModel(config, groups, stack_spec, pre_process=rank == 0, post_process=rank == size - 1,
                      layer_range=(start, end))
