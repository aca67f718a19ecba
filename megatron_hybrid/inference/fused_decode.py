"""A batch-1 CUDA decode step with each layer's norm inside its first linear: 3 kernels per Mamba layer, 2 per MLP.

Why it exists: a replayed decode step of the 800M model at batch 1 is bound by the number of kernels, not by bytes
(``benchmarks/README.md``, "GPU: decode and prefill"): through the layer modules a Mamba layer is 5 kernels (add +
norm, in_proj, SSM step, gated norm, out_proj), an MLP layer 5 (add + norm, fc1, relu, square, fc2). Here the steps
are the same computation with the fusions the module boundaries do not allow:

* the previous layer's residual add and this layer's RMSNorm run in the prologue of this layer's first linear
  (``in_proj``, ``linear_qkv``, ``linear_fc1``), and the MLP's squared ReLU or GeLU in ``fc1``'s epilogue
  (``ops.fused_gemv``);
* the Mamba mixer's step is one kernel (``ops.mamba_decode_fused(normalize=False)``: conv and SSM updates) and its
  gated group norm runs in ``out_proj``'s prologue;
* attention is the layer's own one-kernel decode (``SelfAttention._fused_decode_attention``, RoPE included).

Our kernels launch with programmatic dependent launch where the GPU has it (``ops._triton_common``): each one loads
its weights while the previous kernel finishes. Rounding is that of the layer path (each fused kernel rounds where
the separate ops store), so only float32 summation order differs; ``tests/inference`` checks this step against the
layer path (Triton's interpreter on CPU, and on a GPU).

Scope (``FusedDecoder.unsupported_reason``): a CUDA model at tensor-parallel size 1 in eval mode, the stock layer
classes, every linear's input at most ``triton_fused_gemv.MAX_K`` features, one row per step (``MAX_BATCH``);
``ModelRunner`` uses it for the batch-1 CUDA graph and eager batch-1 steps, and the layer path otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_hybrid.inference.context import InferenceContext
from megatron_hybrid.inference.lean_decode import stock_layers_reason
from megatron_hybrid.layers import attention as attention_module
from megatron_hybrid.layers.hybrid_layers import AttentionLayer, MambaLayer, MLPLayer
from megatron_hybrid.layers.mlp import squared_relu
from megatron_hybrid.ops import fused_gemv, mamba_decode_fused
from megatron_hybrid.ops.backend import load_own_triton
from megatron_hybrid.ops.mamba_ssm_loader import KernelUnavailableError
from megatron_hybrid.parallel.tensor_parallel import RowParallelLinear

__all__ = ["MAX_BATCH", "FusedDecoder"]

MAX_BATCH = 1  # the fused GEMV's prologue normalises one row; more rows are the layer path's batched GEMMs
DEVICE_TYPES = ("cuda",)  # a module global so that CPU tests can run the kernels in Triton's interpreter
_KERNELS = (
    ("megatron_hybrid.ops.triton_fused_gemv", "fused_gemv_triton", "the Triton fused GEMV"),
    ("megatron_hybrid.ops.triton_decode", "mamba_decode_step_triton", "the fused Triton Mamba decode"),
    ("megatron_hybrid.ops.triton_attention", "decode_attention_triton", "the Triton decode attention"),
)


_FUSED_ACTIVATIONS = {squared_relu: "squared_relu", F.gelu: "gelu"}  # MLP activations done in fc1's epilogue


class FusedDecoder:
    """``decoder(token_ids [1]) -> logits [1, 1, vocab]``: one decode step of the context's slot 0 (its position in
    ``context.positions[0]``), the same computation as ``model(ids[:, None], inference_context=context)`` in decode
    mode, with the caches advanced in place."""

    def __init__(self, model: torch.nn.Module, context: InferenceContext) -> None:
        reason = self.unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"FusedDecoder cannot run this model: {reason}")
        self.model = model
        self.context = context
        self.vocab_size = model.config.vocab_size

    @staticmethod
    def unsupported_reason(model: torch.nn.Module) -> str | None:
        """None when this step reproduces ``model``'s decode (with any cache of an ``InferenceContext``), else why
        not."""
        from megatron_hybrid.ops.triton_fused_gemv import MAX_K, MAX_NORM_GROUPS

        if getattr(model, "groups", None) is None or model.groups.tp_size != 1:
            return "tensor parallelism (the layer path carries the collectives)"
        parameters = list(model.parameters())
        if not parameters or parameters[0].device.type not in DEVICE_TYPES:
            return f"parameters on {parameters[0].device if parameters else 'no device'}, not CUDA"
        if model.training:
            return "training mode (dropout)"
        reason = stock_layers_reason(model)
        if reason is not None:
            return reason
        if any(p.dim() == 2 and not p.is_contiguous() for p in parameters):
            return "a non-contiguous weight"
        if parameters[0].device.type not in attention_module.FUSED_DECODE_DEVICE_TYPES:
            return "the fused decode attention is off for this device type"
        for layer in model.decoder.layers.values():
            if isinstance(layer, MambaLayer):
                mixer = layer.mixer
                widths = (mixer.in_proj.in_features, mixer.d_inner_local)
                if mixer.d_inner_local // mixer.norm.group_size > MAX_NORM_GROUPS:
                    return f"more than {MAX_NORM_GROUPS} gated-norm groups"
            elif isinstance(layer, AttentionLayer):
                attention = layer.self_attention
                widths = (attention.linear_qkv.in_features, attention.linear_proj.in_features)
            else:
                widths = (layer.mlp.linear_fc1.in_features, layer.mlp.linear_fc2.in_features)
            if max(widths) > MAX_K:
                return f"a linear layer reads {max(widths)} features, more than the fused GEMV's {MAX_K}"
        for module_name, entry, what in _KERNELS:
            try:
                load_own_triton(module_name, entry, what)
            except KernelUnavailableError as exc:
                return str(exc)
        return None

    @torch.inference_mode()
    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        if token_ids.numel() > MAX_BATCH:
            raise ValueError(f"FusedDecoder steps {MAX_BATCH} row, got {token_ids.numel()}")
        model, context = self.model, self.context
        residual = F.embedding(token_ids.view(1), model.embedding.word_embeddings.weight)  # [1, hidden] at TP=1
        update = None
        residual_in_fp32 = False  # the dtype the previous layer's add rounds the stream to
        for name, layer in model.decoder.layers.items():
            norm = layer.pre_norm
            linear, activation = self._first_linear(layer)
            first, residual = self._linear(
                update, linear, activation=activation, prologue="add_norm", residual=residual,
                norm_weight=norm.weight, eps=norm.eps, residual_dtype=torch.float32 if residual_in_fp32 else None,
            )
            if isinstance(layer, MambaLayer):
                update = self._mamba(layer.mixer, first, int(name))
            elif isinstance(layer, AttentionLayer):
                attention = layer.self_attention
                context_rows = attention._fused_decode_attention(first.view(1, 1, -1), None, context)
                if context_rows is None:
                    raise KernelUnavailableError("the Triton decode attention is unavailable for this step")
                update = self._linear(context_rows, attention.linear_proj)[0]
            else:
                mlp = layer.mlp
                if mlp.activation not in _FUSED_ACTIVATIONS:
                    first = mlp.activation(first)
                update = self._linear(first, mlp.linear_fc2)[0]
            residual_in_fp32 = layer.residual_in_fp32
        final_norm = model.decoder.final_norm
        normed, _ = final_norm.add_and_norm(update.to(final_norm.weight.dtype), residual, residual_in_fp32)
        logits = F.linear(normed, model.output_weight)[..., : self.vocab_size]
        return logits.view(1, 1, -1)

    # ------------------------------------------------------------------------------------------------ pieces

    @staticmethod
    def _first_linear(layer) -> tuple[torch.nn.Module, str | None]:
        """The layer's first linear (its norm runs in this one's prologue) and the activation fused after it."""
        if isinstance(layer, MambaLayer):
            return layer.mixer.in_proj, None
        if isinstance(layer, AttentionLayer):
            return layer.self_attention.linear_qkv, None
        assert isinstance(layer, MLPLayer)
        return layer.mlp.linear_fc1, _FUSED_ACTIVATIONS.get(layer.mlp.activation)

    @staticmethod
    def _linear(
        x: torch.Tensor | None, linear: torch.nn.Module, activation: str | None = None, **fusions
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``linear`` (a column- or row-parallel layer at TP=1) of the row ``x`` through the fused GEMV. A row-parallel
        bias is added after the GEMV's rounding, as the layer adds it after its reduction."""
        row_bias = isinstance(linear, RowParallelLinear)
        bias = None if row_bias else linear.bias
        out = fused_gemv(x, linear.weight, bias, activation=activation, **fusions)
        if out is None:
            raise KernelUnavailableError("the Triton fused GEMV is unavailable for this step")
        y, residual = out
        if row_bias and linear.bias is not None:
            y = y + linear.bias
        return y, residual

    def _mamba(self, mixer, zxbcdt: torch.Tensor, index: int) -> torch.Tensor:
        conv_state, ssm_state = self.context.mamba_states(index)
        y = mamba_decode_fused(
            zxbcdt, conv_state, mixer.conv1d.weight, mixer.conv1d.bias, ssm_state, mixer.A_log, mixer.dt_bias,
            mixer.D, None, norm_group_size=mixer.norm.group_size, eps=mixer.norm.eps,
            dt_limit=mixer.config.mamba_dt_limit, normalize=False,
        )
        if y is None:
            raise KernelUnavailableError("the fused Triton Mamba decode is unavailable for this step")
        norm = mixer.norm
        return self._linear(
            y, mixer.out_proj, prologue="gated_norm", z=zxbcdt[:, : mixer.d_inner_local], norm_weight=norm.weight,
            group_size=norm.group_size, eps=norm.eps,
        )[0]
