"""Kernel selection and the dispatching ops that the rest of megatron_hybrid calls.

Every op takes ``backend="auto" | "torch" | "triton"``:

* ``"torch"``: the pure-PyTorch reference (any device; the numerical ground truth, used in CPU tests/benchmarks).
* ``"triton"``: the GPU fast path; raises ``KernelUnavailableError`` with the reason when the tensors are not on CUDA
  or the kernels cannot be loaded. For the scan that is our own Triton scan (``ops.triton_ssd``: forward and
  backward, documents) where it covers the arguments, mamba_ssm's kernels otherwise or with
  ``MEGATRON_HYBRID_SSD_KERNEL=mamba_ssm``; for the state update and the norms mamba_ssm's Triton kernels.
  For the convolutions it is causal_conv1d's CUDA kernel when importable and applicable, otherwise our own Triton
  kernel (``ops.triton_conv1d``: channel-last, fused SiLU, documents, fwd + bwd), otherwise PyTorch's own (cuDNN)
  convolution on the GPU; the convs never raise for a missing package (a Triton load failure on CUDA warns once).
* ``"auto"`` (default): ``"triton"`` for CUDA tensors whose kernels load, else ``"torch"``. On CUDA tensors a fallback
  to the slow reference is announced once per process with a ``KernelFallbackWarning`` that carries the import error.
  The environment variable ``MEGATRON_HYBRID_KERNELS`` (auto/torch/triton), read at every call, replaces ``"auto"``.

``mamba_decode_fused`` (a Mamba mixer's whole decode step between its projections, ``ops.triton_decode``) follows the
same rules but answers None instead of running a reference: its reference is the composition of the other ops. So do
``mamba_span`` (the training span between a mixer's projections) and ``cross_entropy`` (the training loss on CUDA,
vocab-parallel too; ``parallel.cross_entropy`` holds its torch paths).

All dispatch targets implement the same semantics (those of mamba_ssm / causal_conv1d, documented in the reference
modules), including ``seq_idx``: it is converted to monotone segment ids (``_common.segment_ids``) before reaching a
GPU kernel, so both paths reset state exactly where the document id changes.
"""

from __future__ import annotations

import importlib
import math
import os
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from megatron_hybrid.ops._common import process_dt, segment_ids
from megatron_hybrid.ops.conv1d import causal_conv1d_ref
from megatron_hybrid.ops.mamba_ssm_loader import (
    KernelUnavailableError,
    MambaSsmKernels,
    load_causal_conv1d_kernels,
    load_mamba_ssm_kernels,
    load_own_triton,
    load_triton_conv1d,
)
from megatron_hybrid.ops.norm import add_rms_norm_ref, gated_rms_norm_ref, rms_norm_ref
from megatron_hybrid.ops.ssd import check_ssd_shapes, ssd_chunk_scan_ref
from megatron_hybrid.ops.state_update import causal_conv1d_update_ref, ssm_state_update_ref

ENV_VAR = "MEGATRON_HYBRID_KERNELS"
# Which GPU kernels run the training scan: ours (``ops.triton_ssd``, the default) or mamba_ssm's.
SSD_KERNEL_ENV_VAR = "MEGATRON_HYBRID_SSD_KERNEL"
SSD_KERNELS = ("own", "mamba_ssm")
_TRITON_SSD = ("megatron_hybrid.ops.triton_ssd", "ssd_chunk_scan_triton", "the Triton SSD scan (ops.triton_ssd)")
BACKENDS = ("auto", "torch", "triton")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAMBA_OPS = "ssd_chunk_scan, ssm_state_update, rms_norm and gated_rms_norm"


class KernelFallbackWarning(RuntimeWarning):
    """CUDA tensors are being processed by the slow pure-PyTorch reference instead of a GPU kernel."""


_warned: set[str] = set()


