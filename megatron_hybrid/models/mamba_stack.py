"""The stack of hybrid layers built from a layer pattern, followed (on the last pipeline stage) by the final norm."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from megatron_hybrid.config import HybridConfig
from megatron_hybrid.layers.hybrid_layers import AttentionLayer, MambaLayer, MLPLayer
from megatron_hybrid.layers.norm import RMSNorm, build_norm
from megatron_hybrid.parallel.state import ParallelGroups
from megatron_hybrid.spec import ModuleSpec, build_module

LAYER_SYMBOLS = {"M": "mamba_layer", "*": "attention_layer", "-": "mlp_layer"}


@dataclass(frozen=True)
class MambaStackSubmodules:
    mamba_layer: object = ModuleSpec(MambaLayer)
    attention_layer: object = ModuleSpec(AttentionLayer)
    mlp_layer: object = ModuleSpec(MLPLayer)
    final_norm: object = RMSNorm


class MambaStack(nn.Module):
    """Layers ``layer_range = (start, end)`` of the model's pattern.

    Layers are keyed by their GLOBAL index (``layers.17``), so a state dict names each layer the same way whatever
    pipeline layout built it, and checkpoints reshard across pipeline sizes by name alone.
    """

    def __init__(
        self,
        config: HybridConfig,
        groups: ParallelGroups,
        submodules: MambaStackSubmodules = MambaStackSubmodules(),
        layer_range: tuple[int, int] | None = None,
        post_process: bool = True,
    ) -> None:
        super().__init__()
        pattern = config.layer_pattern
        start, end = layer_range if layer_range is not None else (0, len(pattern))
        if not 0 <= start < end <= len(pattern):
            raise ValueError(f"layer_range {layer_range} is not a non-empty slice of the {len(pattern)}-layer pattern")
        self.layer_range = (start, end)
        self.params_dtype = config.params_dtype
        self.layers = nn.ModuleDict()
        for index in range(start, end):
            spec = getattr(submodules, LAYER_SYMBOLS[pattern[index]])
            self.layers[str(index)] = build_module(spec, config=config, groups=groups, layer_number=index)
        self.final_norm = None
        if post_process:
            self.final_norm = build_norm(submodules.final_norm, config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        seq_idx: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inference_context=None,
    ) -> torch.Tensor:
        for layer in self.layers.values():
            hidden_states = layer(
                hidden_states, seq_idx=seq_idx, position_ids=position_ids, inference_context=inference_context
            )
        if self.final_norm is not None:
            # A float32 residual stream (residual_in_fp32) is read in the working precision, as each layer's norm does.
            hidden_states = self.final_norm(hidden_states.to(self.params_dtype))
        return hidden_states
