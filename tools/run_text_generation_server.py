"""Serve a megatron_hybrid model over HTTP: Megatron's ``PUT /api``, OpenAI's ``POST /v1/completions``, ``GET /health``.

Examples::

    # a training checkpoint (model settings come from the checkpoint)
    python tools/run_text_generation_server.py --load checkpoints/tiny --use-checkpoint-args --port 5000
    # a transformers NemotronH directory (tokenizer.json inside is used)
    python tools/run_text_generation_server.py --hf-model ./nemotron-h-dir --port 5000
    # tensor parallel: rank 0 serves, the other ranks follow
    torchrun --nproc_per_node 4 tools/run_text_generation_server.py --load ckpt --tensor-model-parallel-size 4

Then ``python tools/text_generation_cli.py 127.0.0.1:5000``. ``--help`` lists every flag; see
``megatron_hybrid/inference/server.py`` for the request formats.
"""

from __future__ import annotations

import os
import sys

sys.path.append(os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_hybrid.inference.server_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
