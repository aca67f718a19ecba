"""Causal self-attention with grouped-query heads, tensor-parallel by query groups.

``linear_qkv`` uses Megatron's fused layout: for each query group, its ``heads / groups`` query heads, then its key
head, then its value head. Splitting that weight contiguously across ranks hands each rank whole query groups.

A decode step on CUDA runs its attention (cache write included) as one Triton kernel on views of ``linear_qkv``'s
output (``ops.decode_attention_fused``); elsewhere, or where that does not apply, the unfused path below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatron_hybrid.config import HybridConfig
from megatron_hybrid.layers.init import normal_init, scaled_normal_init
from megatron_hybrid.layers.rotary import RotaryEmbedding, apply_rotary
from megatron_hybrid.ops import decode_attention_fused
from megatron_hybrid.parallel.state import ParallelGroups
from megatron_hybrid.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron_hybrid.spec import build_module

# Devices whose decode steps try the fused Triton attention (``ops.decode_attention_fused`` answers None elsewhere
# anyway; checking first spares a CPU step the rotary work). Tests add "cpu" to run the kernel in Triton's interpreter.
FUSED_DECODE_DEVICE_TYPES = ("cuda",)


def document_causal_mask(seq_idx: torch.Tensor) -> torch.Tensor:
    """Boolean mask [b, 1, s, s]: token i sees token j iff j <= i and both belong to the same document."""
    same_document = seq_idx[:, :, None] == seq_idx[:, None, :]
    causal = torch.ones(seq_idx.shape[1], seq_idx.shape[1], dtype=torch.bool, device=seq_idx.device).tril()
    return (same_document & causal)[:, None]


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Attention of one new query per row over that row's cached keys.

    q [b, hq, d]; k_cache / v_cache [b, hkv, L, d] with the new token's key and value already written at
    ``positions`` [b]; row ``i`` attends to keys ``0 .. positions[i]`` only (longer rows of the batch, or stale
    entries of a reused cache slot, are masked). Query heads are grouped per key head without repeating the cache.
    Returns [b, hq, d].
    """
    batch, heads, dim = q.shape
    kv_heads, length = k_cache.shape[1], k_cache.shape[2]
    scores = q.reshape(batch, kv_heads, heads // kv_heads, dim) @ k_cache.transpose(-1, -2)  # [b, hkv, hpg, L]
    scores = scores.float() * dim**-0.5
    future = torch.arange(length, device=q.device) > positions[:, None]  # [b, L]
    probs = scores.masked_fill(future[:, None, None], float("-inf")).softmax(dim=-1).to(v_cache.dtype)
    return (probs @ v_cache).view(batch, heads, dim)


class SDPAttention(nn.Module):
    """Core attention through ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient on GPU)."""

    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        self.dropout = config.attention_dropout

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_idx: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q [b, hq, s, d], k / v [b, hkv, s, d] -> [b, hq, s, d]."""
        dropout = self.dropout if self.training else 0.0
        if k.shape[1] != q.shape[1] and q.device.type == "cpu":
            # Grouped-query attention without repeating keys and values (the CPU kernels support it; GPU backends
            # differ by version, so there k / v are still repeated below).
            mask = None if seq_idx is None else document_causal_mask(seq_idx)
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout, enable_gqa=True
            )
        if k.shape[1] != q.shape[1]:
            repeat = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        if seq_idx is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=document_causal_mask(seq_idx), dropout_p=dropout)


@dataclass(frozen=True)
class SelfAttentionSubmodules:
    linear_qkv: object = ColumnParallelLinear
    core_attention: object = SDPAttention
    linear_proj: object = RowParallelLinear


class SelfAttention(nn.Module):
    def __init__(
        self,
        config: HybridConfig,
        groups: ParallelGroups,
        submodules: SelfAttentionSubmodules = SelfAttentionSubmodules(),
        layer_number: int = 0,
    ) -> None:
        super().__init__()
        self.config = config
        self.layer_number = layer_number
        tp = groups.tp_size
        if config.num_query_groups % tp:
            raise ValueError(f"tensor parallel size {tp} must divide num_query_groups ({config.num_query_groups})")
        self.head_dim = config.kv_channels
        self.heads_local = config.num_attention_heads // tp
        self.groups_local = config.num_query_groups // tp
        self.heads_per_group = config.num_attention_heads // config.num_query_groups
        qkv_width = (config.num_attention_heads + 2 * config.num_query_groups) * self.head_dim
        self.linear_qkv = build_module(
            submodules.linear_qkv,
            config.hidden_size,
            qkv_width,
            groups=groups,
            bias=config.add_bias_linear,
            sequence_parallel=config.sequence_parallel,
            init_method=normal_init(config.init_method_std),
            dtype=config.params_dtype,
        )
        self.core_attention = build_module(submodules.core_attention, config)
        self.linear_proj = build_module(
            submodules.linear_proj,
            config.num_attention_heads * self.head_dim,
            config.hidden_size,
            groups=groups,
            bias=config.add_bias_linear,
            input_is_parallel=True,
            sequence_parallel=config.sequence_parallel,
            init_method=scaled_normal_init(config.init_method_std, config.num_layers),
            dtype=config.params_dtype,
        )
        self.rotary = None
        if config.position_embedding_type == "rope":
            self.rotary = RotaryEmbedding(self.head_dim, config.rotary_percent, config.rotary_base)
        # Decode through the fused Triton attention where it applies (CUDA); False forces the unfused ops (benchmarks).
        self.fused_decode = True

    def allocate_inference_cache(
        self,
        batch_size: int,
        max_sequence_length: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed key and value caches of this rank, each [b, kv_heads_local, max_sequence_length, head_dim].

        Zeros, not empty memory: masked positions still enter ``probs @ v`` with weight 0, and 0 * NaN would be NaN.
        """
        weight = self.linear_qkv.weight
        shape = (batch_size, self.groups_local, max_sequence_length, self.head_dim)
        device = device if device is not None else weight.device
        return (torch.zeros(shape, device=device, dtype=dtype or weight.dtype),
                torch.zeros(shape, device=device, dtype=dtype or weight.dtype))

    def forward(
        self,
        hidden_states: torch.Tensor,
        seq_idx: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inference_context=None,
    ) -> torch.Tensor:
        """``hidden_states`` [s, b, hidden] -> [s, b, hidden]; ``position_ids`` [b, s] drive RoPE.

        ``inference_context`` (``megatron_hybrid.inference.InferenceContext``): a prefill (from an empty cache)
        stores the keys and values of its ``s`` tokens; a decode step (``s == 1``) writes its key and value at each
        row's position and attends over the row's cache.
        """
        # Training runs batch-first ([b, s] rows: q / k / v and the context are then plain transposes, which the CPU
        # attention kernels read faster); sequence parallelism needs the projections sequence-first, and the
        # inference path keeps its layout.
        batch_first = inference_context is None and not self.config.sequence_parallel
        qkv = self.linear_qkv(hidden_states.transpose(0, 1) if batch_first else hidden_states)
        if inference_context is not None and inference_context.is_decode and self.fused_decode:
            context = self._fused_decode_attention(qkv, position_ids, inference_context)
            if context is not None:
                return self.linear_proj(context.unsqueeze(0))
        rows = qkv.shape[:2]  # (b, s) or (s, b)
        batch, seqlen = rows if batch_first else rows[::-1]
        qkv = qkv.view(*rows, self.groups_local, self.heads_per_group + 2, self.head_dim)
        # split, not indexing: its backward concatenates the three gradients instead of zero-filling a qkv-sized
        # tensor for each of them.
        q, k, v = torch.split(qkv, [self.heads_per_group, 1, 1], dim=3)
        q = q.reshape(*rows, self.heads_local, self.head_dim)
        k, v = k.squeeze(3), v.squeeze(3)
        order = (0, 2, 1, 3) if batch_first else (1, 2, 0, 3)
        q, k, v = (t.permute(*order) for t in (q, k, v))  # [b, heads, s, d]
        if self.rotary is not None:
            if position_ids is None:
                position_ids = torch.arange(seqlen, device=q.device).expand(batch, seqlen)
            cos, sin = self.rotary(position_ids)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if inference_context is None:
            context = self.core_attention(q, k, v, seq_idx)  # [b, heads_local, s, d]
        else:
            context = self._cached_attention(q, k, v, inference_context)
        if batch_first:
            context = context.transpose(1, 2).reshape(batch, seqlen, self.heads_local * self.head_dim)
            return self.linear_proj(context).transpose(0, 1)
        context = context.permute(2, 0, 1, 3).reshape(seqlen, batch, self.heads_local * self.head_dim)
        return self.linear_proj(context)

    def _fused_decode_attention(
        self, qkv: torch.Tensor, position_ids: torch.Tensor | None, inference_context
    ) -> torch.Tensor | None:
        """A decode step's attention from ``qkv`` [1, b, width] as one Triton kernel: the context [b, heads * d], the
        new keys and values written into the cache; None where the kernel does not apply (the caller then runs the
        unfused path). q, k and v are views of ``qkv`` (no split or head-reshape copies); with RoPE, the rotated q
        and k are new tensors (the kernel reads any strides)."""
        if qkv.device.type not in FUSED_DECODE_DEVICE_TYPES or qkv.shape[0] != 1:
            return None
        batch = qkv.shape[1]
        grouped = qkv[0].view(batch, self.groups_local, self.heads_per_group + 2, self.head_dim)
        q = grouped[:, :, : self.heads_per_group]  # [b, groups, heads per group, d]: head g * hpg + i
        k = grouped[:, :, self.heads_per_group]  # [b, groups, d]
        v = grouped[:, :, self.heads_per_group + 1]
        positions = inference_context.decode_positions()
        if self.rotary is not None:
            if position_ids is None:
                position_ids = positions[:, None]
            cos, sin = self.rotary(position_ids)  # [b, 1, rotary]: broadcast over [b, groups, heads per group, d]
            q = apply_rotary(q, cos, sin)
            k = apply_rotary(k.unsqueeze(2), cos, sin)[:, :, 0]
        k_cache, v_cache = inference_context.kv_cache(self.layer_number)
        return decode_attention_fused(q, k, v, k_cache, v_cache, positions, inference_context.attention_length)

    def _cached_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inference_context) -> torch.Tensor:
        k_cache, v_cache = inference_context.kv_cache(self.layer_number)
        if not inference_context.is_decode:
            seqlen = k.shape[2]
            k_cache[:, :, :seqlen].copy_(k)
            v_cache[:, :, :seqlen].copy_(v)
            return self.core_attention(q, k, v)
        positions = inference_context.decode_positions()  # [b]
        batch, kv_heads, _, dim = k.shape
        index = positions.view(batch, 1, 1, 1).expand(batch, kv_heads, 1, dim)
        k_cache.scatter_(2, index, k)
        v_cache.scatter_(2, index, v)
        length = inference_context.attention_length  # keys beyond every row's position are never read
        context = decode_attention(q[:, :, 0], k_cache[:, :, :length], v_cache[:, :, :length], positions)
        return context.unsqueeze(2)
