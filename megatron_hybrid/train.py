"""``python -m megatron_hybrid.train [Megatron flags]``: the same entry point as ``pretrain_mamba.py``."""

from __future__ import annotations

import sys

from megatron_hybrid.training.triton_cache import configure_triton_cache

configure_triton_cache()  # before anything can compile a Triton kernel

from megatron_hybrid.training.loop import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="python -m megatron_hybrid.train"))
