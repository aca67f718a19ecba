"""The Mamba-2 (SSD) mixer, tensor-parallel by heads and groups.

Parameter semantics follow Megatron-LM's MambaMixer and transformers' NemotronH mixer:
``in_proj`` produces ``[z, x, B, C, dt]``, a causal depthwise conv runs over ``[x, B, C]``, the SSD scan mixes along
the sequence, and a group-wise gated RMSNorm (normalise ``y * silu(z)``) precedes ``out_proj``.
Under tensor parallelism every rank owns ``nheads / tp`` heads and ``ngroups / tp`` groups, i.e. its slice of each of
z / x / B / C / dt and of the conv's x / B / C channels, so the conv and the scan need no communication at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from megatron_hybrid.config import HybridConfig
from megatron_hybrid.layers.init import normal_init, scaled_normal_init
from megatron_hybrid.layers.sharded_param import sharded_parameter
from megatron_hybrid.ops import (
    causal_conv1d_channel_last,
    causal_conv1d_update,
    gated_rms_norm,
    mamba_decode_fused,
    mamba_span,
    ssd_chunk_scan,
    ssm_state_update,
)
from megatron_hybrid.parallel.state import ParallelGroups
from megatron_hybrid.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron_hybrid.spec import build_module


class CausalConv1d(nn.Module):
    """Depthwise causal conv over channels made of tensor-parallel components (x, B, C), SiLU applied.

    ``weight`` keeps nn.Conv1d's ``[channels, 1, kernel]`` shape so state dicts match Megatron and transformers.
    """

    def __init__(
        self, components: list[int], kernel_size: int, bias: bool, groups: ParallelGroups, dtype: torch.dtype
    ) -> None:
        super().__init__()
        channels = sum(components)
        # nn.Conv1d's default init (kaiming-uniform, a = sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for a
        # depthwise kernel (fan_in = kernel size); Megatron and transformers both keep that default.
        bound = 1.0 / math.sqrt(kernel_size)
        weight = torch.empty(channels, 1, kernel_size, dtype=dtype).uniform_(-bound, bound)
        self.weight = sharded_parameter(weight, groups, components)
        self.bias = None
        if bias:
            self.bias = sharded_parameter(
                torch.empty(channels, dtype=dtype).uniform_(-bound, bound), groups, components
            )

    def forward(
        self, x: torch.Tensor, seq_idx: torch.Tensor | None = None, conv_state: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x`` [b, s, channels_local] (channel-last; a strided slice of ``in_proj``'s output is read in place by the
        GPU kernels) -> silu(conv(x)) [b, s, channels_local], a new tensor with contiguous channels.

        With ``conv_state`` [b, channels_local, state_len] (an inference cache, prefill from an empty state), the last
        ``state_len`` inputs of ``x`` (zero-padded on the left for short prompts) are written into it.
        """
        if conv_state is None:
            return causal_conv1d_channel_last(x, self.weight.squeeze(1), self.bias, activation="silu", seq_idx=seq_idx)
        out, final = causal_conv1d_channel_last(
            x, self.weight.squeeze(1), self.bias, activation="silu", seq_idx=seq_idx, return_final_states=True
        )
        # ops return the newest w - 1 inputs; a cache may be wider (d_conv, like mamba_ssm), its oldest columns unread.
        keep = final.shape[-1]
        conv_state[..., conv_state.shape[-1] - keep :].copy_(final)
        conv_state[..., : conv_state.shape[-1] - keep].zero_()
        return out

    def step(self, x: torch.Tensor, conv_state: torch.Tensor) -> torch.Tensor:
        """One decode step: ``x`` [b, channels_local] -> silu(conv) [b, channels_local]; ``conv_state`` updated."""
        return causal_conv1d_update(x, conv_state, self.weight.squeeze(1), self.bias, activation="silu")


class GatedRMSNorm(nn.Module):
    """RMSNorm of ``y * silu(z)`` over groups of ``group_size`` channels (Mamba-2's norm-after-gate)."""

    def __init__(self, width: int, group_size: int, eps: float, groups: ParallelGroups, dtype: torch.dtype) -> None:
        super().__init__()
        self.group_size = group_size
        self.eps = eps
        self.weight = sharded_parameter(torch.ones(width, dtype=dtype), groups)

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(y, z, self.weight, self.eps, group_size=self.group_size)


@dataclass(frozen=True)
class MambaMixerSubmodules:
    in_proj: object = ColumnParallelLinear
    out_proj: object = RowParallelLinear


