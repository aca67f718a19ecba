"""What megatron_hybrid's own Triton modules (``triton_decode``, ``triton_add_norm``, ``triton_attention``,
``triton_gemv``) share: the guarded import of triton, and rounding a float32 value to a storage dtype inside a kernel.

Importing this module never fails: without triton, ``triton`` and ``tl`` are None and ``UNAVAILABLE_REASON`` says why
(each kernel module re-exports it, and the loader refuses the module with it).
"""

from __future__ import annotations

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
