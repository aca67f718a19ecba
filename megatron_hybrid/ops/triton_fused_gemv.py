"""One-row linear layers of a decode step with the norm before them and the activation after them in the same kernel.

Why it exists: a batch-1 decode step of the 800M model on an H200 is ~200 short kernels, and each kernel's ramp-up
(launch, the first weight bytes arriving from HBM) costs about as much as its useful work. Every layer starts with a
norm feeding one projection, so here the projection does the norm itself, and the MLP's squared ReLU rides on
``fc1``:

* prologue ``"add_norm"``: ``new_residual = residual + update`` and ``x = rmsnorm(new_residual) * norm_weight``
  (the residual add of the previous layer and this layer's pre-norm, ``ops.triton_add_norm``'s arithmetic);
* prologue ``"gated_norm"``: ``x = rmsnorm_groupwise(y * silu(z)) * norm_weight`` (the Mamba mixer's gated norm,
  ``norm_before_gate=False``, before ``out_proj``);
* prologue ``"none"``: ``x`` read as is;
* epilogue ``activation="squared_relu"``: ``relu(x W^T + b)^2``; ``"gelu"``: the exact (erf) GeLU of ``F.gelu``.

Each program owns ``block_n`` rows of W and reads the whole input row (at most ``MAX_K`` features: the weight tile
``[block_n, k]`` is loaded at once, which keeps many loads in flight), so every program recomputes the prologue from
the same few KB (L2 hits) instead of waiting for a separate norm kernel; program 0 alone stores the new residual. The
weight tile is requested before the kernel waits for the previous one (programmatic dependent launch, see
``_triton_common``), so it streams while the previous kernel finishes.

Rounding follows the unfused path exactly (``round_to_storage`` at each place the unfused ops store a tensor): the
residual sum in the residual's dtype, the normalised input, the linear output, and the squared ReLU each rounded once
to the activation dtype. Only the order of float32 sums differs (the GEMV's, the norm's), as between any two kernels.

Tile choices (``block_n``, warps) are module state so that ``benchmarks/gpu_decode.py`` can sweep them per shape.
Importing this module never fails: without triton ``UNAVAILABLE_REASON`` says why and the entry point raises
``KernelUnavailableError``. Under ``TRITON_INTERPRET=1`` the kernel runs on CPU tensors (the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_hybrid.ops.mamba_ssm_loader import KernelUnavailableError

__all__ = ["ACTIVATIONS", "MAX_K", "PROLOGUES", "UNAVAILABLE_REASON", "FusedGemvConfig", "fused_gemv_triton"]

from megatron_hybrid.ops._triton_common import ROUND_KIND as _ROUND_KIND
from megatron_hybrid.ops._triton_common import UNAVAILABLE_REASON, launch_options, pdl_mode, tl, triton

MAX_K = 4096  # input features per row: the whole row is one tile (K_PAD * block_n weights in registers)
PROLOGUES = {"none": 0, "add_norm": 1, "gated_norm": 2}
ACTIVATIONS = {None: 0, "squared_relu": 1, "gelu": 2}
MAX_NORM_GROUPS = 16  # the gated norm's per-group sums are unrolled over the groups


@dataclass(frozen=True)
class FusedGemvConfig:
    """``block_n`` rows of W per program and the program's warps."""

    block_n: int = 8
    num_warps: int = 4


DEFAULT_CONFIG = FusedGemvConfig()
# (n, k) -> config, filled by the benchmark's sweep (benchmarks/gpu_decode.py --parts fused_gemv).
SHAPE_CONFIGS: dict[tuple[int, int], FusedGemvConfig] = {}


def config_for(n: int, k: int) -> FusedGemvConfig:
    """The swept config of this weight shape, else the default (wide rows get more warps: fewer registers each)."""
    found = SHAPE_CONFIGS.get((n, k))
    if found is not None:
        return found
    return FusedGemvConfig(DEFAULT_CONFIG.block_n, 8 if k > 2048 else DEFAULT_CONFIG.num_warps)


