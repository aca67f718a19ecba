"""Lazy access to the GPU kernels of mamba_ssm (Triton), causal_conv1d (CUDA extension) and our own Triton conv
and fused decode step.

``import mamba_ssm`` executes its ``__init__``, which imports the compiled ``selective_scan_cuda`` extension and fails
on wheels built without CUDA extensions, although the Triton kernels we need (``ssd_combined``,
``selective_state_update``, ``layernorm_gated``) are pure Python + Triton. When the regular import fails, the loader
locates the installed package with ``importlib.util.find_spec`` (which does not execute ``__init__``) and registers a
bare package module for it in ``sys.modules``, so that the Triton submodules import normally. The regular import is
always tried first, so a working installation is used as is.

Nothing here runs at import time of ``megatron_hybrid.ops``; results (success or the failure text) are cached.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass


class KernelUnavailableError(RuntimeError):
    """A requested GPU kernel cannot be loaded; the message says why (the original import error text)."""


@dataclass(frozen=True)
class MambaSsmKernels:
    """The mamba_ssm Triton entry points used by the dispatch layer, and how they were reached."""

    mamba_chunk_scan_combined: Callable
    selective_state_update: Callable
    rmsnorm_fn: Callable
    how: str


@dataclass(frozen=True)
class CausalConv1dKernels:
    """causal_conv1d's CUDA entry points."""

    causal_conv1d_fn: Callable
    causal_conv1d_update: Callable


_lock = threading.Lock()
_mamba_result: MambaSsmKernels | KernelUnavailableError | None = None
_conv_result: CausalConv1dKernels | KernelUnavailableError | None = None
_triton_conv_result: Callable | KernelUnavailableError | None = None
_own_triton_results: dict[str, Callable | KernelUnavailableError] = {}  # module name -> entry point or failure


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _ensure_mamba_ssm_package() -> str:
    """Make ``mamba_ssm`` importable as a package; returns how (regular import or bare package)."""
    if "mamba_ssm" in sys.modules:
        return "mamba_ssm already imported"
    try:
        importlib.import_module("mamba_ssm")
        return "regular `import mamba_ssm`"
    except Exception as exc:  # ImportError for the missing extension, OSError for a broken one, ...
        import_error = _describe(exc)
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or spec.submodule_search_locations is None:
        raise KernelUnavailableError(f"mamba_ssm is not installed ({import_error})")
    # module_from_spec sets __path__/__spec__/__loader__ without executing the package's __init__.
    sys.modules["mamba_ssm"] = importlib.util.module_from_spec(spec)
    return f"bare package registered for mamba_ssm because `import mamba_ssm` failed with {import_error}"


def _load_mamba_ssm() -> MambaSsmKernels:
    how = _ensure_mamba_ssm_package()
    try:
        ssd_combined = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
        state_update = importlib.import_module("mamba_ssm.ops.triton.selective_state_update")
        layernorm_gated = importlib.import_module("mamba_ssm.ops.triton.layernorm_gated")
        return MambaSsmKernels(
            mamba_chunk_scan_combined=ssd_combined.mamba_chunk_scan_combined,
            selective_state_update=state_update.selective_state_update,
            rmsnorm_fn=layernorm_gated.rmsnorm_fn,
            how=how,
        )
    except Exception as exc:
        raise KernelUnavailableError(f"mamba_ssm Triton kernels failed to import ({how}): {_describe(exc)}") from exc


def load_mamba_ssm_kernels() -> MambaSsmKernels:
    """The mamba_ssm Triton kernels, or ``KernelUnavailableError`` saying why not (cached after the first call)."""
    global _mamba_result
    with _lock:
        if _mamba_result is None:
            try:
                _mamba_result = _load_mamba_ssm()
            except KernelUnavailableError as exc:
                _mamba_result = exc
            except Exception as exc:  # never let an odd installation break the torch fallback
                _mamba_result = KernelUnavailableError(f"loading mamba_ssm failed: {_describe(exc)}")
        result = _mamba_result
    if isinstance(result, KernelUnavailableError):
        # A fresh instance: re-raising the cached one would chain every raise's frames (and their tensors) onto its
        # traceback, pinning the activations of every call (seen as a GPU memory leak of ~2 GB per 64K-token layer).
        raise KernelUnavailableError(str(result))
    return result


def load_causal_conv1d_kernels() -> CausalConv1dKernels:
    """causal_conv1d's CUDA kernels, or ``KernelUnavailableError`` saying why not (cached after the first call)."""
    global _conv_result
    with _lock:
        if _conv_result is None:
            try:
                module = importlib.import_module("causal_conv1d")
                _conv_result = CausalConv1dKernels(
                    causal_conv1d_fn=module.causal_conv1d_fn,
                    causal_conv1d_update=module.causal_conv1d_update,
                )
            except Exception as exc:
                _conv_result = KernelUnavailableError(f"causal_conv1d is unavailable: {_describe(exc)}")
        result = _conv_result
    if isinstance(result, KernelUnavailableError):
        # A fresh instance: re-raising the cached one would chain every raise's frames (and their tensors) onto its
        # traceback, pinning the activations of every call (seen as a GPU memory leak of ~2 GB per 64K-token layer).
        raise KernelUnavailableError(str(result))
    return result


def load_triton_conv1d() -> Callable:
    """megatron_hybrid's Triton channel-last conv (``ops.triton_conv1d``), or ``KernelUnavailableError`` (cached).

    Importing it imports triton, so this runs only on the first CUDA call that needs it.
    """
    global _triton_conv_result
    with _lock:
        if _triton_conv_result is None:
            try:
                module = importlib.import_module("megatron_hybrid.ops.triton_conv1d")
                _triton_conv_result = module.causal_conv1d_channel_last_triton
            except Exception as exc:
                _triton_conv_result = KernelUnavailableError(f"the Triton conv1d is unavailable: {_describe(exc)}")
        result = _triton_conv_result
    if isinstance(result, KernelUnavailableError):
        # A fresh instance: re-raising the cached one would chain every raise's frames (and their tensors) onto its
        # traceback, pinning the activations of every call (seen as a GPU memory leak of ~2 GB per 64K-token layer).
        raise KernelUnavailableError(str(result))
    return result


def load_own_triton(module_name: str, entry: str, what: str) -> Callable:
    """``entry`` of one of megatron_hybrid's own Triton modules (``ops.triton_decode``, ``ops.triton_add_norm``,
    ``ops.triton_attention``, ``ops.triton_gemv``),
    or ``KernelUnavailableError`` saying why not (cached per module). Such a module imports triton, so only CUDA
    calls get here; it sets ``UNAVAILABLE_REASON`` instead of failing to import. ``what`` names it in errors."""
    with _lock:
        result = _own_triton_results.get(module_name)
        if result is None:
            try:
                module = importlib.import_module(module_name)
                if module.UNAVAILABLE_REASON is not None:
                    raise KernelUnavailableError(module.UNAVAILABLE_REASON)
                result = getattr(module, entry)
            except Exception as exc:
                result = KernelUnavailableError(f"{what} is unavailable: {_describe(exc)}")
            _own_triton_results[module_name] = result
    if isinstance(result, KernelUnavailableError):
        raise KernelUnavailableError(str(result))  # a fresh instance, for the reason given in load_triton_conv1d
    return result


def reset_kernel_cache() -> None:
    """Forget cached load results (tests, or after installing a package in a running process)."""
    global _mamba_result, _conv_result, _triton_conv_result
    with _lock:
        _own_triton_results.clear()
        _mamba_result = None
        _conv_result = None
        _triton_conv_result = None
