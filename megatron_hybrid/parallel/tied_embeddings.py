"""Tied input embedding and output layer across the first and last pipeline stages.

With ``untie_embeddings_and_output_weights=False`` the output layer reuses the word embedding matrix. When the
pipeline splits the model, the embedding lives on the first stage and the output projection on the last, so the last
stage holds its own copy (``output_layer.weight``, marked ``shared_embedding = True``; see
:class:`megatron_hybrid.models.mamba_model.MambaModel`). Megatron's scheme keeps the two equal:

* at start, the copy takes the first stage's embedding values (:func:`sync_tied_embedding_weights`);
* after every backward, both hold the sum of the two gradients (:func:`allreduce_tied_embedding_grads`), i.e. the
  gradient of the single tied matrix; identical values, gradients and Adam states then give identical updates.

Megatron all-reduces over a dedicated "embedding group" of the first and last stage. Here the two stages exchange
their tensors point to point over the pipeline group instead (each sends its tensor and receives the other's), which
needs no extra process group and involves no middle stage. Addition is commutative, so both ends get bitwise the same
sum. Tensor-parallel ranks pair up shard by shard: a pipeline group joins ranks of equal tensor-parallel rank, and
the embedding and output weight are split the same way (rows of the padded vocabulary).

The gradient norm counts the copy once (it skips parameters marked ``shared_embedding``), and checkpoints store only
the embedding: the copy is re-created from it on load.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_hybrid.parallel.pipeline import exchange
from megatron_hybrid.parallel.state import ParallelGroups

__all__ = ["allreduce_tied_embedding_grads", "is_shared_embedding_copy", "sync_tied_embedding_weights",
           "tied_embedding_parameter"]

_TAG = 7  # distinct from the schedule's activation traffic between the same two ranks (pipeline size 2)


def is_shared_embedding_copy(param: torch.Tensor) -> bool:
    """Whether ``param`` is a last stage's copy of the tied embedding (not a parameter of the unsplit model)."""
    return bool(getattr(param, "shared_embedding", False))


def tied_embedding_parameter(model: nn.Module, groups: ParallelGroups) -> nn.Parameter | None:
    """This stage's half of a tied embedding split across the pipeline, or None (untied, pipeline size 1, or a
    middle stage)."""
    if groups.pp_size == 1 or not getattr(model, "share_embeddings_and_output_weights", False):
        return None
    if groups.is_pipeline_first:
        return model.embedding.word_embeddings.weight
    if groups.is_pipeline_last:
        weight = model.output_layer.weight
        assert is_shared_embedding_copy(weight)
        return weight
    return None


def _peer(groups: ParallelGroups) -> int:
    return groups.pp_size - 1 if groups.is_pipeline_first else 0


@torch.no_grad()
def sync_tied_embedding_weights(model: nn.Module, groups: ParallelGroups) -> None:
    """Give the last stage's output-weight copy the first stage's embedding values (collective over the first and
    last stage; a no-op elsewhere). Called once after building the model; checkpoints restore both halves."""
    param = tied_embedding_parameter(model, groups)
    if param is None:
        return
    if groups.is_pipeline_first:
        exchange(groups, [(param.detach().contiguous(), _peer(groups))], [], tag=_TAG)
    else:
        buffer = torch.empty_like(param)
        exchange(groups, [], [(buffer, _peer(groups))], tag=_TAG)
        param.copy_(buffer)


@torch.no_grad()
def allreduce_tied_embedding_grads(model: nn.Module, groups: ParallelGroups) -> None:
    """Sum the gradients of the tied embedding's two halves, on both (collective over the first and last stage; a
    no-op elsewhere). A missing gradient counts as zero, so both ends always exchange."""
    param = tied_embedding_parameter(model, groups)
    if param is None:
        return
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    mine = param.grad.contiguous()
    theirs = torch.empty_like(mine)
    exchange(groups, [(mine, _peer(groups))], [(theirs, _peer(groups))], tag=_TAG)
    param.grad.add_(theirs)