if triton is not None:
    from megatron_hybrid.ops._triton_common import let_next_kernel_launch_early, wait_for_previous_kernel
    from megatron_hybrid.ops._triton_common import round_to_storage as _round

    @triton.jit
    def _fused_gemv_kernel(
        X, RES, NORM_W, Z, W, BIAS, Y, RES_OUT,
        N, eps,
        K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, PROLOGUE: tl.constexpr,
        HAS_UPDATE: tl.constexpr, GROUP: tl.constexpr, NUM_GROUPS: tl.constexpr, HAS_BIAS: tl.constexpr,
        ACT: tl.constexpr, RES_ROUND: tl.constexpr, ROUND: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        let_next_kernel_launch_early(USE_PDL)
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.minimum(offs_n, N - 1)  # clamped, not masked: unmasked row loads; duplicates dropped at the store
        offs_k = tl.arange(0, K_PAD)
        mask_k = offs_k < K
        w_ptrs = W + rows[:, None].to(tl.int64) * K + offs_k[None, :]
        # Parameters first: no kernel of the step writes them, so they may load before the previous kernel is done.
        if K == K_PAD:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=mask_k[None, :], other=0.0)
        if HAS_BIAS:
            bias = tl.load(BIAS + rows).to(tl.float32)
        if PROLOGUE != 0:
            norm_w = tl.load(NORM_W + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        wait_for_previous_kernel(USE_PDL)

        if PROLOGUE == 1:  # residual add + RMSNorm over the whole row
            stream = tl.load(RES + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            if HAS_UPDATE:
                stream = _round(stream + tl.load(X + offs_k, mask=mask_k, other=0.0).to(tl.float32), RES_ROUND)
                if pid == 0:
                    tl.store(RES_OUT + offs_k, stream.to(RES_OUT.dtype.element_ty), mask=mask_k)
            h = _round(stream, ROUND)  # the norm reads the stream in the working precision
            rstd = 1 / tl.sqrt(tl.sum(h * h, axis=0) / K + eps)
            x = _round(h * rstd * norm_w, ROUND)
        elif PROLOGUE == 2:  # group-wise RMSNorm of y * silu(z)
            y_in = tl.load(X + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            z = tl.load(Z + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            gated = y_in * (z * tl.sigmoid(z))
            group_of = offs_k // GROUP
            rstd = tl.zeros((K_PAD,), dtype=tl.float32)
            for g in tl.static_range(NUM_GROUPS):
                in_group = group_of == g
                sum_sq = tl.sum(tl.where(in_group, gated * gated, 0.0), axis=0)
                rstd = tl.where(in_group, tl.rsqrt(sum_sq / GROUP + eps), rstd)
            x = _round(gated * rstd * norm_w, ROUND)
        else:
            x = tl.load(X + offs_k, mask=mask_k, other=0.0).to(tl.float32)

        acc = tl.sum(w.to(tl.float32) * x[None, :], axis=1)  # [BLOCK_N]
        if HAS_BIAS:
            acc += bias
        acc = _round(acc, ROUND)  # the linear's output, as F.linear stores it
        if ACT == 1:
            acc = tl.maximum(acc, 0.0)
            acc = _round(acc * acc, ROUND)
        elif ACT == 2:  # exact (erf) GeLU, F.gelu's default
            acc = _round(0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476)), ROUND)
        tl.store(Y + offs_n, acc.to(Y.dtype.element_ty), mask=offs_n < N)


def _row(t: torch.Tensor, width: int, name: str) -> torch.Tensor:
    if t.numel() != width:
        raise ValueError(f"{name} must hold one row of {width} features, got shape {tuple(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous along its last dim")
    return t


def fused_gemv_triton(
    x: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    prologue: str = "none",
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    eps: float = 1e-5,
    group_size: int | None = None,
    residual_dtype: torch.dtype | None = None,
    activation: str | None = None,
    config: FusedGemvConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(activation(prologue(x) @ weight.T + bias), new_residual)`` for ONE row, as the module docstring says.

    * ``"none"``: ``x`` [..., k] is the input row.
    * ``"add_norm"``: ``x`` is the previous layer's update (or None for the first layer: the stream is normalised as
      it is) and ``residual`` the stream; ``new_residual = residual + x`` in ``residual_dtype`` (default
      ``residual.dtype``) is returned (``residual`` itself when ``x`` is None). ``norm_weight`` [k], ``eps``.
    * ``"gated_norm"``: ``x`` is the SSM output ``y`` and ``z`` the gate (both one row of k; z may be a view into a
      wider row), normalised over groups of ``group_size``.

    Output [1, n] in the working dtype (``x``'s, or ``residual``'s when ``x`` is None). The weight must be contiguous
    [n, k] of that dtype, k <= ``MAX_K``. Allocates only with ``torch.empty`` and never synchronises (CUDA graphs).
    """
    if UNAVAILABLE_REASON is not None:
        raise KernelUnavailableError(f"the Triton fused GEMV is unavailable: {UNAVAILABLE_REASON}")
    if prologue not in PROLOGUES:
        raise ValueError(f"prologue must be one of {sorted(PROLOGUES)}, got {prologue!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    if weight.dim() != 2 or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous [n, k] matrix, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if not 1 <= k <= MAX_K:
        raise ValueError(f"the fused GEMV reads rows of 1..{MAX_K} features, got {k}")
    source = x if x is not None else residual
    if source is None:
        raise ValueError("x is required (or residual, for the add_norm prologue of the first layer)")
    dtype = source.dtype
    for name, tensor in (("weight", weight), ("bias", bias), ("norm_weight", norm_weight), ("z", z)):
        if tensor is not None and tensor.dtype not in _ROUND_KIND:
            raise ValueError(f"{name}: the fused GEMV supports float32, bfloat16 and float16, got {tensor.dtype}")
    if weight.dtype != dtype or (bias is not None and bias.dtype != dtype):
        raise ValueError(f"weight and bias must have the activation dtype {dtype}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [{n}], got shape {tuple(bias.shape)}")
    num_groups = group = 1
    new_residual = None
    if prologue == "add_norm":
        if residual is None or norm_weight is None:
            raise ValueError("the add_norm prologue needs residual and norm_weight")
        residual = _row(residual, k, "residual")
        residual_dtype = residual_dtype or residual.dtype
        if residual_dtype not in _ROUND_KIND:
            raise ValueError(f"residual_dtype must be float32, bfloat16 or float16, got {residual_dtype}")
        if x is not None:
            x = _row(x, k, "x")
            new_residual = torch.empty(residual.shape, device=residual.device, dtype=residual_dtype)
        else:
            new_residual = residual
    elif prologue == "gated_norm":
        if x is None or z is None or norm_weight is None or not group_size:
            raise ValueError("the gated_norm prologue needs x (y), z, norm_weight and group_size")
        if k % group_size or k // group_size > MAX_NORM_GROUPS:
            raise ValueError(f"group_size {group_size} must divide k {k} into at most {MAX_NORM_GROUPS} groups")
        x, z = _row(x, k, "x"), _row(z, k, "z")
        group, num_groups = group_size, k // group_size
    else:
        if x is None:
            raise ValueError("the 'none' prologue needs x")
        x = _row(x, k, "x")
    if norm_weight is not None and norm_weight.shape != (k,):
        raise ValueError(f"norm_weight must be [{k}], got shape {tuple(norm_weight.shape)}")
    out = torch.empty((1, n), device=weight.device, dtype=dtype)
    cfg = config or config_for(n, k)
    use_pdl = pdl_mode(weight.device)
    dummy = weight  # never read: the flags compile the loads out
    _fused_gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        x if x is not None else dummy, residual if residual is not None else dummy,
        norm_weight if norm_weight is not None else dummy, z if z is not None else dummy, weight,
        bias if bias is not None else dummy, out, new_residual if new_residual is not None else dummy,
        n, float(eps),
        K=k, K_PAD=triton.next_power_of_2(k), BLOCK_N=cfg.block_n, PROLOGUE=PROLOGUES[prologue],
        HAS_UPDATE=prologue == "add_norm" and x is not None, GROUP=group, NUM_GROUPS=num_groups,
        HAS_BIAS=bias is not None, ACT=ACTIVATIONS[activation],
        RES_ROUND=_ROUND_KIND[residual_dtype] if prologue == "add_norm" else 0, ROUND=_ROUND_KIND[dtype],
        USE_PDL=use_pdl,
        num_warps=cfg.num_warps, **launch_options(use_pdl),
    )
    return out, new_residual
