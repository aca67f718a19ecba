"""Residual add fused into the next RMSNorm, in one Triton kernel (the decode step's pre-norm residual carry).

Why it exists: a decode step at batch 1 is bound by kernel launches. A pre-norm layer ends with ``hidden + update``
(one elementwise kernel) and the next layer starts with ``rms_norm(hidden)`` (another); here both are one launch,
which removes one kernel per layer from a replayed decode step (48 of the 800M model's ~336).

``add_rms_norm_triton(x, residual, weight, eps, residual_dtype)`` returns ``(y, new_residual)`` with

* ``new_residual = residual + x`` computed in float32 and rounded once to ``residual_dtype`` (ties to even): exactly
  torch's ``residual + x`` for two bfloat16 tensors (opmath float32, one rounding), and ``residual.float() +
  x.float()`` for a float32 residual stream (``residual_in_fp32``);
* ``y = rmsnorm(new_residual rounded to x's dtype) * weight`` in float32, rounded once to x's dtype: the norm reads
  the working-precision copy of the stream, as ``_PreNormResidual._inner_input`` does. (mamba_ssm's ``layer_norm_fn``
  with ``residual=`` normalises the unrounded float32 sum instead, which is why this kernel exists rather than that
  one: the fused decode path then rounds exactly where the unfused one does.)

The normalisation repeats mamba_ssm's ``layernorm_gated`` single-group kernel (the one ``ops.rms_norm`` runs on CUDA):
``rstd = 1 / sqrt(mean(h^2) + eps)``, ``y = (h * rstd) * w``, with the same block size and warp count, so outputs
are expected to match the unfused path bit for bit (Triton's reduction order is not a documented guarantee).

Importing this module never fails: without triton ``UNAVAILABLE_REASON`` says why and the entry point raises
``KernelUnavailableError``. Under ``TRITON_INTERPRET=1`` the kernel runs on CPU tensors (the tests).
"""

from __future__ import annotations

import torch

from megatron_hybrid.ops.mamba_ssm_loader import KernelUnavailableError

__all__ = ["UNAVAILABLE_REASON", "add_rms_norm_triton"]

from megatron_hybrid.ops._triton_common import ROUND_KIND as _ROUND_KIND
from megatron_hybrid.ops._triton_common import UNAVAILABLE_REASON, launch_options, pdl_mode, tl, triton

MAX_FUSED_BYTES = 65536  # one row per program, held in registers: the limit layernorm_gated uses too

if triton is not None:
    from megatron_hybrid.ops._triton_common import let_next_kernel_launch_early, wait_for_previous_kernel
    from megatron_hybrid.ops._triton_common import round_to_storage as _round


    @triton.jit
    def _add_rms_norm_kernel(
        X, RES, W, Y, RES_OUT,
        eps,
        N: tl.constexpr, BLOCK_N: tl.constexpr, RES_ROUND: tl.constexpr, X_ROUND: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        let_next_kernel_launch_early(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)  # a parameter: loaded before the wait
        wait_for_previous_kernel(USE_PDL)
        x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(RES + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        s = _round(x + r, RES_ROUND)  # the residual stream, rounded as torch's add rounds it
        tl.store(RES_OUT + row * N + cols, s.to(RES_OUT.dtype.element_ty), mask=mask)
        h = _round(s, X_ROUND)  # what the norm reads: the stream in the working precision
        var = tl.sum(h * h, axis=0) / N
        rstd = 1 / tl.sqrt(var + eps)
        y = h * rstd * w
        tl.store(Y + row * N + cols, _round(y, X_ROUND).to(Y.dtype.element_ty), mask=mask)




def add_rms_norm_triton(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rmsnorm(residual + x) * weight, residual + x)`` over the last dim, rounded as the module docstring says.

    ``x`` (a layer's update) and ``residual`` have one shape [..., N]; ``weight`` [N]. ``residual_dtype`` (default
    ``residual.dtype``) is the new residual's dtype; ``y`` has x's dtype. New tensors are returned (nothing in place),
    so a CUDA graph captures the call like any allocation.
    """
    if UNAVAILABLE_REASON is not None:
        raise KernelUnavailableError(f"the Triton add + RMSNorm is unavailable: {UNAVAILABLE_REASON}")
    if x.shape != residual.shape:
        raise ValueError(f"x {tuple(x.shape)} and residual {tuple(residual.shape)} must have one shape")
    width = x.shape[-1]
    if weight.shape != (width,):
        raise ValueError(f"weight must be [{width}], got shape {tuple(weight.shape)}")
    residual_dtype = residual_dtype or residual.dtype
    for tensor_dtype in (x.dtype, residual.dtype, residual_dtype, weight.dtype):
        if tensor_dtype not in _ROUND_KIND:
            raise ValueError(f"the Triton add + RMSNorm supports float32, bfloat16 and float16, got {tensor_dtype}")
    block = triton.next_power_of_2(width)
    if block * 4 > MAX_FUSED_BYTES:  # float32 row in registers
        raise ValueError(f"rows of {width} features are too wide for the one-program-per-row kernel")
    x2 = x.reshape(-1, width).contiguous()
    r2 = residual.reshape(-1, width).contiguous()
    y = torch.empty(x2.shape, device=x.device, dtype=x.dtype)
    new_residual = torch.empty(x2.shape, device=x.device, dtype=residual_dtype)
    rows = x2.shape[0]
    use_pdl = pdl_mode(x.device)
    if rows:
        _add_rms_norm_kernel[(rows,)](
            x2, r2, weight, y, new_residual,
            float(eps),
            N=width, BLOCK_N=block, RES_ROUND=_ROUND_KIND[residual_dtype], X_ROUND=_ROUND_KIND[x.dtype],
            USE_PDL=use_pdl, num_warps=min(max(block // 256, 1), 8),  # layernorm_gated's choice (same layout)
            **launch_options(use_pdl),
        )
    return y.view(x.shape), new_residual.view(x.shape)
