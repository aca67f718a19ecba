"""Ready-made specs. ``local_stack_spec`` is torch-native and runs everywhere; it is the default.

A Transformer-Engine spec would swap ``ColumnParallelLinear``/``RowParallelLinear``/``SDPAttention`` for TE modules
here, leaving every model and layer class untouched.
"""

from __future__ import annotations

from megatron_hybrid.layers.attention import SDPAttention, SelfAttention, SelfAttentionSubmodules
from megatron_hybrid.layers.hybrid_layers import (
    AttentionLayer,
    AttentionLayerSubmodules,
    MambaLayer,
    MambaLayerSubmodules,
    MLPLayer,
    MLPLayerSubmodules,
)
from megatron_hybrid.layers.mamba_mixer import MambaMixer, MambaMixerSubmodules
from megatron_hybrid.layers.mlp import MLP, MLPSubmodules
from megatron_hybrid.layers.norm import RMSNorm
from megatron_hybrid.models.mamba_stack import MambaStack, MambaStackSubmodules
from megatron_hybrid.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron_hybrid.spec import ModuleSpec

local_stack_spec = ModuleSpec(
    MambaStack,
    submodules=MambaStackSubmodules(
        mamba_layer=ModuleSpec(
            MambaLayer,
            submodules=MambaLayerSubmodules(
                norm=RMSNorm,
                mixer=ModuleSpec(
                    MambaMixer,
                    submodules=MambaMixerSubmodules(in_proj=ColumnParallelLinear, out_proj=RowParallelLinear),
                ),
            ),
        ),
        attention_layer=ModuleSpec(
            AttentionLayer,
            submodules=AttentionLayerSubmodules(
                input_layernorm=RMSNorm,
                self_attention=ModuleSpec(
                    SelfAttention,
                    submodules=SelfAttentionSubmodules(
                        linear_qkv=ColumnParallelLinear, core_attention=SDPAttention, linear_proj=RowParallelLinear
                    ),
                ),
            ),
        ),
        mlp_layer=ModuleSpec(
            MLPLayer,
            submodules=MLPLayerSubmodules(
                pre_mlp_layernorm=RMSNorm,
                mlp=ModuleSpec(
                    MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
                ),
            ),
        ),
        final_norm=RMSNorm,
    ),
)