def _resolve(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env:
            if env not in BACKENDS:
                raise ValueError(f"environment variable {ENV_VAR}={env!r} must be one of {BACKENDS}")
            return env
    return backend


def _warn_once(key: str, message: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, KernelFallbackWarning, stacklevel=4)


def _cuda_kernel_mode(op: str, backend: str, tensor: torch.Tensor) -> str | None:
    """The resolved backend ("auto" or "triton") when a GPU kernel may run for ``op`` on ``tensor``; None for the
    torch path ("torch", or "auto" on a non-CUDA tensor); raises when "triton" is forced on a non-CUDA tensor."""
    mode = _resolve(backend)
    if mode == "torch":
        return None
    if tensor.device.type != "cuda":
        if mode == "triton":
            raise KernelUnavailableError(
                f"{op}: backend 'triton' needs CUDA tensors, got device {tensor.device}; use backend='torch' or 'auto'"
            )
        return None
    return mode


def _mamba_kernels(op: str, backend: str, tensor: torch.Tensor) -> MambaSsmKernels | None:
    """The Triton kernels to use for ``op`` on ``tensor``, or None for the torch reference (raising if forced)."""
    mode = _cuda_kernel_mode(op, backend, tensor)
    if mode is None:
        return None
    if tensor.dtype not in _KERNEL_DTYPES:
        reason = f"dtype {tensor.dtype} is not supported by the Triton kernels (float16/bfloat16/float32 only)"
        if mode == "triton":
            raise KernelUnavailableError(f"{op}: backend 'triton' requested but {reason}")
        _warn_once(f"dtype:{tensor.dtype}", f"megatron_hybrid.ops.{op}: running the SLOW pure-PyTorch reference on "
                   f"CUDA because {reason}.")
        return None
    try:
        return load_mamba_ssm_kernels()
    except KernelUnavailableError as exc:
        if mode == "triton":
            raise KernelUnavailableError(f"{op}: backend 'triton' requested but {exc}") from exc
        _warn_once(
            "mamba_ssm",
            f"megatron_hybrid.ops: CUDA tensors, but mamba_ssm's Triton kernels could not be loaded, so {_MAMBA_OPS} "
            f"run the SLOW pure-PyTorch reference (first hit by {op}). Reason: {exc}. Make mamba_ssm importable "
            f"(a wheel without CUDA extensions is enough) or set {ENV_VAR}=torch to choose the reference explicitly.",
        )
        return None


def _conv_kernels_wanted(op: str, backend: str, tensor: torch.Tensor) -> bool:
    """Whether to try causal_conv1d's CUDA kernel; the torch conv is the GPU fallback, so no warning is needed."""
    mode = _cuda_kernel_mode(op, backend, tensor)
    if mode is None:
        return False
    return tensor.dtype in _KERNEL_DTYPES


def _own_kernel_quietly(spec: tuple[str, str, str]) -> tuple[Callable, ModuleType] | None:
    """Our Triton entry point ``spec`` (module, entry, what) and its module, or None when it cannot be loaded. No
    warning: the callers fall back to mamba_ssm's kernels, which warn themselves if they are missing too."""
    try:
        kernel = load_own_triton(*spec)
    except KernelUnavailableError:
        return None
    return kernel, importlib.import_module(spec[0])


def _ssd_kernel_choice() -> str:
    choice = os.environ.get(SSD_KERNEL_ENV_VAR, "").strip().lower() or "own"
    if choice not in SSD_KERNELS:
        raise ValueError(f"environment variable {SSD_KERNEL_ENV_VAR}={choice!r} must be one of {SSD_KERNELS}")
    return choice


def _own_ssd_kernel(
    backend: str, x: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int, D: torch.Tensor | None
) -> Callable | None:
    """Our Triton scan (``ops.triton_ssd``) for these arguments, or None for mamba_ssm's kernels / the reference:
    on CUDA unless ``MEGATRON_HYBRID_SSD_KERNEL=mamba_ssm``, the arguments are outside what it covers, or triton is
    missing (then mamba_ssm's kernels are next in line, so no warning here)."""
    if _cuda_kernel_mode("ssd_chunk_scan", backend, x) is None:
        return None
    if _ssd_kernel_choice() == "mamba_ssm" or x.dim() != 4 or B.dim() != 4:
        return None
    found = _own_kernel_quietly(_TRITON_SSD)
    if found is None:
        return None
    kernel, triton_ssd = found
    return kernel if triton_ssd.unsupported_reason(x, B, C, chunk_size, D) is None else None


_TRITON_SPAN = ("megatron_hybrid.ops.triton_mamba_span", "mamba_span_triton",
                "the fused Triton Mamba span (ops.triton_mamba_span)")


def mamba_span(
    zxbcdt: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    A: torch.Tensor,
    D: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    norm_weight: torch.Tensor,
    *,
    nheads: int,
    headdim: int,
    ngroups: int,
    d_state: int,
    chunk_size: int,
    norm_group_size: int,
    norm_eps: float,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    seq_idx: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor | None:
    """A Mamba-2 mixer's training span between its projections as one fused node, or None where it does not apply.

    ``zxbcdt`` [b, l, d_inner + conv width + nheads] is ``in_proj``'s output ``[z, x, B, C, dt]``; returns
    ``gated_rms_norm(ssd_chunk_scan(silu(conv(xBC)), softplus(dt + dt_bias) clamped), z)`` [b, l, d_inner] through
    ``ops.triton_mamba_span`` (see there: the gradients land in one in_proj-output-shaped buffer, no concatenations).
    None (the caller composes ``causal_conv1d_channel_last``, ``ssd_chunk_scan`` and ``gated_rms_norm``) off CUDA,
    with backend / ``MEGATRON_HYBRID_KERNELS`` "torch", with ``MEGATRON_HYBRID_SSD_KERNEL=mamba_ssm``, without
    triton, or for shapes our kernels do not cover; all of those are handled by the composed ops.
    """
    if _cuda_kernel_mode("mamba_span", backend, zxbcdt) is None or _ssd_kernel_choice() != "own":
        return None
    found = _own_kernel_quietly(_TRITON_SPAN)
    if found is None:
        return None
    kernel, triton_mamba_span = found
    shape = triton_mamba_span.MambaSpanShape(
        nheads=nheads, headdim=headdim, ngroups=ngroups, d_state=d_state, chunk_size=int(chunk_size),
        norm_group_size=int(norm_group_size), norm_eps=float(norm_eps),
        dt_limit=(float(dt_limit[0]), float(dt_limit[1])),
    )
    if triton_mamba_span.unsupported_reason(zxbcdt, conv_weight, D, shape) is not None:
        return None
    segments = None
    if seq_idx is not None:
        if seq_idx.shape != zxbcdt.shape[:2]:
            raise ValueError(f"seq_idx must be {tuple(zxbcdt.shape[:2])}, got shape {tuple(seq_idx.shape)}")
        segments = segment_ids(seq_idx).to(torch.int32).contiguous()
    return kernel(zxbcdt, conv_weight, conv_bias, A, D, dt_bias, norm_weight, shape, segments)


_TRITON_CROSS_ENTROPY = ("megatron_hybrid.ops.triton_cross_entropy", "cross_entropy_triton",
                         "the Triton cross entropy (ops.triton_cross_entropy)")


def cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, *, reuse_logits: bool = False, group=None, backend: str = "auto"
) -> torch.Tensor | None:
    """Per-token float32 cross entropy of ``logits`` [..., vocab] against ``target`` [...] through our Triton kernels
    (``ops.triton_cross_entropy``: one read of the logits forward, one read and write backward), or None where they
    do not apply: off CUDA, backend / ``MEGATRON_HYBRID_KERNELS`` "torch", other dtypes, or without triton; the caller
    (``parallel.cross_entropy``) then takes its torch path. ``reuse_logits``: the backward writes the gradient over
    the logits (for a caller that owns them and does not read them after the loss). ``group``: the tensor-parallel
    group the vocabulary is split over (``logits`` is this rank's slice; collective), or None."""
    if _cuda_kernel_mode("cross_entropy", backend, logits) is None or logits.dtype not in _KERNEL_DTYPES:
        return None
    found = _own_kernel_quietly(_TRITON_CROSS_ENTROPY)
    if found is None:
        return None
    return found[0](logits, target, reuse_logits, group)


def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    *,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    return_final_states: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2 chunked scan with the semantics of ``mamba_chunk_scan_combined`` (see ``ops.ssd``).

    x [b, l, h, p], dt [b, l, h], A [h], B and C [b, l, g, n], D [h] or [h, p], z [b, l, h, p], dt_bias [h],
    initial_states [b, h, p, n], seq_idx [b, l] int. Returns y [b, l, h, p] (times silu(z) when z is given), or
    (y, final_states [b, h, p, n] float32) with ``return_final_states``.
    """
    own = _own_ssd_kernel(backend, x, B, C, chunk_size, D)
    if own is not None:
        check_ssd_shapes(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx)
        y, final = own(
            x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
            initial_states=initial_states, segments=segment_ids(seq_idx) if seq_idx is not None else None,
        )
        if z is not None:  # mamba_ssm's gate: float32 product, rounded once
            y = (y.float() * F.silu(z.float())).to(x.dtype)
        return (y, final) if return_final_states else y
    kernels = _mamba_kernels("ssd_chunk_scan", backend, x)
    if kernels is None:
        return ssd_chunk_scan_ref(
            x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
            initial_states=initial_states, seq_idx=seq_idx, return_final_states=return_final_states,
        )
    check_ssd_shapes(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx)  # clear errors, not asserts
    segments = segment_ids(seq_idx).to(torch.int32).contiguous() if seq_idx is not None else None
    return kernels.mamba_chunk_scan_combined(
        x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states, seq_idx=segments,
        dt_softplus=dt_softplus, dt_limit=(float(dt_limit[0]), float(dt_limit[1])),
        return_final_states=return_final_states,
    )


def _channel_last(t: torch.Tensor) -> torch.Tensor:
    """[b, d, l] with d fastest in memory and 8-aligned strides, as causal_conv1d's channel-last kernel demands."""
    if t.stride(1) == 1 and t.stride(0) % 8 == 0 and t.stride(2) % 8 == 0:
        return t
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _conv_layout(x: torch.Tensor, need_channel_last: bool) -> torch.Tensor:
    """A layout causal_conv1d accepts: channel-last when needed or already (aligned), else contiguous [b, d, l]."""
    if need_channel_last or (x.stride(1) == 1 and x.stride(2) > 1 and x.shape[1] % 8 == 0):
        return _channel_last(x)
    return x if x.stride(2) == 1 else x.contiguous()


def _conv_ext(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    seq_idx: torch.Tensor | None,
    initial_states: torch.Tensor | None,
    return_final_states: bool,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
    """causal_conv1d's CUDA kernel on ``x`` [b, d, l] when it loads and applies, else None."""
    try:
        kernels = load_causal_conv1d_kernels()
    except KernelUnavailableError:
        return None
    d, w = weight.shape[0], weight.shape[-1]
    states = initial_states is not None or return_final_states
    usable = (
        2 <= w <= 4
        and weight.dtype in _KERNEL_DTYPES
        and (bias is None or bias.dtype == weight.dtype)
        and not (seq_idx is not None and states)
        and (not (seq_idx is not None or states) or d % 8 == 0)
        and (initial_states is None or initial_states.dtype == x.dtype)
    )
    if not usable:
        return None
    segments = None
    x = _conv_layout(x, need_channel_last=seq_idx is not None or states)
    if seq_idx is not None:
        segments = segment_ids(seq_idx).to(torch.int32).contiguous()
    if initial_states is not None:
        initial_states = _channel_last(initial_states)
    return kernels.causal_conv1d_fn(
        x, weight.contiguous(), bias.contiguous() if bias is not None else None, seq_idx=segments,
        initial_states=initial_states, return_final_states=return_final_states, activation=activation,
    )


def _final_conv_inputs(x_cl: torch.Tensor, width: int, seq_idx: torch.Tensor | None) -> torch.Tensor:
    """The last ``width - 1`` inputs of channel-last ``x_cl`` [b, l, d] as [b, d, width - 1] (``causal_conv1d_ref``'s
    final states: zero-padded on the left, other documents than the last token's zeroed)."""
    b, l, d = x_cl.shape
    keep = width - 1
    tail = x_cl[:, max(l - keep, 0):]
    if tail.shape[1] < keep:
        tail = torch.cat([tail.new_zeros(b, keep - tail.shape[1], d), tail], dim=1)
    if seq_idx is not None and keep > 0:
        seg = segment_ids(seq_idx)
        seg_tail = seg[:, max(l - keep, 0):]
        same = seg_tail == seg[:, -1:]
        if same.shape[1] < keep:
            same = torch.cat([same.new_zeros(b, keep - same.shape[1]), same], dim=1)
        tail = tail * same.unsqueeze(-1).to(tail.dtype)
    return tail.transpose(1, 2).contiguous()


def _conv_triton(
    x_cl: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    seq_idx: torch.Tensor | None,
    initial_states: torch.Tensor | None,
    return_final_states: bool,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
    """Our Triton kernel on channel-last ``x_cl`` [b, l, d] -> [b, l, d], or None where it does not apply (initial
    states, very wide kernels, other dtypes) or cannot load; a load failure on CUDA is announced once."""
    if initial_states is not None or weight.shape[-1] > 8 or weight.dtype not in _KERNEL_DTYPES:
        return None
    if bias is not None and bias.dtype not in _KERNEL_DTYPES:
        return None
    try:
        conv = load_triton_conv1d()
    except KernelUnavailableError as exc:
        _warn_once(
            "triton_conv1d",
            f"megatron_hybrid.ops.causal_conv1d: CUDA tensors, but neither causal_conv1d's CUDA kernel nor our Triton "
            f"conv could be loaded, so the conv runs PyTorch's generic depthwise convolution (several times slower "
            f"with its layout copies and casts). Reason: {exc}.",
        )
        return None
    if x_cl.stride(-1) != 1:
        x_cl = x_cl.contiguous()
    out = conv(x_cl, weight, bias, activation, seq_idx=seq_idx)
    if return_final_states:
        return out, _final_conv_inputs(x_cl, weight.shape[-1], seq_idx)
    return out


def causal_conv1d_channel_last(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``causal_conv1d`` on a channel-last ``x`` [b, l, d]; returns [b, l, d] (and final states [b, d, w - 1]).

    The layout a Mamba mixer has: ``x`` may be a strided slice of ``in_proj``'s output (``stride(-1) == 1``), which
    the GPU kernels read in place. On CUDA: causal_conv1d's kernel when importable and applicable, else our Triton
    kernel (``ops.triton_conv1d``; not with ``initial_states``), else the reference. Same semantics as
    ``causal_conv1d(x.transpose(1, 2), ...).transpose(1, 2)``.
    """
    if x.dim() != 3:
        raise ValueError(f"x must be [batch, seqlen, dim], got shape {tuple(x.shape)}")
    # Transposes are views: the dispatch below hands every kernel the caller's own strided tensor.
    result = causal_conv1d(
        x.transpose(1, 2), weight, bias, activation, seq_idx=seq_idx, initial_states=initial_states,
        return_final_states=return_final_states, backend=backend,
    )
    return _swap_length_and_channels(result, return_final_states)


def _swap_length_and_channels(
    result: torch.Tensor | tuple[torch.Tensor, torch.Tensor], with_final_states: bool
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Transpose a conv output between [b, d, l] and [b, l, d]; final states keep their [b, d, w - 1] layout."""
    if with_final_states:
        return result[0].transpose(1, 2), result[1]
    return result.transpose(1, 2)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv with the semantics of ``causal_conv1d_fn`` (see ``ops.conv1d``).

    x [b, d, l], weight [d, w], bias [d], activation None | "silu" | "swish", seq_idx [b, l] int, initial_states
    [b, d, w - 1]. Returns [b, d, l] (and the final conv inputs [b, d, w - 1] with ``return_final_states``).
    causal_conv1d's kernel cannot combine seq_idx with initial/final states; such calls use our Triton kernel or the
    torch path. Channel-last callers (a Mamba mixer) should use ``causal_conv1d_channel_last``.
    """
    if _conv_kernels_wanted("causal_conv1d", backend, x):
        result = _conv_ext(x, weight, bias, activation, seq_idx, initial_states, return_final_states)
        if result is not None:
            return result
        result = _conv_triton(x.transpose(1, 2), weight, bias, activation, seq_idx, initial_states,
                              return_final_states)
        if result is not None:
            return _swap_length_and_channels(result, return_final_states)
    return causal_conv1d_ref(
        x, weight, bias, activation, seq_idx=seq_idx, initial_states=initial_states,
        return_final_states=return_final_states,
    )


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Decode-time conv step with the semantics of causal_conv1d's ``causal_conv1d_update``.

    x [b, d] (or [b, d, l]); ``conv_state`` [b, d, state_len] holds the last ``state_len >= w - 1`` inputs, oldest
    first (we allocate ``state_len = w = d_conv`` like mamba_ssm and transformers) and is updated in place.
    """
    if _conv_kernels_wanted("causal_conv1d_update", backend, x):
        try:
            kernels = load_causal_conv1d_kernels()
        except KernelUnavailableError:
            kernels = None
        w = weight.shape[-1]
        if (
            kernels is not None
            and 2 <= w <= 4
            and conv_state.dtype == x.dtype
            and weight.dtype in _KERNEL_DTYPES
            and (bias is None or bias.dtype == weight.dtype)
        ):
            return kernels.causal_conv1d_update(
                x, conv_state, weight.contiguous(), bias.contiguous() if bias is not None else None, activation
            )
    return causal_conv1d_update_ref(x, conv_state, weight, bias, activation)


def ssm_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    backend: str = "auto",
) -> torch.Tensor:
    """One decode step with the semantics of ``selective_state_update`` (see ``ops.state_update``).

    state [b, h, p, n] (updated in place), x [b, h, p], dt [b, h], A [h], B and C [b, g, n], D [h] or [h, p],
    z [b, h, p], dt_bias [h]; returns y [b, h, p]. ``dt`` is processed (bias, softplus, clamp) exactly as in
    ``ssd_chunk_scan``, so decoding continues a prefill bit-for-bit in float64 and to rounding otherwise.
    """
    kernels = _mamba_kernels("ssm_state_update", backend, x)
    if kernels is None:
        return ssm_state_update_ref(
            state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit
        )
    b, h, p, n = state.shape
    # The kernel has no dt clamp, so dt is finalised here (tiny: [b, h]) and passed with softplus off; zero-stride
    # expansions select the kernel's tied-head-dim path. dt_bias must be a tensor there (the kernel reads its stride).
    dt_eff = process_dt(dt, dt_bias, dt_softplus, dt_limit, torch.float32)
    if dt_eff.dim() == 2:
        dt_eff = dt_eff.unsqueeze(-1).expand(b, h, p)
    A_eff = A.float()[:, None, None].expand(h, p, n) if A.dim() == 1 else A
    zero_bias = torch.zeros(1, 1, device=x.device, dtype=torch.float32).expand(h, p)
    D_eff = D[:, None].expand(h, p) if D is not None and D.dim() == 1 else D
    return kernels.selective_state_update(
        state, x, dt_eff, A_eff, B, C, D=D_eff, z=z, dt_bias=zero_bias, dt_softplus=False
    )


_TRITON_NORM = ("megatron_hybrid.ops.triton_norm", "group_rms_norm_triton", "the Triton RMSNorm (ops.triton_norm)")


def _own_norm_kernel(
    op: str, backend: str, x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, group_size: int
) -> Callable | None:
    """Our Triton (gated, grouped) RMSNorm for these arguments, or None for mamba_ssm's kernel / the reference (no
    warning: those come next and warn themselves if they too are unavailable)."""
    if _cuda_kernel_mode(op, backend, x) is None:
        return None
    width = x.shape[-1]
    if (x.dtype not in _KERNEL_DTYPES or weight.dtype not in _KERNEL_DTYPES or weight.shape != (width,)
            or (z is not None and (z.shape != x.shape or z.dtype != x.dtype or z.device != x.device))
            or group_size <= 0 or width % group_size):
        return None
    found = _own_kernel_quietly(_TRITON_NORM)
    if found is None:
        return None
    kernel, triton_norm = found
    return kernel if group_size <= triton_norm.MAX_GROUP else None


def _norm_fits_kernel(x: torch.Tensor, group_size: int) -> bool:
    # layernorm_gated fuses one group per program and refuses groups wider than 64 KB.
    return group_size * x.element_size() <= 65536


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    residual: torch.Tensor | None = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim, ``x / sqrt(mean(x^2) + eps) * weight``, float32 math, x's dtype out.

    With ``residual`` (a decode step's pre-norm residual carry, ``x`` being the previous layer's update): the stream
    ``s = residual + x`` (in float32 with ``residual_in_fp32``, else in residual's dtype) is normalised in x's dtype,
    exactly as the unfused ``hidden = hidden + update; norm(hidden)`` rounds; returns ``(y, s)`` with ``prenorm``,
    else ``y``. On CUDA that is one Triton kernel (``ops.triton_add_norm``; the reference is
    ``add_rms_norm_ref``). Without ``residual`` it is ``ops.triton_norm`` on CUDA (mamba_ssm's kernel where that
    does not apply), and ``prenorm`` returns ``(y, x)`` (x as float32 with ``residual_in_fp32``). Unlike mamba_ssm's
    ``rms_norm_fn`` (which normalises the unrounded float32 sum and keeps a given residual's dtype),
    ``residual_in_fp32`` always makes the new stream float32, as ``_residual_add`` does.
    """
    if residual is None:
        own = _own_norm_kernel("rms_norm", backend, x, None, weight, x.shape[-1])
        if own is not None:
            y = own(x, None, weight, eps)
        else:
            kernels = _mamba_kernels("rms_norm", backend, x)
            if kernels is None or not _norm_fits_kernel(x, x.shape[-1]):
                y = rms_norm_ref(x, weight, eps)
            else:
                y = kernels.rmsnorm_fn(x, weight, None, z=None, eps=eps, group_size=None, norm_before_gate=True)
        if not prenorm:
            return y
        return y, x.float() if residual_in_fp32 else x
    residual_dtype = torch.float32 if residual_in_fp32 else residual.dtype
    y = total = None
    kernel = _own_triton_kernel("rms_norm", backend, x, "megatron_hybrid.ops.triton_add_norm", "add_rms_norm_triton",
                                "the Triton add + RMSNorm", "each residual add runs as its own kernel")
    if (
        kernel is not None
        and x.shape == residual.shape
        and residual.device == x.device
        and all(t in _KERNEL_DTYPES for t in (x.dtype, residual.dtype, weight.dtype))
        and triton_add_norm_fits(x.shape[-1])
        and not (torch.is_grad_enabled() and (residual.requires_grad or weight.requires_grad))
    ):
        y, total = kernel(x, residual, weight, eps, residual_dtype)
    else:
        y, total = add_rms_norm_ref(x, residual, weight, eps, residual_dtype)
    return (y, total) if prenorm else y


def triton_add_norm_fits(width: int) -> bool:
    """Whether ``ops.triton_add_norm`` holds a row of ``width`` features (one float32 row per program, <= 64 KB)."""
    return 4 * (1 << max(width - 1, 0).bit_length()) <= 65536


def gated_rms_norm(
    x: torch.Tensor,
    z: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    group_size: int | None = None,
    norm_before_gate: bool = False,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Grouped RMSNorm with SiLU gate: ``rmsnorm_groupwise(x * silu(z)) * weight`` (norm_before_gate=False) or
    ``rmsnorm_groupwise(x) * weight * silu(z)``; semantics of mamba_ssm's ``rmsnorm_fn`` (see ``ops.norm``).
    On CUDA: our Triton kernels (``ops.triton_norm``) for norm_before_gate=False, else mamba_ssm's."""
    size = x.shape[-1] if group_size is None else group_size
    if not norm_before_gate:
        own = _own_norm_kernel("gated_rms_norm", backend, x, z, weight, size)
        if own is not None:
            return own(x, z, weight, eps, size)
    kernels = _mamba_kernels("gated_rms_norm", backend, x)
    if kernels is None or not _norm_fits_kernel(x, size):
        return gated_rms_norm_ref(x, z, weight, eps, group_size, norm_before_gate)
    return kernels.rmsnorm_fn(
        x, weight, None, z=z, eps=eps, group_size=group_size, norm_before_gate=norm_before_gate
    )


# (module, entry point, what it is called in messages) of the fused Mamba decode step
_TRITON_DECODE = ("megatron_hybrid.ops.triton_decode", "mamba_decode_step_triton", "the fused Triton Mamba decode")


def _own_triton_kernel(
    op: str, backend: str, tensor: torch.Tensor, module_name: str, entry: str, what: str, fallback: str
) -> Callable | None:
    """``entry`` of our Triton module ``module_name`` for ``tensor``, or None for the unfused ops / reference.

    ``backend`` / ``MEGATRON_HYBRID_KERNELS`` = "torch" turns it off like every other kernel; "triton" on non-CUDA
    tensors raises. Not under autograd: these decode kernels have no backward (decoding runs under inference_mode).
    A load failure on CUDA warns once, naming ``what`` and the ``fallback`` taken instead.
    """
    mode = _cuda_kernel_mode(op, backend, tensor)
    if mode is None:
        return None
    if tensor.dtype not in _KERNEL_DTYPES or (torch.is_grad_enabled() and tensor.requires_grad):
        return None
    try:
        return load_own_triton(module_name, entry, what)
    except KernelUnavailableError as exc:
        if mode == "triton":
            raise KernelUnavailableError(f"{op}: backend 'triton' requested but {exc}") from exc
        _warn_once(module_name, f"megatron_hybrid.ops.{op}: CUDA tensors, but {what} could not be loaded, so "
                   f"{fallback}. Reason: {exc}.")
        return None


def _fused_decode_kernel(op: str, backend: str, tensor: torch.Tensor) -> Callable | None:
    """The fused Triton decode step for ``tensor`` (the in_proj output), or None for the unfused ops."""
    return _own_triton_kernel(op, backend, tensor, *_TRITON_DECODE,
                              "each Mamba decode step runs the unfused ops (~30 kernels per layer instead of 2)")


def mamba_decode_fused(
    zxbcdt: torch.Tensor,
    conv_state: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    ssm_state: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor | None,
    D: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    *,
    norm_group_size: int,
    eps: float,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    normalize: bool = True,
    backend: str = "auto",
) -> torch.Tensor | None:
    """A Mamba-2 mixer's decode step from ``in_proj``'s output ``zxbcdt`` [b, width] to ``out_proj``'s input
    [b, d_inner] in two fused Triton kernels (``ops.triton_decode``; conv and SSM states advance in place), or None
    when the fused path does not apply (CPU tensors under "auto", backend "torch", no triton, autograd): the caller
    then runs ``causal_conv1d_update`` + ``ssm_state_update`` + ``gated_rms_norm``, whose semantics it has
    (dt softplus'ed, A = -exp(A_log), norm after the gate). ``normalize=False``: one kernel, returning ``y`` before
    the gated norm (which the caller then applies, e.g. in ``fused_gemv``'s prologue)."""
    kernel = _fused_decode_kernel("mamba_decode_fused", backend, zxbcdt)
    if kernel is None or conv_state.dtype not in _KERNEL_DTYPES or ssm_state.dtype not in _KERNEL_DTYPES:
        return None
    return kernel(
        zxbcdt, conv_state, conv_weight, conv_bias, ssm_state, A_log, dt_bias, D, norm_weight,
        norm_group_size=norm_group_size, eps=eps, dt_limit=dt_limit, normalize=normalize,
    )


def greedy_tokens_and_feed(logits: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, *,
                           backend: str = "auto") -> torch.Tensor:
    """Greedy tokens of ``logits`` [rows, V] (int64 [rows]; ties to the lowest index), also written into ``ids``
    [rows], with ``positions`` [rows] advanced by one, in place: the inputs of a next greedy decode step. Two Triton
    kernels on CUDA (``ops.triton_argmax``), else ``max(dim).indices`` and two in-place ops."""
    kernel = _own_triton_kernel("greedy_tokens_and_feed", backend, logits, "megatron_hybrid.ops.triton_argmax",
                                "greedy_and_feed_triton", "the Triton greedy argmax",
                                "greedy steps run torch's max and two small kernels")
    if kernel is not None and logits.dim() == 2 and logits.stride(-1) == 1:
        return kernel(logits, ids, positions)
    tokens = logits.max(dim=-1).indices
    ids.copy_(tokens)
    positions.add_(1)
    return tokens


def fused_gemv(x: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
               backend: str = "auto", **fusions) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """One decode row's linear layer with its norm and activation in the same kernel (``ops.triton_fused_gemv``;
    ``fusions`` are that module's ``fused_gemv_triton`` keywords), or None where the kernel does not apply (CPU
    tensors under "auto", backend "torch", no triton, autograd): the caller then runs the separate ops."""
    source = x if x is not None else fusions.get("residual")
    kernel = _own_triton_kernel("fused_gemv", backend, source, "megatron_hybrid.ops.triton_fused_gemv",
                                "fused_gemv_triton", "the Triton fused GEMV",
                                "decode steps run their norms and linears as separate kernels")
    if kernel is None:
        return None
    return kernel(x, weight, bias, **fusions)


def decode_attention_fused(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    attention_length: int | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor | None:
    """One decode step of attention (the new keys and values written into the caches at ``positions``) as one Triton
    kernel (``ops.triton_attention``), or None when it does not apply (CPU tensors under "auto", backend "torch", no
    triton, autograd, other dtypes or layouts): the caller then runs its unfused path, whose semantics it has.

    ``q`` [b, kv_heads, heads_per_group, d], ``k_new`` / ``v_new`` [b, kv_heads, d] (views of ``linear_qkv``'s output
    are fine: only the last dim must be contiguous), caches [b, kv_heads, L, d], ``positions`` [b]; row ``i`` attends
    to keys ``0 .. positions[i]``. Returns the context [b, heads * d] (head-major, ``linear_proj``'s input layout).
    """
    kernel = _own_triton_kernel("decode_attention_fused", backend, q, "megatron_hybrid.ops.triton_attention",
                                "decode_attention_triton", "the Triton decode attention",
                                "each attention decode step runs the unfused ops (~12 kernels per layer)")
    tensors = (q, k_new, v_new, k_cache, v_cache)
    if kernel is None or any(t.dtype not in _KERNEL_DTYPES or t.stride(-1) != 1 for t in tensors):
        return None
    if k_cache.dtype != v_cache.dtype or positions.device != q.device:
        return None
    return kernel(q, k_new, v_new, k_cache, v_cache, positions, attention_length)


def skinny_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor | None:
    """``F.linear(x, weight, bias)`` for decode's few rows (at most 16 in all) as our Triton GEMV
    (``ops.triton_gemv``), or None when it does not apply (CPU tensors under "auto", backend "torch", no triton,
    autograd, more rows, mixed dtypes, a non-contiguous weight): the caller then runs ``F.linear``.

    Why: cuBLAS's kernels for these shapes read the weights at a fraction of HBM bandwidth (see the module). Inference
    only: the kernel has no backward, so any input or parameter that needs a gradient keeps ``F.linear``.
    """
    kernel = _own_triton_kernel("skinny_gemv", backend, x, "megatron_hybrid.ops.triton_gemv", "gemv_or_none",
                                "the Triton skinny GEMV", "decode's linear layers run F.linear (cuBLAS)")
    if kernel is None or x.dim() == 0 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        return None
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        return None
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype) or not weight.is_contiguous():
        return None
    if bias is not None and (bias.device != x.device or bias.stride(0) != 1):
        return None
    if weight.device != x.device:
        return None
    return kernel(x, weight, bias)  # None for too many rows or a shape the benchmark found cuBLAS faster on


def kernel_backend_info() -> dict[str, Any]:
    """What each op would run on CUDA tensors under ``backend="auto"`` and why (tries the lazy imports once)."""
    info: dict[str, Any] = {
        "env_override": os.environ.get(ENV_VAR) or None,
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        mamba = load_mamba_ssm_kernels()
        info["mamba_ssm_triton"] = {"available": True, "how": mamba.how, "error": None}
    except KernelUnavailableError as exc:
        info["mamba_ssm_triton"] = {"available": False, "how": None, "error": str(exc)}
    try:
        load_causal_conv1d_kernels()
        info["causal_conv1d"] = {"available": True, "error": None}
    except KernelUnavailableError as exc:
        info["causal_conv1d"] = {"available": False, "error": str(exc)}
    try:
        load_triton_conv1d()
        info["triton_conv1d"] = {"available": True, "error": None}
    except KernelUnavailableError as exc:
        info["triton_conv1d"] = {"available": False, "error": str(exc)}
    own = {
        "triton_decode": _TRITON_DECODE,
        "triton_add_norm": ("megatron_hybrid.ops.triton_add_norm", "add_rms_norm_triton", "the Triton add + RMSNorm"),
        "triton_attention": ("megatron_hybrid.ops.triton_attention", "decode_attention_triton",
                             "the Triton decode attention"),
        "triton_gemv": ("megatron_hybrid.ops.triton_gemv", "gemv_or_none", "the Triton skinny GEMV"),
        "triton_fused_gemv": ("megatron_hybrid.ops.triton_fused_gemv", "fused_gemv_triton",
                              "the Triton fused GEMV"),
        "triton_argmax": ("megatron_hybrid.ops.triton_argmax", "greedy_and_feed_triton", "the Triton greedy argmax"),
        "triton_cross_entropy": _TRITON_CROSS_ENTROPY,
    }
    for key, (module_name, entry, what) in own.items():
        try:
            load_own_triton(module_name, entry, what)
            info[key] = {"available": True, "error": None}
        except KernelUnavailableError as exc:
            info[key] = {"available": False, "error": str(exc)}
    triton_ok = info["mamba_ssm_triton"]["available"]
    conv_ok = info["causal_conv1d"]["available"]
    conv_fallback = "triton (megatron_hybrid)" if info["triton_conv1d"]["available"] else "torch (F.conv1d on GPU)"
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    on_cuda = {
        "ssd_chunk_scan": "triton" if triton_ok else "torch",
        "ssm_state_update": "triton" if triton_ok else "torch",
        "rms_norm": "triton" if triton_ok else "torch",
        "gated_rms_norm": "triton" if triton_ok else "torch",
        "causal_conv1d": "causal_conv1d" if conv_ok else conv_fallback,
        "causal_conv1d_update": "causal_conv1d" if conv_ok else "torch (F.conv1d on GPU)",
        "mamba_decode_fused": "triton (megatron_hybrid)" if info["triton_decode"]["available"] else "unfused ops",
        "rms_norm_with_residual": "triton (megatron_hybrid)" if info["triton_add_norm"]["available"] else "torch",
        "decode_attention_fused": "triton (megatron_hybrid)" if info["triton_attention"]["available"]
        else "unfused ops",
        "skinny_gemv": "triton (megatron_hybrid, <= 16 rows, inference)" if info["triton_gemv"]["available"]
        else "F.linear",
        "fused_gemv": "triton (megatron_hybrid, one row, inference)" if info["triton_fused_gemv"]["available"]
        else "separate norm and linear",
        "greedy_tokens_and_feed": "triton (megatron_hybrid)" if info["triton_argmax"]["available"]
        else "torch max",
        "cross_entropy": "triton (megatron_hybrid)" if info["triton_cross_entropy"]["available"]
        else "torch (chunked)",
    }
    if mode == "torch":
        on_cuda = dict.fromkeys(on_cuda, "torch")
    info["auto_on_cuda"] = on_cuda
    info["auto_on_cpu"] = "torch"
    return info
