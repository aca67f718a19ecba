"""Parallelism primitives: process groups, autograd collectives, tensor-parallel layers, vocab-parallel cross
entropy and full <-> sharded tensor conversion. See each module's docstring for its conventions."""

from megatron_hybrid.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_hybrid.parallel.mappings import (
    copy_to_tp,
    gather_from_sequence_parallel,
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_to_sequence_parallel,
    scatter_to_sequence_parallel,
    scatter_to_tp,
)
from megatron_hybrid.parallel.sharding import (
    gather_full_state_dict,
    is_tensor_parallel,
    set_tensor_parallel_attributes,
    shard_state_dict,
    shard_tensor,
    unshard_tensors,
)
from megatron_hybrid.parallel.state import (
    ParallelGroups,
    init_distributed,
    initialize_parallel_groups,
    rank_layout,
)
from megatron_hybrid.parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)

__all__ = [
    "ColumnParallelLinear",
    "ParallelGroups",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "copy_to_tp",
    "gather_from_sequence_parallel",
    "gather_from_tp",
    "gather_full_state_dict",
    "init_distributed",
    "initialize_parallel_groups",
    "is_tensor_parallel",
    "rank_layout",
    "reduce_from_tp",
    "reduce_scatter_to_sequence_parallel",
    "scatter_to_sequence_parallel",
    "scatter_to_tp",
    "set_tensor_parallel_attributes",
    "shard_state_dict",
    "shard_tensor",
    "unshard_tensors",
    "vocab_parallel_cross_entropy",
]
