"""Per-rank Triton kernel caches, so ranks of one node compiling the same kernel never race on one cache entry.

Why: the Mamba-2 kernels (mamba_ssm) are Triton JIT kernels. With N ranks per node all compiling the same kernel at
start-up, older Triton versions could leave a half-written entry in a shared cache that another rank then loads
(Megatron-LM works around it with its ``ParallelFileCacheManager`` through ``TRITON_CACHE_MANAGER``). We avoid the
sharing instead: every rank gets its own directory ``$TRITON_CACHE_DIR/<hostname>-local_rank<LOCAL_RANK>``
(``~/.triton/cache`` when ``TRITON_CACHE_DIR`` is unset), which also keeps nodes apart on a shared filesystem.
Cost: each rank compiles once into its own directory; later runs reuse it.

:func:`configure_triton_cache` must run before Triton reads its configuration, i.e. before the first kernel is
compiled; the entry points (``pretrain_mamba.py``, ``python -m megatron_hybrid.train``) call it first thing.
Importing torch does not import Triton. Set ``MEGATRON_HYBRID_SHARED_TRITON_CACHE=1`` to keep one shared directory.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

__all__ = ["configure_triton_cache"]

_BASE_KEY = "MEGATRON_HYBRID_TRITON_CACHE_BASE"


def configure_triton_cache(environ: MutableMapping[str, str] | None = None) -> str | None:
    """Point ``TRITON_CACHE_DIR`` at this rank's own directory (created); return it, or None if left alone.

    Only under a launcher (``LOCAL_RANK`` set). Idempotent: the base directory is remembered in
    ``MEGATRON_HYBRID_TRITON_CACHE_BASE`` so a second call (or a child process) does not nest directories.
    """
    env = os.environ if environ is None else environ
    if "LOCAL_RANK" not in env or env.get("MEGATRON_HYBRID_SHARED_TRITON_CACHE") == "1":
        return None
    base = env.get(_BASE_KEY) or env.get("TRITON_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".triton", "cache")
    env[_BASE_KEY] = base
    directory = os.path.join(base, f"{socket.gethostname()}-local_rank{env['LOCAL_RANK']}")
    os.makedirs(directory, exist_ok=True)
    env["TRITON_CACHE_DIR"] = directory
    return directory
