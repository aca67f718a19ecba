"""Skinny GEMM / GEMV for decode: ``y[m, n] = x[m, k] @ W[n, k]^T (+ bias)`` for a handful of rows (m <= 16).

Why it exists: at decode a linear layer multiplies 1-16 token rows by a weight matrix, which is bound by reading the
weight once from HBM. cuBLAS picks kernels tuned for large GEMMs there: measured on an H200 (bf16, batch 1, in a CUDA
graph) the Mamba ``out_proj`` / attention ``linear_proj`` (k 2048, n 1024) ran at ~390 GB/s, a tenth of HBM
bandwidth, and ``linear_fc2`` (k 4096) added a separate split-K reduce kernel. This kernel streams W row-major (one
program per ``block_n`` rows of W, vectorised loads along k, fp32 accumulation) so every SM reads weights.

Two code paths in one kernel, chosen by the row count:

* one row (``m == 1``): a pure multiply-add of a ``[block_n, block_k]`` weight tile with the x chunk, accumulated
  elementwise and reduced along k once at the end (no per-iteration cross-thread reduction);
* 2..16 rows: ``tl.dot`` of x padded to 16 rows with the transposed weight tile (tensor cores; the padding costs
  nothing, the kernel is memory bound). float32 inputs use IEEE precision, not TF32, so fp32 stays fp32-exact.

Out-of-range weight rows / x rows are clamped to the last valid one instead of masked (loads stay unmasked and
vectorised; the duplicates are discarded at the store). Optional split-K (``split_k`` programs per n-block write
float32 partials, a tiny second kernel sums them) for layers with few output rows.

Tile choices are module globals so that ``benchmarks/gpu_decode.py --parts gemv`` can sweep them and install the
fastest per shape in ``SHAPE_CONFIGS``. Calls allocate only with ``torch.empty`` and never synchronise, so they are
captured by CUDA graphs. Importing this module never fails: without triton ``UNAVAILABLE_REASON`` says why and the
entry point raises ``KernelUnavailableError``. Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from megatron_hybrid.ops.mamba_ssm_loader import KernelUnavailableError

__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_CONFIG_MULTI",
    "MAX_ROWS",
    "SHAPE_CONFIGS",
    "CUBLAS_SHAPES",
    "UNAVAILABLE_REASON",
    "GemvConfig",
    "config_for",
    "gemv_or_none",
    "gemv_triton",
    "shape_key",
]

from megatron_hybrid.ops._triton_common import UNAVAILABLE_REASON, tl, triton

# Kernels are interpreted when TRITON_INTERPRET is set at definition time (this import). The interpreter multiplies
# bfloat16 tl.dot operands as raw bits (garbage results), so there the dot operands are upcast to float32 first.
_INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
MAX_ROWS = 16  # the dot path pads x to 16 rows (tl.dot's minimum): more rows are a real GEMM, cuBLAS's job
_DOT_ROWS = 16
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class GemvConfig:
    """Tiles of one launch: ``block_n`` weight rows and ``block_k`` columns per iteration, ``split_k`` programs
    along k per n-block (1 = no split, no second kernel), Triton ``num_warps`` / ``num_stages``."""

    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2


# Defaults, overwritten by the benchmark sweep. One row: the sweep's winner on every 800M decode shape on an H200
# (benchmarks/README.md: 4 rows of W x 512 columns per step, so n=1024 gives 256 programs, 2.9-6.3 us where cuBLAS
# took 4.7-12.6 us); several rows: tl.dot needs block_n >= 16.
DEFAULT_CONFIG = GemvConfig(block_n=4, block_k=512, split_k=1, num_warps=4)
DEFAULT_CONFIG_MULTI = GemvConfig(block_n=16, block_k=128, split_k=1, num_warps=4)
# (path, n, k) -> config, path "gemv" (one row) or "dot" (2..16 rows). Filled by the benchmark's sweep.
SHAPE_CONFIGS: dict[tuple[str, int, int], GemvConfig] = {}
# (path, n, k) where the sweep found cuBLAS faster: ``gemv_or_none`` declines them so callers keep F.linear.
CUBLAS_SHAPES: set[tuple[str, int, int]] = set()


def shape_key(m: int, n: int, k: int) -> tuple[str, int, int]:
    """The key of ``SHAPE_CONFIGS`` / ``CUBLAS_SHAPES``: which code path (one row or tl.dot) and the weight's shape."""
    return ("gemv" if m == 1 else "dot", n, k)


def config_for(m: int, n: int, k: int) -> GemvConfig:
    """The tile config a call with these sizes uses: the swept per-shape entry, else the path's default."""
    return SHAPE_CONFIGS.get(shape_key(m, n, k), DEFAULT_CONFIG if m == 1 else DEFAULT_CONFIG_MULTI)


