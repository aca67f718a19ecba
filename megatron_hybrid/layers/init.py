"""Weight initialisers shared by the layers, as Megatron defines them.

Every initialiser fills the FULL (unsharded) tensor; tensor-parallel layers then keep their rank's shard. Drawing the
full tensor on every rank from the same seed makes a TP=N model hold exactly the weights of the TP=1 model built with
that seed, which is what parity tests and reproducible runs need.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

InitMethod = Callable[[torch.Tensor], torch.Tensor]


def normal_init(std: float) -> InitMethod:
    def init(tensor: torch.Tensor) -> torch.Tensor:
        return torch.nn.init.normal_(tensor, mean=0.0, std=std)

    return init


def scaled_normal_init(std: float, num_layers: int) -> InitMethod:
    """Megatron's output-layer init: std / sqrt(2 * num_layers) for projections that write into the residual."""
    return normal_init(std / math.sqrt(2.0 * num_layers))
