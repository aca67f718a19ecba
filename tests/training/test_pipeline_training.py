"""Pipeline-parallel training through pretrain(): the same losses as one stage, and checkpoints that move between
pipeline sizes (weights and Adam states, tied embeddings) with identical logits. Real gloo processes."""

from __future__ import annotations

import math

import pytest
import torch
from training_helpers import run_flags

import megatron_hybrid.training.loop as loop_module
from megatron_hybrid.checkpoint import load_checkpoint, load_model_for_inference
from megatron_hybrid.models.pipeline_stage import build_pipeline_stage
from megatron_hybrid.parallel.pipeline import StageIO, forward_only_pipelining
from megatron_hybrid.parallel.testing import run_distributed
from megatron_hybrid.training import ConfigError, parse_args, pretrain

SEQ = 32


@pytest.fixture(autouse=True)
def _private_triton_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))


def _losses(result) -> list[float]:
    return [r["lm_loss"] for r in result.history]


def _probe() -> torch.Tensor:
    return torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(5))


def _pipeline_logits(model, probe: torch.Tensor) -> torch.Tensor | None:
    """Logits of ``probe`` through the pipeline (on the last stage; None elsewhere)."""
    io = StageIO((SEQ, probe.shape[0], model.config.hidden_size), torch.float32, torch.device("cpu"))
    model.eval()
    outputs = forward_only_pipelining(
        lambda index, hidden: model(probe if model.pre_process else None, hidden_states=hidden), 1, model.groups, io)
    return outputs[0] if outputs else None


def _poison_first_stage_gradients(iteration: int) -> None:
    """Make the first stage's gradients (only) NaN in ``iteration`` (2 micro-batches per iteration): the loss stays
    finite, so only the pipeline-wide gradient norm can tell the last stage to skip the step too."""
    real = loop_module.forward_step
    calls = {"n": 0}

    def poisoned(model, batch, bf16, hidden_states=None):
        output = real(model, batch, bf16, hidden_states)
        calls["n"] += 1
        if model.pre_process and (calls["n"] + 1) // 2 == iteration:
            output.register_hook(lambda grad: grad * float("nan"))
        return output

    loop_module.forward_step = poisoned


def _pp2_ranks(rank: int, world_size: int, train_argv: list[str], resume_argv: list[str], reference_dir: str,
               nan_argv: list[str]) -> dict:
    """Train at pp=2 (saving), load the pp=1 checkpoint into fresh stages, resume the pp=1 run at pp=2, then a run
    whose first stage alone sees NaN gradients."""
    trained = pretrain(train_argv, verbose=False)
    logits = _pipeline_logits(trained.model, _probe())
    groups = trained.model.groups
    torch.manual_seed(1234)  # weights unlike the checkpoint's: the load must overwrite every one
    stage = build_pipeline_stage(trained.config, groups)
    load_checkpoint(reference_dir, stage, groups, iteration=3, load_optim=False, load_rng=False)
    loaded_logits = _pipeline_logits(stage, _probe())
    resumed = pretrain(resume_argv, verbose=False)
    _poison_first_stage_gradients(iteration=2)
    nan_run = pretrain(nan_argv, verbose=False)
    return {"losses": _losses(trained), "logits": logits, "loaded_logits": loaded_logits,
            "resumed": _losses(resumed), "layer_range": trained.model.decoder.layer_range,
            "nan_skipped": [r["skipped_iterations"] for r in nan_run.history],
            "nan_losses": _losses(nan_run), "valid": trained.evaluations}