if triton is not None:

    @triton.jit
    def _gemv_kernel(
        X, W, B, Y,
        M, N, K, stride_xm, stride_wn, k_per_split,
        M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
        IEEE: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_n = tl.minimum(offs_n, N - 1)  # clamped, not masked: unmasked row loads; duplicates dropped at store
        offs_k = tl.arange(0, BLOCK_K)
        k_start = pid_k * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        w_ptrs = W + rows_n[:, None].to(tl.int64) * stride_wn + (k_start + offs_k)[None, :]
        offs_m = tl.arange(0, M_PAD)
        rows_m = tl.minimum(offs_m, M - 1)
        if USE_DOT:
            x_ptrs = X + rows_m[:, None] * stride_xm + (k_start + offs_k)[None, :]
            acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
        else:
            x_ptrs = X + k_start + offs_k
            acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, k_per_split, BLOCK_K):
            if EVEN_K:
                w = tl.load(w_ptrs)
            else:
                k_ok = (k_start + k0 + offs_k) < k_end
                w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
            if USE_DOT:
                if EVEN_K:
                    xt = tl.load(x_ptrs)
                else:
                    xt = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
                if UPCAST:
                    xt = xt.to(tl.float32)
                    w = w.to(tl.float32)
                if IEEE:
                    acc = tl.dot(xt, tl.trans(w), acc, input_precision="ieee")
                else:
                    acc = tl.dot(xt, tl.trans(w), acc)
                x_ptrs += BLOCK_K
            else:
                if EVEN_K:
                    xv = tl.load(x_ptrs)
                else:
                    xv = tl.load(x_ptrs, mask=k_ok, other=0.0)
                acc2 += w.to(tl.float32) * xv.to(tl.float32)[None, :]
                x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if USE_DOT:
            out = acc  # [M_PAD, BLOCK_N]
        else:
            out = tl.sum(acc2, axis=1)[None, :]  # [1, BLOCK_N]
        store_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        y_offs = offs_m[:, None] * N + offs_n[None, :]
        if PARTIAL:
            tl.store(Y + pid_k * M * N + y_offs, out, mask=store_mask)
        else:
            if HAS_BIAS:
                out += tl.load(B + rows_n).to(tl.float32)[None, :]
            tl.store(Y + y_offs, out.to(Y.dtype.element_ty), mask=store_mask)

    @triton.jit
    def _split_k_reduce_kernel(P, B, Y, MN, N, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < MN
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            acc += tl.load(P + s * MN + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(B + offs % N, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} do not multiply as x @ weight.T")
    if x.dtype not in _DTYPES or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError("the Triton GEMV needs x, weight and bias of one dtype among float32, bfloat16, float16")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got shape {tuple(bias.shape)}")
    if weight.stride(1) != 1 or weight.stride(0) != weight.shape[1]:
        raise ValueError("the Triton GEMV needs a contiguous (row-major) weight")


def gemv_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, config: GemvConfig | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for x [..., k] with at most ``MAX_ROWS`` rows in all; fp32 accumulation, output
    in x's dtype. ``config`` overrides the tile choice of ``config_for`` (the benchmark's sweep). x's rows may be
    strided; its last dim is made contiguous if it is not."""
    if UNAVAILABLE_REASON is not None:
        raise KernelUnavailableError(f"the Triton GEMV is unavailable: {UNAVAILABLE_REASON}")
    _check(x, weight, bias)
    n, k = weight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"the Triton GEMV handles at most {MAX_ROWS} rows, got {m}")
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return y.view(*lead, n)
    if k == 0:
        return (y.zero_() if bias is None else y.copy_(bias.expand(m, n))).view(*lead, n)
    cfg = config or config_for(m, n, k)
    use_dot = m > 1
    block_n = max(cfg.block_n, 16) if use_dot else cfg.block_n  # tl.dot needs every dim >= 16
    block_k = max(cfg.block_k, 16)
    split_k = max(1, min(cfg.split_k, triton.cdiv(k, block_k)))
    # Each split covers a whole number of k-blocks; EVEN_K drops the k mask when every block is full.
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    even_k = k % block_k == 0 and k_per_split * split_k == k
    partial = split_k > 1
    target = torch.empty((split_k, m, n), device=x.device, dtype=torch.float32) if partial else y
    grid = (triton.cdiv(n, block_n), split_k)
    _gemv_kernel[grid](
        x2, weight, bias if bias is not None else weight, target,
        m, n, k, x2.stride(0), weight.stride(0), k_per_split,
        M_PAD=_DOT_ROWS if use_dot else 1, BLOCK_N=block_n, BLOCK_K=block_k, USE_DOT=use_dot,
        IEEE=x.dtype == torch.float32 or _INTERPRETED, UPCAST=_INTERPRETED, EVEN_K=even_k,
        HAS_BIAS=bias is not None, PARTIAL=partial,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if partial:
        block = 256
        _split_k_reduce_kernel[(triton.cdiv(m * n, block),)](
            target, bias if bias is not None else weight, y, m * n, n,
            SPLIT_K=split_k, BLOCK=block, HAS_BIAS=bias is not None, num_warps=4,
        )
    return y.view(*lead, n)


def gemv_or_none(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``gemv_triton``, or None for more than ``MAX_ROWS`` rows or a shape listed in ``CUBLAS_SHAPES`` (the caller
    then runs F.linear): the dispatch entry of ``ops.skinny_gemv``."""
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    if not 1 <= m <= MAX_ROWS or shape_key(m, weight.shape[0], k) in CUBLAS_SHAPES:
        return None
    return gemv_triton(x, weight, bias)
