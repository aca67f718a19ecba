"""What megatron_hybrid's own Triton modules (``triton_decode``, ``triton_add_norm``, ``triton_attention``,
``triton_gemv``, ``triton_fused_gemv``, ``triton_argmax``, ``triton_ssd``, ``triton_norm``, ``triton_mamba_span``,
``triton_cross_entropy``) share: the guarded import of triton, rounding a float32 value to a storage dtype inside
a kernel, the softplus of Mamba's time step, and programmatic dependent launch (PDL).

PDL (Hopper and later): a kernel launched with it may start while the kernel before it in the stream is still running,
once every program of that one has signalled (``gdc_launch_dependents``); it must wait (``gdc_wait``: the previous
kernel has completed and its writes are visible) before it reads anything an earlier kernel wrote or writes anything.
Between the two it may only read what no kernel of the same decode step writes (parameters, and caches that only this
kernel writes). Our decode kernels load their weights there, so a kernel's weight streaming overlaps the previous
kernel's tail and the launch gap: a decode step is ~100-200 short kernels whose ramp-up is a large part of their time.
Captured in a CUDA graph, the launches become programmatic edges of the graph.

Importing this module never fails: without triton, ``triton`` and ``tl`` are None and ``UNAVAILABLE_REASON`` says why
(each kernel module re-exports it, and the loader refuses the module with it).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except Exception as exc:  # ImportError without triton; a broken installation may raise anything
    triton = tl = None
    UNAVAILABLE_REASON: str | None = f"triton cannot be imported ({type(exc).__name__}: {exc})"
else:
    UNAVAILABLE_REASON = None

ROUND_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the KIND argument of round_to_storage

if triton is not None:

    @triton.jit
    def round_to_storage(x, KIND: tl.constexpr):
        """Round float32 ``x`` to the nearest value of the storage dtype ``KIND`` (0 float32, 1 bfloat16, 2 float16),
        ties to even, kept in float32. The bfloat16 case is done on the bits because Triton's interpreter truncates
        a float32 -> bfloat16 ``.to()`` while GPUs round to nearest; rounded first, the later cast is exact on both."""
        if KIND == 1:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            x = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
        elif KIND == 2:
            x = x.to(tl.float16).to(tl.float32)
        return x

    @triton.jit
    def softplus(x):
        """``torch.nn.functional.softplus`` (threshold 20: x above it) in float32, ``log(1 + exp(x))`` accurate for
        tiny ``exp(x)`` (Goldberg's trick: ``u - 1`` is the exact part of ``exp(x)`` that survived the rounding of
        ``u = 1 + exp(x)``; libdevice's log1p is not available in the interpreter)."""
        e = tl.exp(x)
        u = 1.0 + e
        return tl.where(x > 20.0, x, tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0))))


PDL_ENV_VAR = "MEGATRON_HYBRID_PDL"  # "0" turns programmatic dependent launch off (benchmarks compare)


def _gdc_functions():
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    except Exception:  # an older triton: no grid dependency control
        return None, None
    return gdc_wait, gdc_launch_dependents


_gdc_wait, _gdc_launch_dependents = _gdc_functions() if triton is not None else (None, None)
_PDL_CACHE: dict[int, bool] = {}
PDL_OFF, PDL_AFTER_WAIT, PDL_EARLY = 0, 1, 2  # the USE_PDL values: when a kernel lets the next one launch


def pdl_mode(device: torch.device) -> int:
    """The ``USE_PDL`` of our kernels on ``device``: ``PDL_AFTER_WAIT`` (the default) when ``pdl_available``, and
    ``PDL_EARLY`` (the next kernel may launch as soon as this one starts) with ``MEGATRON_HYBRID_PDL=early``."""
    if not pdl_available(device):
        return PDL_OFF
    return PDL_EARLY if os.environ.get(PDL_ENV_VAR, "1") == "early" else PDL_AFTER_WAIT


def pdl_available(device: torch.device) -> bool:
    """Whether our kernels on ``device`` launch with PDL: a CUDA device of compute capability >= 9, a triton with
    grid dependency control and the ``launch_pdl`` option, not the interpreter, and ``MEGATRON_HYBRID_PDL`` not "0"."""
    if device.type != "cuda" or os.environ.get(PDL_ENV_VAR, "1") == "0" or _gdc_wait is None:
        return False
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    found = _PDL_CACHE.get(index)
    if found is None:
        try:
            from triton.backends.nvidia.compiler import CUDAOptions

            has_option = "launch_pdl" in CUDAOptions.__dataclass_fields__
        except Exception:
            has_option = False
        found = _PDL_CACHE[index] = has_option and torch.cuda.get_device_capability(index)[0] >= 9
    return found


def launch_options(use_pdl: int) -> dict[str, bool]:
    """Extra launch keywords of a kernel call: ``launch_pdl`` only when used (older triton lacks the option)."""
    return {"launch_pdl": True} if use_pdl else {}


if triton is not None:

    @triton.jit
    def let_next_kernel_launch_early(USE_PDL: tl.constexpr):
        """At a kernel's start under ``PDL_EARLY``: the next kernel may launch (and load its weights) right away."""
        if USE_PDL == 2:
            _gdc_launch_dependents()

    @triton.jit
    def wait_for_previous_kernel(USE_PDL: tl.constexpr):
        """Under PDL: block until the previous kernel has completed (its writes visible), then (``PDL_AFTER_WAIT``)
        let the next kernel launch: signalling only here keeps at most one kernel ahead of the running one on the
        SMs. A no-op without PDL, where the stream already orders the kernels."""
        if USE_PDL != 0:
            _gdc_wait()
        if USE_PDL == 1:
            _gdc_launch_dependents()
