"""A flattened decode step for CPU models at tensor-parallel size 1.

On a CPU a decode step of a small model is dominated by per-call overhead, not arithmetic: a token through the layer
modules of the 12-layer CPU benchmark model makes ~70 ``nn.Module`` calls and ~570 tensor operations, each with
tensor-parallel plumbing (identity at TP=1), backend dispatch and dtype checks. :class:`LeanDecoder` runs the SAME
computation as the layers' decode paths (``MambaMixer._decode_step``, ``SelfAttention`` with an inference context,
``MLP``) as one flat loop of ~320 tensor ops (a third of them free views) on ``[batch, hidden]`` activations, reading
the model's parameters and the context's caches in place (nothing is copied or precomputed, so it never goes stale):
about 40% less time at batch 1, the rest being the weight-streaming matmuls. The CUDA path needs none of this: CUDA
graphs remove the overhead there.

Scope (``LeanDecoder.unsupported_reason`` says why a model is refused, and the runner then uses the layer path):
float32 parameters, tensor-parallel size 1, the stock layer classes. ``tests/inference`` checks it against the layer
path and the full-sequence forward for every layer type.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from megatron_hybrid.inference.context import InferenceContext
from megatron_hybrid.layers.attention import SelfAttention, decode_attention
from megatron_hybrid.layers.hybrid_layers import AttentionLayer, MambaLayer, MLPLayer
from megatron_hybrid.layers.mamba_mixer import MambaMixer
from megatron_hybrid.layers.mlp import MLP
from megatron_hybrid.layers.norm import RMSNorm
from megatron_hybrid.layers.rotary import apply_rotary
from megatron_hybrid.ops import causal_conv1d_update_ref

__all__ = ["LeanDecoder"]

_Step = Callable[[torch.Tensor, int], torch.Tensor]


def _rms_norm(x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)


class LeanDecoder:
    """``decoder(token_ids [b]) -> logits [b, vocab]``: one decode step of the context's slots ``0 .. b - 1`` (the
    context's ``positions`` must hold their positions), identical in effect to ``model(ids[:, None],
    inference_context=context)`` in decode mode."""

    def __init__(self, model: torch.nn.Module, context: InferenceContext) -> None:
        reason = self.unsupported_reason(model, context)
        if reason is not None:
            raise ValueError(f"LeanDecoder cannot run this model: {reason}")
        self.context = context
        self.config = model.config
        self.embedding = model.embedding.word_embeddings.weight
        self.final_norm = model.decoder.final_norm
        self.output_weight = model.output_weight
        self.vocab_size = model.config.vocab_size
        self.steps: list[_Step] = []
        for name, layer in model.decoder.layers.items():
            index = int(name)
            if isinstance(layer, MambaLayer):
                self.steps.append(self._mamba_step(layer, index))
            elif isinstance(layer, AttentionLayer):
                self.steps.append(self._attention_step(layer, index))
            else:
                self.steps.append(self._mlp_step(layer))

    @staticmethod
    def unsupported_reason(model: torch.nn.Module, context: InferenceContext | None = None) -> str | None:
        """None when the lean step reproduces ``model``'s decode (with ``context``'s caches), else why not."""
        if getattr(model, "groups", None) is None or model.groups.tp_size != 1:
            return "tensor parallelism (the layer path carries the collectives)"
        if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in model.parameters()):
            return "only float32 CPU parameters"
        if context is not None:
            caches = [t for pair in (*context.mamba.values(), *context.kv.values()) for t in pair]
            if any(t.dtype != torch.float32 for t in caches):
                return "only float32 caches (ssm_state_dtype float32)"
        if not (model.pre_process and model.post_process) or model.decoder.final_norm is None:
            return "needs the whole model"
        for layer in model.decoder.layers.values():
            if isinstance(layer, MambaLayer):
                ok = type(layer.mixer) is MambaMixer and type(layer.norm) is RMSNorm
            elif isinstance(layer, AttentionLayer):
                ok = type(layer.self_attention) is SelfAttention and type(layer.input_layernorm) is RMSNorm
            elif isinstance(layer, MLPLayer):
                ok = type(layer.mlp) is MLP and type(layer.pre_mlp_layernorm) is RMSNorm
            else:
                ok = False
            if not ok:
                return f"layer {type(layer).__name__} is not one of the stock layer classes"
        return None

    @torch.inference_mode()
    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        batch = token_ids.shape[0]
        hidden = F.embedding(token_ids, self.embedding)  # [b, hidden]
        for step in self.steps:
            hidden = step(hidden, batch)
        logits = F.linear(_rms_norm(hidden, self.final_norm), self.output_weight)
        return logits[:, : self.vocab_size]

    # ------------------------------------------------------------------------------------------------ layer steps

    def _mamba_step(self, layer: MambaLayer, index: int) -> _Step:
        mixer = layer.mixer
        conv_cache, ssm_cache = self.context.mamba[index]
        heads, headdim, d_state, groups = mixer.nheads_local, mixer.headdim, mixer.d_state, mixer.ngroups_local
        d_inner, group_width = mixer.d_inner_local, mixer.ngroups_local * mixer.d_state
        per_group = heads // groups
        norm_group = mixer.norm.group_size
        low, high = (float(v) for v in self.config.mamba_dt_limit)
        clamp = not (low <= 0.0 and high == math.inf)  # softplus is >= 0: the default limit is a no-op
        in_weight, out_weight = mixer.in_proj.weight, mixer.out_proj.weight
        conv_weight, conv_bias = mixer.conv1d.weight, mixer.conv1d.bias
        norm, gate_norm = layer.norm, mixer.norm

        def step(hidden: torch.Tensor, batch: int) -> torch.Tensor:
            z, xbc, dt = F.linear(_rms_norm(hidden, norm), in_weight).split(
                [d_inner, d_inner + 2 * group_width, heads], dim=-1
            )
            xbc = causal_conv1d_update_ref(xbc, conv_cache[:batch], conv_weight[:, 0], conv_bias, "silu")
            x, B, C = xbc.split([d_inner, group_width, group_width], dim=-1)
            dt = F.softplus(dt + mixer.dt_bias)  # [b, h]
            if clamp:
                dt = dt.clamp(min=low, max=high)
            # state <- exp(dt A) state + dt x B^T, in place on the cache; y = state C + D x (ops.ssm_state_update).
            state = ssm_cache[:batch].view(batch, groups, per_group, headdim, d_state)
            state.mul_(torch.exp(dt * -torch.exp(mixer.A_log)).view(batch, groups, per_group, 1, 1))
            x = x.reshape(batch, groups, per_group, headdim, 1)
            state.addcmul_(x * dt.view(batch, groups, per_group, 1, 1), B.view(batch, groups, 1, 1, d_state))
            y = state @ C.reshape(batch, groups, 1, d_state, 1)  # [b, g, hg, p, 1]
            y = torch.addcmul(y, x, mixer.D.view(1, groups, per_group, 1, 1)).view(batch, d_inner)
            y = y * F.silu(z)
            y = F.rms_norm(y.view(batch, -1, norm_group), (norm_group,), None, gate_norm.eps).view(batch, d_inner)
            return hidden + F.linear(y * gate_norm.weight, out_weight)

        return step

    def _attention_step(self, layer: AttentionLayer, index: int) -> _Step:
        attention = layer.self_attention
        key_cache, value_cache = self.context.kv[index]
        groups, per_group, dim = attention.groups_local, attention.heads_per_group, attention.head_dim
        qkv_linear, proj_linear = attention.linear_qkv, attention.linear_proj
        norm, rotary, context = layer.input_layernorm, attention.rotary, self.context

        def step(hidden: torch.Tensor, batch: int) -> torch.Tensor:
            qkv = F.linear(_rms_norm(hidden, norm), qkv_linear.weight, qkv_linear.bias)
            qkv = qkv.view(batch, groups, per_group + 2, 1, dim)
            q = qkv[:, :, :per_group].reshape(batch, groups * per_group, 1, dim)
            k, v = qkv[:, :, per_group], qkv[:, :, per_group + 1]  # [b, groups, 1, d]
            positions = context.positions[:batch]
            if rotary is not None:
                cos, sin = rotary(positions[:, None])
                q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            keys, values = key_cache[:batch], value_cache[:batch]
            where = positions.view(batch, 1, 1, 1).expand(batch, groups, 1, dim)
            keys.scatter_(2, where, k)
            values.scatter_(2, where, v)
            length = context.attention_length
            out = decode_attention(q[:, :, 0], keys[:, :, :length], values[:, :, :length], positions)
            return hidden + F.linear(out.view(batch, -1), proj_linear.weight, proj_linear.bias)

        return step

    def _mlp_step(self, layer: MLPLayer) -> _Step:
        mlp, norm = layer.mlp, layer.pre_mlp_layernorm
        fc1, fc2, activation = mlp.linear_fc1, mlp.linear_fc2, mlp.activation

        def step(hidden: torch.Tensor, batch: int) -> torch.Tensor:
            inner = activation(F.linear(_rms_norm(hidden, norm), fc1.weight, fc1.bias))
            return hidden + F.linear(inner, fc2.weight, fc2.bias)

        return step
