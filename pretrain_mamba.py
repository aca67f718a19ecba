#!/usr/bin/env python
"""Pretrain a hybrid Mamba-2 / attention model with Megatron-LM's flags (see ``--help``).

    torchrun --nproc_per_node 8 pretrain_mamba.py --num-layers 48 --hidden-size 1024 ... (examples/mamba/train.sh)
    python pretrain_mamba.py ...                                                            (one process, CPU or GPU)
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run from a checkout without installing

from megatron_hybrid.training.triton_cache import configure_triton_cache  # noqa: E402

configure_triton_cache()  # per-rank Triton cache, before anything can compile a kernel

from megatron_hybrid.training.loop import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
