"""A flattened decode step, and prefill of short prompts, for CPU models at tensor-parallel size 1.

Through the layer modules a decode step of a small model is dominated by per-operation overhead: a token through the
12-layer CPU benchmark model makes ~70 ``nn.Module`` calls and ~570 tensor operations, each with tensor-parallel
plumbing (identity at TP=1), backend dispatch and dtype checks. :class:`LeanDecoder` runs the SAME computation as the
layers' decode paths (``MambaMixer._decode_step``, ``SelfAttention`` with an inference context, ``MLP``) as one flat
loop of 8 to 30 tensor operations per layer on ``[batch, hidden]`` activations, updating the context's caches in
place. What is left of a batch-1 step is mostly the matmuls streaming ~30 MB of float32 weights from L3 (about 60% of
the step on the benchmark machine); see ``benchmarks/README.md`` ("CPU decode") for the measurements.

* matmul weights are kept as transposed contiguous copies ``[in, out]`` with the preceding RMSNorm's weight folded in
  (MKL's GEMM with a transposed ``W`` for ``x @ W^T`` is 1.3-2x slower at these shapes; folding saves the norm's
  multiply), and the residual add is fused into the output projections (``addmm``), dt's bias into ``in_proj``. The
  copies are made only while they total at most ``max_prepared_bytes`` (else the parameters are read in place), and
  are rebuilt when any parameter changes (version counter or storage), so they never go stale after
  ``load_state_dict``, an optimizer step or an assignment to ``.data``;
* RMSNorm's mean of squares is one ``addmm`` with a ``1/d`` column (adding ``eps`` on the way): half the cost of
  ``pow().mean()``, which launches a sum, a division and dtype conversions;
* the conv update shifts the flattened state by one element into a work buffer (a plain copy; a strided ``cat`` is
  3x slower), writes the new input, copies the window back and takes a per-channel ``vecdot``. The SSM update is two
  in-place passes (decay, then ``addcmul_`` of ``dt x B^T``) and one ``baddbmm`` computing ``y^T = C^T state^T + D x``
  (MKL's batched GEMM is ~2.5x faster that way round than ``state @ C``);
* attention treats the query heads of a key/value group as that group's queries (no repeat, no reshape copy), runs
  ``scaled_dot_product_attention`` with an additive mask, and rotates queries and keys of a group in one rotary
  application; the mask, the cache write index and the rotary tables are built once per step for all layers;
* projections write into work buffers shared by the layers, and every view of a buffer or a cache a step needs is
  built once per batch size and reused, so a step spends its dispatches on arithmetic;
* :meth:`LeanDecoder.prefill` fills the caches for prompts of up to ``PREFILL_MAX_TOKENS`` tokens with the same
  prepared weights and the SSD evaluated as one exact block (the general chunked scan pads to its block size and
  handles documents and initial states a fresh prompt does not have): ~1.7x faster than the layers' prefill.

Scope (``LeanDecoder.unsupported_reason`` says why a model is refused, and the runner then uses the layer path):
float32 parameters, tensor-parallel size 1, the stock layer classes. ``tests/inference`` checks it against the layer
path and the full-sequence forward for every layer type. The CUDA path needs none of this: CUDA graphs remove the
overhead there. ``torch.compile`` of this step was measured and not adopted: no faster at batch 1, slower at 16.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from megatron_hybrid.inference.context import InferenceContext
from megatron_hybrid.layers.attention import SelfAttention
from megatron_hybrid.layers.hybrid_layers import AttentionLayer, MambaLayer, MLPLayer, _PreNormResidual
from megatron_hybrid.layers.mamba_mixer import MambaMixer
from megatron_hybrid.layers.mlp import MLP, squared_relu, swiglu
from megatron_hybrid.layers.norm import RMSNorm
from megatron_hybrid.layers.rotary import RotaryEmbedding

__all__ = ["DEFAULT_MAX_PREPARED_BYTES", "LeanDecoder", "stock_layers_reason"]

DEFAULT_MAX_PREPARED_BYTES = 1 << 30  # transposed weight copies for models up to 1 GiB of 2-D float32 parameters

_Step = Callable[[torch.Tensor, int], torch.Tensor]
_PrefillStep = Callable[[torch.Tensor, int, int, int], torch.Tensor]  # (hidden [k * s, h], k, s, first slot)

PREFILL_MAX_TOKENS = 64  # the lean prefill's SSD is one block of [s, s] decay matrices; longer prompts use the layers

# Log-decays below this are flushed to exactly 0 after exp (as ops.ssd does): exp(-40) is far below float32
# resolution next to a token's own term, and subnormal floats make x86 matmuls 10-100x slower.
_LOG_DECAY_FLOOR = -40.0


def stock_layers_reason(model: torch.nn.Module) -> str | None:
    """None when ``model`` is a whole model (embedding to output layer) built of the stock layer, mixer and norm
    classes, whose decode computation a flattened step reproduces; else why not."""
    if not (model.pre_process and model.post_process) or model.decoder.final_norm is None:
        return "needs the whole model"
    if type(model.decoder.final_norm) is not RMSNorm:
        return "the final norm is not the stock RMSNorm"
    for layer in model.decoder.layers.values():
        if isinstance(layer, MambaLayer):
            ok = type(layer.mixer) is MambaMixer and type(layer.norm) is RMSNorm
        elif isinstance(layer, AttentionLayer):
            attention = layer.self_attention
            ok = type(attention) is SelfAttention and type(layer.input_layernorm) is RMSNorm
            ok = ok and (attention.rotary is None or type(attention.rotary) is RotaryEmbedding)
        elif isinstance(layer, MLPLayer):
            ok = type(layer.mlp) is MLP and type(layer.pre_mlp_layernorm) is RMSNorm
        else:
            ok = False
        if not ok or type(layer).forward is not _PreNormResidual.forward:
            return f"layer {type(layer).__name__} is not one of the stock layer classes"
    return None


class _InvRMS:
    """``x [n, d] -> 1 / sqrt(mean(x^2, -1) + eps)`` as [n, 1]: RMSNorm's scale, in one ``addmm``.

    ``x * x`` rather than ``square()`` (a ``pow`` with extra dispatch), and an ``eps`` tensor of the output's exact
    shape per row count (a broadcast one costs ``addmm`` an ``expand``).
    """

    def __init__(self, width: int, eps: float) -> None:
        self.column = torch.full((width, 1), 1.0 / width)
        self.eps_value = eps
        self.eps: dict[int, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        eps = self.eps.get(rows)
        if eps is None:
            eps = self.eps[rows] = torch.full((rows, 1), self.eps_value)
        return torch.addmm(eps, x * x, self.column).rsqrt_()


class LeanDecoder:
    """``decoder(token_ids [b]) -> logits [b, vocab]``: one decode step of the context's slots ``0 .. b - 1`` (the
    context's ``positions`` must hold their positions and ``attention_length`` cover them), identical in effect to
    ``model(ids[:, None], inference_context=context)`` in decode mode, up to float32 rounding order."""

    def __init__(
        self,
        model: torch.nn.Module,
        context: InferenceContext,
        *,
        max_prepared_bytes: int = DEFAULT_MAX_PREPARED_BYTES,
    ) -> None:
        reason = self.unsupported_reason(model, context)
        if reason is not None:
            raise ValueError(f"LeanDecoder cannot run this model: {reason}")
        self.model = model
        self.context = context
        self.vocab_size = model.config.vocab_size
        self._params = list(model.parameters())
        # The copies: every matmul weight and the output layer (a tied one stands in for the embedding's count).
        self.prepared = sum(p.numel() * 4 for p in self._params if p.dim() == 2) <= max_prepared_bytes
        self._signature: list[tuple[int, int]] = []
        self._prepare()

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
        return stock_layers_reason(model)

    # ------------------------------------------------------------------------------------------------ the step

    @torch.inference_mode()
    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        if [(p._version, p.data_ptr()) for p in self._params] != self._signature:
            self._prepare()  # a parameter changed since the copies were made
        batch = token_ids.shape[0]
        if self._attention_shapes is not None:
            # Shared by every attention layer of this step: the cache write index, the additive mask of each row's
            # keys (0 .. position; SDPA is ~30% faster with it than with a boolean one) and the rotary tables.
            context = self.context
            positions = context.positions[:batch]
            length = context.attention_length
            self._where = positions.view(batch, 1, 1, 1).expand(batch, *self._attention_shapes)
            visible = self._arange[:length] <= positions[:, None]
            self._mask = torch.where(visible, self._zero, self._minus_inf).view(batch, 1, 1, length)
            self._length = length
            for tables in self._rotary.values():
                tables.update(positions)
        hidden = F.embedding(token_ids, self.embedding)  # [b, hidden]
        for step in self.steps:
            hidden = step(hidden, batch)
        weight_t, scale = self.output
        normed = hidden * self.final_rms(hidden)
        logits = torch.mm(normed if scale is None else normed * scale, weight_t)
        return logits[:, : self.vocab_size]

    def can_prefill(self, length: int) -> bool:
        """Whether :meth:`prefill` takes prompts of ``length`` tokens (short ones; longer prompts go through the
        layers, whose chunked SSD scales to any length)."""
        return 1 <= length <= PREFILL_MAX_TOKENS

    @torch.inference_mode()
    def prefill(self, slot: int, prompt_ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Prompts ``prompt_ids`` [k, s] (one length, ``can_prefill(s)``) into the empty slots ``slot .. slot + k - 1``:
        the same caches and logits as the model's prefill forward (``InferenceContext.set_prefill``), up to float32
        rounding order. Returns logits [k, s, vocab] if ``all_logits`` else [k, 1, vocab].

        The SSD runs as one exact block of the prompt's length, and the projections use the prepared weights.
        """
        if [(p._version, p.data_ptr()) for p in self._params] != self._signature:
            self._prepare()
        count, length = prompt_ids.shape
        if not self.can_prefill(length) or not 0 <= slot <= self.context.max_batch_size - count:
            raise ValueError(f"cannot prefill {count} prompts of {length} tokens into slot {slot}")
        hidden = F.embedding(prompt_ids.reshape(-1), self.embedding)  # [k * s, hidden]
        for step in self.prefill_steps:
            hidden = step(hidden, count, length, slot)
        if not all_logits:
            hidden = hidden.view(count, length, -1)[:, -1]
        weight_t, scale = self.output
        normed = hidden * self.final_rms(hidden)
        logits = torch.mm(normed if scale is None else normed * scale, weight_t)
        return logits.view(count, -1, logits.shape[-1])[..., : self.vocab_size]

    # ------------------------------------------------------------------------------------------------ preparation

    def _matmul_weight(
        self, weight: torch.Tensor, scale: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight as ``[in, out]``, scale still to apply to the input): a folded contiguous copy when preparing,
        else a transposed view of the parameter and the norm's weight."""
        if not self.prepared:
            return weight.t(), scale
        if scale is not None:
            weight = weight * scale
        return weight.t().contiguous(), None

    def _scratch(self, name: str, *shape: int) -> torch.Tensor:
        """A float32 work buffer for ``max_batch_size`` rows, shared by the layers (each uses it within its step)."""
        shape = (self.context.max_batch_size, *shape)
        buffer = self._buffers.get(name)
        if buffer is None or tuple(buffer.shape) != shape:
            buffer = self._buffers[name] = torch.empty(shape)
        return buffer

    @torch.inference_mode()
    def _prepare(self) -> None:
        model = self.model
        self._buffers: dict[str, torch.Tensor] = {}
        self._rotary: dict[RotaryEmbedding, _RotaryTables] = {}
        self._attention_shapes: tuple[int, int, int] | None = None
        self.embedding = model.embedding.word_embeddings.weight
        final_norm = model.decoder.final_norm
        self.final_rms = _InvRMS(final_norm.weight.shape[0], final_norm.eps)
        self.output = self._matmul_weight(model.output_weight, final_norm.weight)
        self.steps: list[_Step] = []
        self.prefill_steps: list[_PrefillStep] = []
        for name, layer in model.decoder.layers.items():
            if isinstance(layer, MambaLayer):
                steps = self._mamba_layer(layer, int(name))
            elif isinstance(layer, AttentionLayer):
                steps = self._attention_layer(layer, int(name))
            else:
                steps = self._mlp_layer(layer)
            self.steps.append(steps[0])
            self.prefill_steps.append(steps[1])
        self._arange = torch.arange(self.context.max_sequence_length)
        self._zero, self._minus_inf = torch.tensor(0.0), torch.tensor(float("-inf"))
        self._signature = [(p._version, p.data_ptr()) for p in self._params]

    # ------------------------------------------------------------------------------------------------ layer steps

    def _mamba_layer(self, layer: MambaLayer, index: int) -> tuple[_Step, _PrefillStep]:
        mixer = layer.mixer
        conv_cache, ssm_cache = self.context.mamba[index]
        heads, headdim, d_state, groups = mixer.nheads_local, mixer.headdim, mixer.d_state, mixer.ngroups_local
        d_inner, group_width = mixer.d_inner_local, groups * d_state
        conv_dim = d_inner + 2 * group_width
        per_group = heads // groups
        rows_per_group = per_group * headdim
        norm_group = mixer.norm.group_size
        low, high = (float(v) for v in mixer.config.mamba_dt_limit)
        clamp = not (low <= 0.0 and high == math.inf)  # softplus is >= 0: the default limit is a no-op
        in_rms, gate_rms = _InvRMS(layer.norm.weight.shape[0], layer.norm.eps), _InvRMS(norm_group, mixer.norm.eps)
        in_weight, in_scale = self._matmul_weight(mixer.in_proj.weight, layer.norm.weight)
        out_weight, out_scale = self._matmul_weight(mixer.out_proj.weight, mixer.norm.weight)
        conv_weight, conv_bias = mixer.conv1d.weight[:, 0], mixer.conv1d.bias  # [conv_dim, width]
        A = -torch.exp(mixer.A_log.float())  # [h]
        # dt's bias rides on the in_proj GEMM (addmm): zero for z, x, B and C, dt_bias for the dt columns.
        in_bias = torch.cat((torch.zeros(d_inner + conv_dim), mixer.dt_bias.detach()))
        D = mixer.D.view(heads, 1)
        zxbcdt_buffer = self._scratch("in_proj", in_weight.shape[1])
        window_buffer = self._scratch("conv_window", *conv_weight.shape)
        xbc_buffer = self._scratch("conv_out", conv_dim)
        y_buffer = self._scratch("ssm_out", d_inner)
        views: dict[int, tuple[torch.Tensor, ...]] = {}

        def batch_views(batch: int) -> tuple[torch.Tensor, ...]:
            zxbcdt, window, conv_state = zxbcdt_buffer[:batch], window_buffer[:batch], conv_cache[:batch]
            xbc, y, state = xbc_buffer[:batch], y_buffer[:batch], ssm_cache[:batch]
            views[batch] = found = (
                zxbcdt,
                zxbcdt[:, :d_inner],  # z
                zxbcdt[:, d_inner + conv_dim :],  # dt before softplus
                window,
                conv_state,
                # Shifting the flattened rows left by one element moves every channel's window left (each channel's
                # oldest entry lands in its left neighbour's newest slot, which the new input then overwrites).
                window.view(batch, -1)[:, :-1],
                conv_state.view(batch, -1)[:, 1:],
                window[:, :, -1],
                zxbcdt[:, d_inner : d_inner + conv_dim],  # conv input
                xbc,
                xbc[:, :d_inner].view(batch, heads, headdim),  # x
                xbc[:, :d_inner].view(batch, groups, per_group, headdim, 1),
                xbc[:, d_inner : d_inner + group_width].view(batch, groups, 1, 1, d_state),  # B
                xbc[:, d_inner + group_width :],  # C
                state,
                state.view(batch, groups, per_group, headdim, d_state),
                state.view(batch * groups, rows_per_group, d_state).transpose(1, 2),
                y,
                y.view(batch * groups, 1, rows_per_group),
                y.view(-1, norm_group),
            )
            return found

        def step(hidden: torch.Tensor, batch: int) -> torch.Tensor:
            (
                zxbcdt, z, dt, window, conv_state, shift_to, shift_from, newest, conv_in, xbc, x, x_by_group, B, C,
                state, state_by_group, state_t, y, y_by_group, y_by_norm_group,
            ) = views.get(batch) or batch_views(batch)
            normed = hidden * in_rms(hidden)
            torch.addmm(in_bias, normed if in_scale is None else normed * in_scale, in_weight, out=zxbcdt)
            # Conv: the new window is the old state shifted left plus the new input; it is also the new state.
            shift_to.copy_(shift_from)
            newest.copy_(conv_in)
            conv_state.copy_(window)
            torch.linalg.vecdot(window, conv_weight, out=xbc)
            if conv_bias is not None:
                xbc.add_(conv_bias)
            F.silu(xbc, inplace=True)
            dt = F.softplus(dt)  # [b, h]
            if clamp:
                dt = dt.clamp_(min=low, max=high)
            # state <- exp(dt A) state + dt x B^T, in place on the cache; y = state C + D x (ops.ssm_state_update).
            state.mul_((dt * A).exp_().view(batch, heads, 1, 1))
            state_by_group.addcmul_(x_by_group * dt.view(batch, groups, per_group, 1, 1), B)
            torch.baddbmm(
                (x * D).view(batch * groups, 1, rows_per_group),
                C.reshape(batch * groups, 1, d_state),
                state_t,
                out=y_by_group,
            )
            # Gated RMSNorm (norm after the gate), its weight folded into out_proj; then the residual add.
            y.mul_(F.silu(z))
            y_by_norm_group.mul_(gate_rms(y_by_norm_group))
            return torch.addmm(hidden, y if out_scale is None else y * out_scale, out_weight)

        width = conv_weight.shape[1]
        causal = torch.ones(PREFILL_MAX_TOKENS, PREFILL_MAX_TOKENS, dtype=torch.bool).tril()

        def prefill(hidden: torch.Tensor, count: int, length: int, slot: int) -> torch.Tensor:
            normed = hidden * in_rms(hidden)
            zxbcdt = torch.addmm(in_bias, normed if in_scale is None else normed * in_scale, in_weight)
            zxbcdt = zxbcdt.view(count, length, -1)
            # Causal depthwise conv from an empty state, channel-last: one multiply-add per tap over the zero-padded
            # inputs. The cache keeps the newest width - 1 inputs (its oldest column stays zero, as the layers do).
            padded = F.pad(zxbcdt[..., d_inner : d_inner + conv_dim], (0, 0, width - 1, 0))  # [k, w - 1 + s, c]
            conv_cache[slot : slot + count].copy_(F.pad(padded[:, -(width - 1) :].transpose(1, 2), (1, 0)))
            xbc = padded[:, :length] * conv_weight[:, 0]
            for tap in range(1, width):
                xbc.addcmul_(padded[:, tap : tap + length], conv_weight[:, tap])
            if conv_bias is not None:
                xbc.add_(conv_bias)
            F.silu(xbc, inplace=True)
            dt = F.softplus(zxbcdt[..., d_inner + conv_dim :])  # [k, s, h]
            if clamp:
                dt = dt.clamp_(min=low, max=high)
            # SSD as one block, head-major [k, g, hg, s, ...]: y = ((C B^T) * L * dt_j) x with
            # L[i, j] = exp(cum_i - cum_j) (i >= j), cum = cumsum(dt A); the final state sums every token's
            # dt_j x_j B_j^T decayed to the end.
            dt_h = dt.view(count, length, groups, per_group).permute(0, 2, 3, 1)  # [k, g, hg, s]
            cum = torch.cumsum(dt_h * A.view(groups, per_group, 1), dim=-1)
            decay = cum[..., :, None] - cum[..., None, :]  # [k, g, hg, s, s]
            decay.masked_fill_(~causal[:length, :length], -math.inf)
            F.threshold_(decay, _LOG_DECAY_FLOOR, -math.inf).exp_()
            x_h = xbc[..., :d_inner].view(count, length, groups, per_group, headdim).permute(0, 2, 3, 1, 4)
            B_h = xbc[..., d_inner : d_inner + group_width].view(count, length, groups, d_state).transpose(1, 2)
            C_h = xbc[..., d_inner + group_width :].view(count, length, groups, d_state).transpose(1, 2)
            scores = C_h @ B_h.transpose(-1, -2)  # [k, g, s, s]
            mixed = decay.mul_(scores.unsqueeze(2)).mul_(dt_h.unsqueeze(-2))
            y = mixed @ x_h  # [k, g, hg, s, p]
            to_end = F.threshold_(cum[..., -1:] - cum, _LOG_DECAY_FLOOR, -math.inf).exp_().mul_(dt_h)
            state = (x_h * to_end.unsqueeze(-1)).transpose(-1, -2) @ B_h.unsqueeze(2)  # [k, g, hg, p, n]
            ssm_cache[slot : slot + count].copy_(state.view(count, heads, headdim, d_state))
            x = xbc[..., :d_inner].view(count, length, heads, headdim)
            out = torch.empty(count * length, d_inner)  # token-major and contiguous, whatever y's layout
            torch.addcmul(y.permute(0, 3, 1, 2, 4).reshape(x.shape), x, D, out=out.view(x.shape))
            y = out
            y.mul_(F.silu(zxbcdt[..., :d_inner]).view(count * length, d_inner))
            grouped = y.view(-1, norm_group)
            grouped.mul_(gate_rms(grouped))
            return torch.addmm(hidden, y if out_scale is None else y * out_scale, out_weight)

        return step, prefill

    def _attention_layer(self, layer: AttentionLayer, index: int) -> tuple[_Step, _PrefillStep]:
        attention = layer.self_attention
        key_cache, value_cache = self.context.kv[index]
        groups, per_group, dim = attention.groups_local, attention.heads_per_group, attention.head_dim
        self._attention_shapes = (groups, 1, dim)
        rms = _InvRMS(layer.input_layernorm.weight.shape[0], layer.input_layernorm.eps)
        qkv_weight, qkv_scale = self._matmul_weight(attention.linear_qkv.weight, layer.input_layernorm.weight)
        qkv_bias = attention.linear_qkv.bias
        proj_weight, _ = self._matmul_weight(attention.linear_proj.weight, None)
        proj_bias = attention.linear_proj.bias
        rotary = attention.rotary
        tables = None if rotary is None else self._rotary.setdefault(rotary, _RotaryTables(rotary))
        rotary_dim = rotary.rotary_dim if rotary is not None else 0
        qkv_buffer = self._scratch("qkv", qkv_weight.shape[1])
        views: dict[int, tuple[torch.Tensor, ...]] = {}

        def batch_views(batch: int) -> tuple[torch.Tensor, ...]:
            qkv = qkv_buffer[:batch]
            by_group = qkv.view(batch, groups, per_group + 2, dim)  # per kv group: its query heads, then k, then v
            views[batch] = found = (
                qkv,
                by_group[:, :, :per_group],  # the group's query heads act as the group's queries
                by_group[:, :, per_group : per_group + 1],
                by_group[:, :, per_group + 1 :],
                by_group[:, :, : per_group + 1, :rotary_dim],  # queries and key, rotated together
                key_cache[:batch],
                value_cache[:batch],
            )
            return found

        def step(hidden: torch.Tensor, batch: int) -> torch.Tensor:
            qkv, q, k, v, qk, keys, values = views.get(batch) or batch_views(batch)
            normed = hidden * rms(hidden)
            if qkv_scale is not None:
                normed = normed * qkv_scale
            if qkv_bias is None:
                torch.mm(normed, qkv_weight, out=qkv)
            else:
                torch.addmm(qkv_bias, normed, qkv_weight, out=qkv)
            if tables is not None:
                qk.copy_(torch.addcmul(qk * tables.cos, qk.roll(rotary_dim // 2, dims=-1), tables.signed_sin))
            keys.scatter_(2, self._where, k)
            values.scatter_(2, self._where, v)
            length = self._length
            out = F.scaled_dot_product_attention(q, keys[:, :, :length], values[:, :, :length], attn_mask=self._mask)
            hidden = torch.addmm(hidden, out.view(batch, -1), proj_weight)
            return hidden if proj_bias is None else hidden.add_(proj_bias)

        def prefill(hidden: torch.Tensor, count: int, length: int, slot: int) -> torch.Tensor:
            normed = hidden * rms(hidden)
            qkv = torch.mm(normed if qkv_scale is None else normed * qkv_scale, qkv_weight)
            if qkv_bias is not None:
                qkv.add_(qkv_bias)
            qkv = qkv.view(count, length, groups, per_group + 2, dim)
            if tables is not None:
                cos, signed_sin = tables.compute(self._arange[:length], (1, length, 1, 1, -1))
                qk = qkv[..., : per_group + 1, :rotary_dim]
                qk.copy_(torch.addcmul(qk * cos, qk.roll(rotary_dim // 2, dims=-1), signed_sin))
            key_cache[slot : slot + count, :, :length].copy_(qkv[..., per_group, :].transpose(1, 2))
            value_cache[slot : slot + count, :, :length].copy_(qkv[..., per_group + 1, :].transpose(1, 2))
            q = qkv[..., :per_group, :].reshape(count, length, groups * per_group, dim).transpose(1, 2)
            out = F.scaled_dot_product_attention(
                q, key_cache[slot : slot + count, :, :length], value_cache[slot : slot + count, :, :length],
                is_causal=True, enable_gqa=True,
            )  # [k, heads, s, d]
            hidden = torch.addmm(hidden, out.transpose(1, 2).reshape(count * length, -1), proj_weight)
            return hidden if proj_bias is None else hidden.add_(proj_bias)

        return step, prefill

    def _mlp_layer(self, layer: MLPLayer) -> tuple[_Step, _PrefillStep]:
        mlp = layer.mlp
        rms = _InvRMS(layer.pre_mlp_layernorm.weight.shape[0], layer.pre_mlp_layernorm.eps)
        fc1_weight, fc1_scale = self._matmul_weight(mlp.linear_fc1.weight, layer.pre_mlp_layernorm.weight)
        fc2_weight, _ = self._matmul_weight(mlp.linear_fc2.weight, None)
        fc1_bias, fc2_bias = mlp.linear_fc1.bias, mlp.linear_fc2.bias
        activation = mlp.activation
        fc1_buffer = self._scratch("fc1", fc1_weight.shape[1])

        def step(hidden: torch.Tensor, batch: int) -> torch.Tensor:
            return forward(hidden, fc1_buffer[:batch])

        def prefill(hidden: torch.Tensor, count: int, length: int, slot: int) -> torch.Tensor:
            return forward(hidden, torch.empty(hidden.shape[0], fc1_weight.shape[1]))

        def forward(hidden: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
            normed = hidden * rms(hidden)
            if fc1_scale is not None:
                normed = normed * fc1_scale
            if fc1_bias is None:
                torch.mm(normed, fc1_weight, out=inner)
            else:
                torch.addmm(fc1_bias, normed, fc1_weight, out=inner)
            if activation is squared_relu:
                inner.relu_()
                inner.mul_(inner)
            elif activation is swiglu:
                gate, up = inner.chunk(2, dim=-1)
                inner = F.silu(gate).mul_(up)
            else:
                inner = activation(inner)
            hidden = torch.addmm(hidden, inner, fc2_weight)
            return hidden if fc2_bias is None else hidden.add_(fc2_bias)

        return step, prefill


class _RotaryTables:
    """cos and sin of one step's positions for a rotary module, shared by all layers that use it.

    ``rotate_half(x) * sin == roll(x, rotary_dim / 2) * signed_sin`` with ``signed_sin`` the sine with its first half
    negated: one ``roll`` instead of a split, a negation and a concatenation per layer.
    """

    def __init__(self, rotary: RotaryEmbedding) -> None:
        self.inv_freq = rotary.inv_freq(torch.device("cpu"))  # [rotary_dim / 2]
        half = rotary.rotary_dim // 2
        self.sign = torch.cat((-torch.ones(half), torch.ones(half)))
        self.cos = self.signed_sin = torch.empty(0)

    def compute(self, positions: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin) of ``positions`` (as ``RotaryEmbedding.forward`` computes them), viewed as ``shape``."""
        angles = positions[:, None].float() * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1).view(shape)
        return angles.cos(), angles.sin().mul_(self.sign)

    def update(self, positions: torch.Tensor) -> None:
        """This step's tables [b, 1, 1, rotary_dim] for the decode positions [b]."""
        self.cos, self.signed_sin = self.compute(positions, (positions.shape[0], 1, 1, -1))
