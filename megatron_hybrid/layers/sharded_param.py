"""Creating parameters that hold this rank's tensor-parallel shard of a fully initialised tensor."""

from __future__ import annotations

import torch
from torch import nn

from megatron_hybrid.parallel.sharding import shard_tensor
from megatron_hybrid.parallel.state import ParallelGroups


def sharded_parameter(
    full: torch.Tensor, groups: ParallelGroups, tp_components: list[int] | None = None, tp_dim: int = 0
) -> nn.Parameter:
    """Keep this rank's shard of ``full`` along ``tp_dim``, split component by component (see parallel.sharding)."""
    components = list(tp_components) if tp_components else [full.shape[tp_dim]]
    param = nn.Parameter(shard_tensor(full, tp_dim, components, groups.tp_rank, groups.tp_size))
    param.tp_dim = tp_dim
    param.tp_components = components
    return param
