"""The stack of hybrid layers built from a layer pattern, followed (on the last pipeline stage) by the final norm."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from megatron_hybrid.config import HybridConfig
from megatron_hybrid.layers.hybrid_layers import AttentionLayer, MambaLayer, MLPLayer, _PreNormResidual
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

    Decode steps (an ``inference_context`` in decode mode, eval mode) carry the residual stream through the stack
    themselves when every layer is a plain pre-norm residual layer with an ``RMSNorm`` (``carries_residual``): each
    layer returns only its update, and the next norm adds it to the stream (``RMSNorm.add_and_norm``: one Triton
    kernel on CUDA instead of an add and a norm). Same arithmetic and rounding as the layers' own ``forward``;
    ``fused_residual_decode = False`` turns it off (benchmarks compare the two).
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
        self.layers = nn.ModuleDict()
        for index in range(start, end):
            spec = getattr(submodules, LAYER_SYMBOLS[pattern[index]])
            self.layers[str(index)] = build_module(spec, config=config, groups=groups, layer_number=index)
        self.final_norm = None
        if post_process:
            self.final_norm = build_norm(submodules.final_norm, config)
        self.fused_residual_decode = True
        # CUDA graphs of the layers for training (megatron_hybrid.training.cuda_graphs.enable_layer_graphs): an
        # object with ``applies(hidden, seq_idx, position_ids)`` and a call that runs every layer.
        self.layer_graphs = None
        self._carry_check: tuple[tuple[type, ...], bool] | None = None

    @property
    def carries_residual(self) -> bool:
        """Whether decode steps can carry the residual between layers (see the class docstring): every layer computes
        ``_PreNormResidual.forward`` (not an override) with an ``RMSNorm``, and so does the final norm. Cached per
        tuple of layer types (the full check costs ~45 us of Python for 48 layers, per eager step)."""
        key = tuple(type(layer) for layer in self.layers.values())
        if self._carry_check is None or self._carry_check[0] != key:
            norms = [self.final_norm] if self.final_norm is not None else []
            ok = True
            for layer in self.layers.values():
                if not isinstance(layer, _PreNormResidual) or type(layer).forward is not _PreNormResidual.forward:
                    ok = False
                    break
                norms.append(layer.pre_norm)
            self._carry_check = (key, ok and all(isinstance(norm, RMSNorm) for norm in norms))
        return self._carry_check[1]

    def forward(
        self,
        hidden_states: torch.Tensor,
        seq_idx: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inference_context=None,
    ) -> torch.Tensor:
        if (
            inference_context is not None
            and inference_context.is_decode
            and self.fused_residual_decode
            and not self.training
            and self.carries_residual
        ):
            return self._decode_carrying_residual(hidden_states, seq_idx, position_ids, inference_context)
        graphs = self.layer_graphs
        if graphs is not None and inference_context is None and graphs.applies(hidden_states, seq_idx, position_ids):
            hidden_states = graphs(hidden_states, seq_idx, position_ids)
        else:
            for layer in self.layers.values():
                hidden_states = layer(
                    hidden_states, seq_idx=seq_idx, position_ids=position_ids, inference_context=inference_context
                )
        if self.final_norm is not None:
            # A float32 residual stream (residual_in_fp32) is read in the working precision, as each layer's norm does.
            hidden_states = self.final_norm(hidden_states.to(self.final_norm.weight.dtype))
        return hidden_states

    def _decode_carrying_residual(
        self,
        hidden_states: torch.Tensor,
        seq_idx: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        inference_context,
    ) -> torch.Tensor:
        """A decode step with the residual carried here: layer ``i``'s update is added to the stream inside layer
        ``i + 1``'s norm (or the final norm), so no layer launches its own residual add."""
        residual = hidden_states
        previous = update = None
        for layer in self.layers.values():
            if previous is None:  # the first layer: nothing to add yet
                normed = layer.pre_norm(layer._inner_input(residual))
            else:  # the previous layer's residual add (its residual_in_fp32), inside this layer's norm
                normed, residual = layer.pre_norm.add_and_norm(update, residual, previous.residual_in_fp32)
            update = layer.mix(normed, seq_idx, position_ids, inference_context)
            previous = layer
        if self.final_norm is None:  # a pipeline stage that hands the stream on: the last add on its own
            return previous._residual_add(residual, update)
        # The final norm reads the stream in the working precision, as the layers' norms do.
        update = update.to(self.final_norm.weight.dtype)
        normed, _ = self.final_norm.add_and_norm(update, residual, previous.residual_in_fp32)
        return normed
