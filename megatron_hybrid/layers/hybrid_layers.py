"""Pre-norm residual layers, one per symbol of the layer pattern: ``M`` Mamba, ``*`` attention, ``-`` MLP.

Each is ``x + mix(norm(x))``. The attribute names (``norm`` / ``mixer``, ``input_layernorm`` / ``self_attention``,
``pre_mlp_layernorm`` / ``mlp``) are Megatron's, so checkpoints and conversion tools line up. ``inference_context``
(cached generation, ``megatron_hybrid.inference``) reaches the mixers that keep per-sequence state; MLPs ignore it.

``pre_norm`` and ``mix`` expose the two halves of a layer so that a decode step can carry the residual stream across
layers itself (``MambaStack``): the add of one layer's update then runs inside the next layer's norm kernel
(``ops.rms_norm(update, ..., residual=stream, prenorm=True)``), the same arithmetic as ``forward`` in one launch less.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatron_hybrid.config import HybridConfig
from megatron_hybrid.layers.attention import SelfAttention
from megatron_hybrid.layers.mamba_mixer import MambaMixer
from megatron_hybrid.layers.mlp import MLP
from megatron_hybrid.layers.norm import RMSNorm, build_norm
from megatron_hybrid.parallel.state import ParallelGroups
from megatron_hybrid.spec import ModuleSpec, build_module


class _PreNormResidual(nn.Module):
    """Shared residual plumbing.

    With ``residual_in_fp32`` the residual stream itself stays float32 from layer to layer (Megatron's and Mamba's
    meaning); each layer's norm then reads it and the mixer computes in the working precision.
    """

    def __init__(self, config: HybridConfig, layer_number: int) -> None:
        super().__init__()
        self.layer_number = layer_number
        self.residual_in_fp32 = config.residual_in_fp32
        self.hidden_dropout = config.hidden_dropout

    def _inner_input(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The working-precision copy of the (possibly float32) residual stream that the norm and mixer read."""
        return hidden_states.to(self.working_dtype) if self.residual_in_fp32 else hidden_states

    @property
    def working_dtype(self) -> torch.dtype:
        """The parameters' dtype now (not the config's: ``model.to(torch.bfloat16)`` changes it after building)."""
        return self.pre_norm.weight.dtype

    def _residual_add(self, residual: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        update = F.dropout(update, p=self.hidden_dropout, training=self.training)
        if self.residual_in_fp32:
            return residual.float() + update.float()
        return residual + update

    norm_attribute = "norm"  # the pre-norm's attribute name (Megatron's, per layer type)

    @property
    def pre_norm(self) -> nn.Module:
        """This layer's pre-norm module."""
        return getattr(self, self.norm_attribute)

    def mix(
        self,
        normed: torch.Tensor,
        seq_idx: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inference_context=None,
    ) -> torch.Tensor:
        """The layer's update from its normalised input: the residual branch without the add."""
        raise NotImplementedError

    def forward(
        self,
        hidden_states: torch.Tensor,
        seq_idx: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inference_context=None,
    ) -> torch.Tensor:
        update = self.mix(self.pre_norm(self._inner_input(hidden_states)), seq_idx, position_ids, inference_context)
        return self._residual_add(hidden_states, update)


@dataclass(frozen=True)
class MambaLayerSubmodules:
    norm: object = RMSNorm
    mixer: object = ModuleSpec(MambaMixer)


class MambaLayer(_PreNormResidual):
    def __init__(
        self,
        config: HybridConfig,
        groups: ParallelGroups,
        submodules: MambaLayerSubmodules = MambaLayerSubmodules(),
        layer_number: int = 0,
    ) -> None:
        super().__init__(config, layer_number)
        self.norm = build_norm(submodules.norm, config)
        self.mixer = build_module(submodules.mixer, config=config, groups=groups, layer_number=layer_number)

    def mix(
        self,
        normed: torch.Tensor,
        seq_idx: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inference_context=None,
    ) -> torch.Tensor:
        return self.mixer(normed, seq_idx=seq_idx, inference_context=inference_context)


@dataclass(frozen=True)
class AttentionLayerSubmodules:
    input_layernorm: object = RMSNorm
    self_attention: object = ModuleSpec(SelfAttention)


class AttentionLayer(_PreNormResidual):
    norm_attribute = "input_layernorm"

    def __init__(
        self,
        config: HybridConfig,
        groups: ParallelGroups,
        submodules: AttentionLayerSubmodules = AttentionLayerSubmodules(),
        layer_number: int = 0,
    ) -> None:
        super().__init__(config, layer_number)
        self.input_layernorm = build_norm(submodules.input_layernorm, config)
        self.self_attention = build_module(
            submodules.self_attention, config=config, groups=groups, layer_number=layer_number
        )

    def mix(
        self,
        normed: torch.Tensor,
        seq_idx: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inference_context=None,
    ) -> torch.Tensor:
        return self.self_attention(
            normed, seq_idx=seq_idx, position_ids=position_ids, inference_context=inference_context
        )


@dataclass(frozen=True)
class MLPLayerSubmodules:
    pre_mlp_layernorm: object = RMSNorm
    mlp: object = ModuleSpec(MLP)


class MLPLayer(_PreNormResidual):
    norm_attribute = "pre_mlp_layernorm"

    def __init__(
        self,
        config: HybridConfig,
        groups: ParallelGroups,
        submodules: MLPLayerSubmodules = MLPLayerSubmodules(),
        layer_number: int = 0,
    ) -> None:
        super().__init__(config, layer_number)
        self.pre_mlp_layernorm = build_norm(submodules.pre_mlp_layernorm, config)
        self.mlp = build_module(submodules.mlp, config=config, groups=groups, layer_number=layer_number)

    def mix(
        self,
        normed: torch.Tensor,
        seq_idx: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inference_context=None,
    ) -> torch.Tensor:
        return self.mlp(normed)