def test_pipeline_training_matches_one_stage_and_checkpoints_reshard(byte_data: str, tmp_path) -> None:
    reference_dir, pp2_dir = str(tmp_path / "pp1"), str(tmp_path / "pp2")
    # pp=1: 5 iterations, checkpoints at 3 and 5 (tied embeddings, Adam states saved). Resumed runs go on for two
    # iterations: the second one's loss depends on the restored Adam states (the first only on the weights).
    evaluation = ["--eval-iters", "2", "--eval-interval", "3"]
    reference = pretrain(run_flags(byte_data, iters=5, extra=["--save", reference_dir, "--save-interval", "3"]
                                   + evaluation),
                         verbose=False)
    pp2 = ["--pipeline-model-parallel-size", "2"]
    # 3 of the same 5-iteration schedule, then a checkpoint (at exit)
    train_argv = run_flags(byte_data, iters=5, extra=pp2 + evaluation + ["--save", pp2_dir, "--exit-interval", "3"])
    resume_argv = run_flags(byte_data, iters=5, extra=pp2 + ["--load", reference_dir, "--ckpt-step", "3"])
    nan_argv = run_flags(byte_data, iters=3, extra=pp2)
    ranks = run_distributed(_pp2_ranks, 2, train_argv, resume_argv, reference_dir, nan_argv, timeout=180)

    expected = _losses(reference)
    assert [r["layer_range"] for r in ranks] == [(0, 2), (2, 4)]
    # (b) the same lm_loss per iteration as one stage, on every stage (broadcast from the last)
    for r in ranks:
        assert r["losses"] == pytest.approx(expected[:3], rel=1e-5, abs=0)
    # pp=1 checkpoint (weights, Adam states, schedule, data position) resumed at pp=2: iterations 4, 5 as at pp=1
    for r in ranks:
        assert r["resumed"] == pytest.approx(expected[3:], rel=1e-5, abs=0)
    # evaluation runs through the forward-only schedule: the validation loss of iteration 3 as at pp=1
    for r in ranks:
        assert [(e["kind"], e["iteration"]) for e in r["valid"]] == [("valid", 3)]
        assert r["valid"][0]["lm_loss"] == pytest.approx(reference.evaluations[0]["lm_loss"], rel=1e-5, abs=0)
    # NaN gradients on the first stage only: every stage skips iteration 2 (the norm is summed over stages)
    for r in ranks:
        assert r["nan_skipped"] == [0, 1, 1]
        assert r["nan_losses"][0] == pytest.approx(expected[0], rel=1e-5)
        assert math.isnan(r["nan_losses"][1]) and math.isfinite(r["nan_losses"][2])
    assert ranks[0]["nan_losses"][2] == ranks[1]["nan_losses"][2]

    probe = _probe()
    # (c) the pp=2 checkpoint loads at pp=1 with the pp=2 model's logits
    assert ranks[0]["logits"] is None and ranks[0]["loaded_logits"] is None
    model, config, _ = load_model_for_inference(pp2_dir)
    with torch.no_grad():
        torch.testing.assert_close(model(probe), ranks[1]["logits"], rtol=1e-6, atol=1e-6)
    # ... and the pp=1 checkpoint loads at pp=2 with the pp=1 model's logits
    model3, _, _ = load_model_for_inference(reference_dir, iteration=3)
    with torch.no_grad():
        torch.testing.assert_close(ranks[1]["loaded_logits"], model3(probe), rtol=1e-6, atol=1e-6)
    # the pp=2 checkpoint (its Adam states included) resumes at pp=1 like the pp=1 run
    resumed = pretrain(run_flags(byte_data, iters=5, extra=["--load", pp2_dir]), verbose=False)
    assert _losses(resumed) == pytest.approx(expected[3:], rel=1e-5, abs=0)


def test_pipeline_needs_processes_and_a_fitting_layout(byte_data: str) -> None:
    run = parse_args(run_flags(byte_data, extra=["--pipeline-model-parallel-size", "2"]))
    assert run.parallel.pipeline_model_parallel_size == 2
    with pytest.raises(ConfigError, match="--pipeline-model-parallel-size 2 needs as many processes"):
        pretrain(run, verbose=False)
    with pytest.raises(ConfigError, match="2 pipeline stages, but pipeline_size=4"):
        parse_args(run_flags(byte_data, extra=["--pipeline-model-parallel-size", "4",
                                               "--hybrid-override-pattern", "M*|M-"]))


def _losses_and_norms(rank: int, world_size: int, argv: list[str]) -> tuple[list[float], list[float]]:
    result = pretrain(argv, verbose=False)
    return _losses(result), [r["grad_norm"] for r in result.history]


def test_pipeline_with_data_parallel_zero1_matches_one_stage(byte_data: str) -> None:
    reference = pretrain(run_flags(byte_data, iters=3, global_batch=8), verbose=False)
    extra = ["--pipeline-model-parallel-size", "2", "--use-distributed-optimizer"]  # 4 ranks: pp 2 x dp 2
    ranks = run_distributed(_losses_and_norms, 4, run_flags(byte_data, iters=3, global_batch=8, extra=extra),
                            timeout=180)
    for losses, norms in ranks:
        assert losses == pytest.approx(_losses(reference), rel=1e-5, abs=0)
        # the gradient norm sums the stages' squares and counts the tied embedding once
        assert norms == pytest.approx([r["grad_norm"] for r in reference.history], rel=1e-5, abs=0)
