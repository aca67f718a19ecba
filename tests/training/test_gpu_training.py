"""The training loop on a CUDA device: bf16 autocast with fp32 master weights, fused AdamW, MFU from the device
table, GPU memory logging, TensorBoard, checkpoint save and resume onto the GPU."""

from __future__ import annotations

import json
import math

import pytest
import torch
from training_helpers import run_flags, write_byte_dataset

from megatron_hybrid.training import pretrain

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


def test_bf16_training_resume_on_cuda(cuda, tmp_path) -> None:
    data = write_byte_dataset(tmp_path / "stdlib")
    save = tmp_path / "ck"
    extra = ["--bf16", "--save", str(save), "--save-interval", "10", "--log-interval", "5",
             "--tensorboard-dir", str(tmp_path / "tb"), "--eval-iters", "1", "--eval-interval", "10"]
    result = pretrain(run_flags(data, iters=20, micro=4, global_batch=8, seq=256, extra=extra))
    params = list(result.model.parameters())
    assert all(p.is_cuda and p.dtype == torch.float32 for p in params)  # fp32 master weights on the GPU
    assert result.optimizer.optimizer.defaults.get("fused") is True
    train = [json.loads(x) for x in open(save / "metrics.jsonl") if '"train"' in x]
    assert all(math.isfinite(r["lm_loss"]) for r in train) and train[-1]["lm_loss"] < train[0]["lm_loss"]
    assert train[-1]["mfu"] is not None and train[-1]["memory_gb"] > 0
    resumed = pretrain(run_flags(data, iters=25, micro=4, global_batch=8, seq=256,
                                 extra=extra + ["--load", str(save)]))
    assert resumed.history[0]["iteration"] == 25 and math.isfinite(resumed.history[0]["lm_loss"])


def test_cuda_graph_training_follows_eager_training(cuda, tmp_path) -> None:
    """--enable-cuda-graph through the whole loop (gradient accumulation of 2, evaluation in between, which runs the
    layers eagerly): the same losses as the eager run, step by step, and the same weights at the end."""
    data = write_byte_dataset(tmp_path / "stdlib")
    extra = ["--bf16", "--eval-iters", "1", "--eval-interval", "3"]
    eager = pretrain(run_flags(data, iters=6, micro=2, global_batch=4, seq=256, extra=extra))
    graphed = pretrain(run_flags(data, iters=6, micro=2, global_batch=4, seq=256,
                                 extra=extra + ["--enable-cuda-graph"]))
    assert graphed.model.decoder.layer_graphs.captured
    for e, g in zip(eager.history, graphed.history, strict=True):
        assert abs(g["lm_loss"] - e["lm_loss"]) <= 1e-5 * abs(e["lm_loss"]), (e, g)
    for (name, p_e), p_g in zip(eager.model.named_parameters(), graphed.model.parameters()):
        assert torch.allclose(p_g, p_e, rtol=1e-5, atol=1e-6), name