class MambaMixer(nn.Module):
    def __init__(
        self,
        config: HybridConfig,
        groups: ParallelGroups,
        submodules: MambaMixerSubmodules = MambaMixerSubmodules(),
        layer_number: int = 0,
    ) -> None:
        super().__init__()
        self.config = config
        self.layer_number = layer_number
        tp = groups.tp_size
        self.nheads = config.mamba_num_heads
        self.ngroups = config.mamba_num_groups
        if self.nheads % tp or self.ngroups % tp:
            raise ValueError(
                f"tensor parallel size {tp} must divide mamba_num_heads ({self.nheads}) and mamba_num_groups "
                f"({self.ngroups})"
            )
        self.headdim = config.mamba_head_dim
        self.d_state = config.mamba_state_dim
        self.d_inner = config.mamba_d_inner
        self.chunk_size = config.mamba_chunk_size
        self.nheads_local = self.nheads // tp
        self.ngroups_local = self.ngroups // tp
        self.d_inner_local = self.d_inner // tp
        group_width = self.ngroups * self.d_state
        dtype = config.params_dtype

        self.in_proj = build_module(
            submodules.in_proj,
            config.hidden_size,
            2 * self.d_inner + 2 * group_width + self.nheads,
            groups=groups,
            bias=False,
            sequence_parallel=config.sequence_parallel,
            init_method=normal_init(config.init_method_std),
            dtype=config.params_dtype,
            tp_components=[self.d_inner, self.d_inner, group_width, group_width, self.nheads],
        )
        self.conv1d = CausalConv1d(
            [self.d_inner, group_width, group_width], config.mamba_conv_kernel, config.mamba_conv_bias, groups, dtype
        )

        # dt_bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max], floored (Mamba-2's init).
        log_dt_min, log_dt_max = math.log(config.mamba_dt_min), math.log(config.mamba_dt_max)
        dt = torch.exp(torch.rand(self.nheads) * (log_dt_max - log_dt_min) + log_dt_min)
        dt = dt.clamp(min=config.mamba_dt_init_floor)
        self.dt_bias = sharded_parameter((dt + torch.log(-torch.expm1(-dt))).to(dtype), groups)
        a_low, a_high = config.mamba_A_init_range
        self.A_log = sharded_parameter(torch.log(torch.empty(self.nheads).uniform_(a_low, a_high)).to(dtype), groups)
        self.D = sharded_parameter(torch.ones(self.nheads, dtype=dtype), groups)
        for param in (self.dt_bias, self.A_log, self.D):
            param.no_weight_decay = True  # the recurrence's own dynamics are not regularised (as in Mamba)

        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // self.ngroups, config.norm_epsilon, groups, dtype)
        # Decode through the fused Triton step, and train through the fused span between the projections
        # (``ops.mamba_span``), where they apply (CUDA); False forces the composed ops (benchmarks compare).
        self.fused_decode = True
        self.fused_span = True
        self.out_proj = build_module(
            submodules.out_proj,
            self.d_inner,
            config.hidden_size,
            groups=groups,
            bias=False,
            input_is_parallel=True,
            sequence_parallel=config.sequence_parallel,
            init_method=scaled_normal_init(config.init_method_std, config.num_layers),
            dtype=config.params_dtype,
        )

    def allocate_inference_cache(
        self,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        ssm_state_dtype: torch.dtype = torch.float32,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed decode caches of this rank: conv state [b, conv_dim_local, d_conv] (in the conv's dtype, as the
        conv-update kernels want) and SSM state [b, nheads_local, headdim, d_state] (float32 by default: the state
        accumulates over the whole sequence, so rounding it to bf16 every token would drift)."""
        conv_weight = self.conv1d.weight
        conv_state = torch.zeros(
            batch_size, conv_weight.shape[0], conv_weight.shape[-1],
            device=device if device is not None else conv_weight.device, dtype=dtype or conv_weight.dtype,
        )
        ssm_state = torch.zeros(
            batch_size, self.nheads_local, self.headdim, self.d_state, device=conv_state.device, dtype=ssm_state_dtype
        )
        return conv_state, ssm_state

    def forward(
        self, hidden_states: torch.Tensor, seq_idx: torch.Tensor | None = None, inference_context=None
    ) -> torch.Tensor:
        """``hidden_states`` [s, b, hidden] (the local sequence slice under sequence parallelism) -> same shape.

        ``inference_context`` (``megatron_hybrid.inference.InferenceContext``): a decode step reads and advances this
        layer's cached states; a prefill (from empty states) runs the full-sequence path below and stores the final
        conv inputs and SSM state in the cache.
        """
        conv_state = ssm_state = None
        if inference_context is not None:
            conv_state, ssm_state = inference_context.mamba_states(self.layer_number)
            if inference_context.is_decode:
                return self._decode_step(hidden_states, conv_state, ssm_state)
        # The fused span reads and writes the [b, s, width] view of a sequence-first projection in place (its
        # output and in_proj's gradient come back sequence-first), so there the projections need no transposes.
        # Composed ops work batch-first from the in_proj on: transposing the narrow [s, b, hidden] input is cheaper
        # than their copies and concatenated gradients of such views (5x wider). Sequence parallelism gathers and
        # scatters along dim 0, so there the projections always stay sequence-first.
        fused = self.fused_span and conv_state is None and hidden_states.is_cuda
        batch_first = not (self.config.sequence_parallel or fused)
        if batch_first:
            zxbcdt = self.in_proj(hidden_states.transpose(0, 1))  # [b, s, local width]
        else:
            zxbcdt = self.in_proj(hidden_states).transpose(0, 1)
        y = None
        if fused:
            y = mamba_span(
                zxbcdt, self.conv1d.weight.squeeze(1), self.conv1d.bias, -torch.exp(self.A_log.float()), self.D,
                self.dt_bias, self.norm.weight, nheads=self.nheads_local, headdim=self.headdim,
                ngroups=self.ngroups_local, d_state=self.d_state, chunk_size=self.chunk_size,
                norm_group_size=self.norm.group_size, norm_eps=self.norm.eps, dt_limit=self.config.mamba_dt_limit,
                seq_idx=seq_idx,
            )
        if y is None:
            y = self._composed_span(zxbcdt, seq_idx, conv_state, ssm_state)
        if batch_first:
            return self.out_proj(y).transpose(0, 1)
        return self.out_proj(y.transpose(0, 1))

    def _composed_span(
        self, zxbcdt: torch.Tensor, seq_idx: torch.Tensor | None, conv_state: torch.Tensor | None,
        ssm_state: torch.Tensor | None,
    ) -> torch.Tensor:
        """Conv, scan and gated norm as separate ops: ``zxbcdt`` [b, s, local width] -> [b, s, d_inner_local];
        with caches (a prefill) their final conv inputs and SSM state are stored."""
        batch, seqlen, _ = zxbcdt.shape
        group_width = self.ngroups_local * self.d_state
        z, xbc, dt = torch.split(
            zxbcdt, [self.d_inner_local, self.d_inner_local + 2 * group_width, self.nheads_local], dim=-1
        )
        xbc = self.conv1d(xbc, seq_idx, conv_state=conv_state)
        x, B, C = torch.split(xbc, [self.d_inner_local, group_width, group_width], dim=-1)
        y = ssd_chunk_scan(
            x.reshape(batch, seqlen, self.nheads_local, self.headdim),
            dt,
            -torch.exp(self.A_log.float()),
            B.reshape(batch, seqlen, self.ngroups_local, self.d_state),
            C.reshape(batch, seqlen, self.ngroups_local, self.d_state),
            self.chunk_size,
            D=self.D,
            dt_bias=self.dt_bias,
            dt_softplus=True,
            dt_limit=self.config.mamba_dt_limit,
            seq_idx=seq_idx,
            return_final_states=ssm_state is not None,
        )
        if ssm_state is not None:
            y, final_state = y
            ssm_state.copy_(final_state)
        return self.norm(y.reshape(batch, seqlen, self.d_inner_local), z)

    def _decode_step(
        self, hidden_states: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor
    ) -> torch.Tensor:
        """One token per row: ``hidden_states`` [1, b, hidden]; conv and SSM states advance in place.

        On CUDA the span between the projections is two fused Triton kernels (``ops.mamba_decode_fused``: a replayed
        decode step is bound by kernel launches, ~30 per layer unfused). Elsewhere, with
        ``MEGATRON_HYBRID_KERNELS=torch`` or with ``fused_decode`` set False (benchmarks compare the two): the unfused
        ops below, same semantics.
        """
        zxbcdt = self.in_proj(hidden_states)[0]  # [b, local width]
        if self.fused_decode:
            y = mamba_decode_fused(
                zxbcdt, conv_state, self.conv1d.weight, self.conv1d.bias, ssm_state, self.A_log, self.dt_bias,
                self.D, self.norm.weight, norm_group_size=self.norm.group_size, eps=self.norm.eps,
                dt_limit=self.config.mamba_dt_limit,
            )
            if y is not None:
                return self.out_proj(y.unsqueeze(0))
        batch = zxbcdt.shape[0]
        group_width = self.ngroups_local * self.d_state
        z, xbc, dt = torch.split(
            zxbcdt, [self.d_inner_local, self.d_inner_local + 2 * group_width, self.nheads_local], dim=-1
        )
        xbc = self.conv1d.step(xbc, conv_state)
        x, B, C = torch.split(xbc, [self.d_inner_local, group_width, group_width], dim=-1)
        y = ssm_state_update(
            ssm_state,
            x.reshape(batch, self.nheads_local, self.headdim),
            dt,
            -torch.exp(self.A_log.float()),
            B.reshape(batch, self.ngroups_local, self.d_state),
            C.reshape(batch, self.ngroups_local, self.d_state),
            D=self.D,
            dt_bias=self.dt_bias,
            dt_softplus=True,
            dt_limit=self.config.mamba_dt_limit,
        )
        y = self.norm(y.reshape(batch, self.d_inner_local), z)
        return self.out_proj(y.unsqueeze(0))
