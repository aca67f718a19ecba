"""The training loop: weight-decay groups, accumulation / data-parallel / tensor-parallel equivalence, NaN skipping,
metrics, evaluation. Multi-rank runs use real gloo process groups (run_distributed)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from training_helpers import BYTE_VOCAB, TINY_MODEL_FLAGS, data_flags, run_flags

import megatron_hybrid.training.loop as loop_module
from megatron_hybrid.checkpoint import load_checkpoint
from megatron_hybrid.config import HybridConfig
from megatron_hybrid.models.mamba_model import MambaModel
from megatron_hybrid.parallel.sharding import gather_full_state_dict
from megatron_hybrid.parallel.testing import run_distributed
from megatron_hybrid.training import (
    ConfigError,
    TrainingAborted,
    TrainOptimizer,
    parse_args,
    pretrain,
    weight_decay_groups,
)
from megatron_hybrid.training.cuda_graphs import LayerGraphs, enable_layer_graphs


@pytest.fixture(autouse=True)
def _private_triton_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))


def _losses(result) -> list[float]:
    return [r["lm_loss"] for r in result.history]


def _run_ranks(rank: int, world_size: int, argv: list[str]) -> dict:
    """Body of a multi-rank run: train, return losses, grad norms and the full (TP=1) state dict."""
    result = pretrain(argv)
    full = gather_full_state_dict(result.model, result.model.groups)
    return {"losses": _losses(result), "norms": [r["grad_norm"] for r in result.history],
            "state": {k: v.clone() for k, v in full.items()}}


def test_weight_decay_groups_follow_megatron() -> None:
    run = parse_args(run_flags("unused"))
    model = MambaModel(run.model_config(BYTE_VOCAB))
    decay, no_decay = weight_decay_groups(model.named_parameters())
    assert decay["wd_mult"] == 1.0 and no_decay["wd_mult"] == 0.0
    skipped = set(no_decay["param_names"])
    for name, param in model.named_parameters():
        no_wd = (param.ndim == 1 or name.endswith((".A_log", ".D", ".dt_bias", ".bias")))
        assert (name in skipped) == no_wd, name
    assert "decoder.layers.0.mixer.A_log" in skipped and "decoder.layers.0.mixer.conv1d.bias" in skipped
    assert "decoder.final_norm.weight" in skipped and "decoder.layers.0.mixer.norm.weight" in skipped
    assert "decoder.layers.0.mixer.in_proj.weight" in decay["param_names"]
    assert "embedding.word_embeddings.weight" in decay["param_names"]


def test_cpu_optimizer_is_torch_fused_adamw_with_the_per_tensor_results() -> None:
    """On CPU the trainer takes torch's fused AdamW; three steps of it match the per-tensor implementation."""
    run = parse_args(run_flags("unused"))
    model = MambaModel(run.model_config(BYTE_VOCAB))
    reference = MambaModel(run.model_config(BYTE_VOCAB))
    reference.load_state_dict(model.state_dict())
    optimizer = TrainOptimizer(model, model.groups, lr=1e-2)
    assert optimizer.optimizer.defaults.get("fused") is True
    per_tensor = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0, foreach=False)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, q in zip(model.parameters(), reference.parameters()):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        optimizer.optimizer.step()
        per_tensor.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


def test_gradient_accumulation_equals_one_big_micro_batch(byte_data: str) -> None:
    accumulated = pretrain(run_flags(byte_data, iters=3, micro=2, global_batch=4))
    single = pretrain(run_flags(byte_data, iters=3, micro=4, global_batch=4))
    assert _losses(accumulated) == pytest.approx(_losses(single), rel=1e-5)
    for (name, a), (_, b) in zip(accumulated.model.state_dict().items(), single.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("distributed_optimizer", [False, True])
def test_data_parallel_equals_single_process(byte_data: str, distributed_optimizer: bool, tmp_path) -> None:
    extra = ["--use-distributed-optimizer"] if distributed_optimizer else []
    argv = run_flags(byte_data, iters=2, micro=2, global_batch=4, extra=extra + ["--save", str(tmp_path / "dp2")])
    reference = pretrain(run_flags(byte_data, iters=2, micro=2, global_batch=4))
    ranks = run_distributed(_run_ranks, 2, argv, timeout=180)
    assert ranks[0]["losses"] == ranks[1]["losses"]
    assert ranks[0]["losses"] == pytest.approx(_losses(reference), rel=1e-5)
    for name, value in reference.model.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][name], value, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(ranks[1]["state"][name], ranks[0]["state"][name], rtol=0, atol=0, msg=name)
    # the (ZeRO-sharded) optimizer states of the DP=2 checkpoint load into a single process: every parameter's
    # Adam state is there and equals the single-process run's
    if distributed_optimizer:
        assert len(list((tmp_path / "dp2" / "iter_0000002").glob("optim_*.safetensors"))) == 2
    model = MambaModel(reference.config)
    optimizer = TrainOptimizer(model, model.groups, lr=1.0)
    load_checkpoint(tmp_path / "dp2", model, optimizer=optimizer)
    expected = reference.optimizer.named_states()
    assert optimizer.named_states().keys() == expected.keys()
    for name, states in optimizer.named_states().items():
        for key, value in states.items():
            torch.testing.assert_close(value, expected[name][key], rtol=1e-4, atol=1e-7, msg=(name, key))


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tensor_parallel_step_equals_tp1(byte_data: str, sequence_parallel: bool) -> None:
    extra = ["--tensor-model-parallel-size", "2"] + (["--sequence-parallel"] if sequence_parallel else [])
    # the vocabulary is padded to a multiple of divisor x TP (Megatron's rule): pad the reference the same way
    reference = pretrain(run_flags(byte_data, iters=2, extra=["--make-vocab-size-divisible-by", "16"]))
    ranks = run_distributed(_run_ranks, 2, run_flags(byte_data, iters=2, extra=extra), timeout=180)
    assert ranks[0]["losses"] == ranks[1]["losses"]
    assert ranks[0]["losses"] == pytest.approx(_losses(reference), rel=1e-5)
    # the global gradient norm counts TP-replicated parameters once
    assert ranks[0]["norms"] == pytest.approx([r["grad_norm"] for r in reference.history], rel=1e-4)
    for name, value in reference.model.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_nan_steps_are_skipped_counted_and_abort(byte_data: str, monkeypatch, tmp_path) -> None:
    real = loop_module.forward_step
    calls = {"n": 0}
    poisoned = {3, 4}  # micro-batch calls (micro 2 x acc 2 => iteration 2 is calls 3 and 4)

    def flaky(model, batch, bf16, hidden_states=None):
        calls["n"] += 1
        loss = real(model, batch, bf16, hidden_states)
        return loss * float("nan") if calls["n"] in poisoned else loss

    monkeypatch.setattr(loop_module, "forward_step", flaky)
    metrics = tmp_path / "m.jsonl"
    result = pretrain(run_flags(byte_data, iters=4, extra=["--metrics-jsonl", str(metrics)]))
    assert result.skipped_iterations == 1
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    assert math.isnan(records[1]["lm_loss"]) and records[1]["nan_iterations"] == 1
    assert all(math.isfinite(r["lm_loss"]) for r in records if r["iteration"] != 2)
    assert records[1]["lr"] == records[2]["lr"]  # a skipped step does not advance the schedule

    calls["n"] = 0
    poisoned.clear()
    poisoned.update(range(5, 100))  # every step from iteration 3 on
    with pytest.raises(TrainingAborted, match="3 consecutive iterations .* --max-consecutive-nan-skips 2"):
        pretrain(run_flags(byte_data, iters=10, extra=["--max-consecutive-nan-skips", "2"]))


def test_metrics_evaluation_and_loss_decrease(byte_data: str, tmp_path, capsys) -> None:
    metrics = tmp_path / "metrics.jsonl"
    seen = []
    argv = run_flags(byte_data, iters=12, micro=4, global_batch=8, seq=64,
                     extra=["--eval-iters", "2", "--eval-interval", "6", "--log-interval", "3", "--metrics-jsonl",
                            str(metrics), "--tensorboard-dir", str(tmp_path / "tb")])
    pretrain(argv, on_iteration=seen.append)
    assert [s["iteration"] for s in seen] == list(range(1, 13)) and seen[-1]["eta_s"] == 0
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [r for r in lines if r["kind"] == "train"]
    valid = [r for r in lines if r["kind"] == "valid"]
    assert [r["iteration"] for r in train] == [3, 6, 9, 12] and [r["iteration"] for r in valid] == [6, 12]
    for record in train:
        for key in ("iteration", "lm_loss", "lr", "grad_norm", "tokens_per_sec", "tflops_per_device", "memory_gb"):
            assert record[key] is not None, key
    assert train[-1]["lm_loss"] < train[0]["lm_loss"] - 0.3
    assert valid[-1]["lm_loss"] < valid[0]["lm_loss"]
    assert valid[0]["ppl"] == pytest.approx(math.exp(valid[0]["lm_loss"]))
    assert train[0]["lm_loss"] < math.log(BYTE_VOCAB) + 0.5
    out = capsys.readouterr()
    assert "lm loss PPL" in out.out and " iteration        3/      12" in out.out
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert "TensorBoard is not installed" in out.err


def test_train_sh_tiny_model_flags_are_consistent() -> None:
    assert parse_args(TINY_MODEL_FLAGS + data_flags("x") + ["--seq-length", "8", "--train-iters", "1", "--lr", "1"])


def test_finetune_exit_interval_and_missing_checkpoint(byte_data: str, tmp_path) -> None:
    save = tmp_path / "ck"
    pretrain(run_flags(byte_data, iters=3, extra=["--save", str(save)]), verbose=False)
    tuned = pretrain(run_flags(byte_data, iters=6, extra=["--load", str(save), "--finetune", "--exit-interval", "2"]),
                     verbose=False)
    assert tuned.iteration == 2 and [r["iteration"] for r in tuned.history] == [1, 2]
    resumed = pretrain(run_flags(byte_data, iters=5, extra=["--load", str(save)]), verbose=False)
    assert [r["iteration"] for r in resumed.history] == [4, 5]
    with pytest.raises(TrainingAborted, match="holds no checkpoint"):
        pretrain(run_flags(byte_data, iters=2, extra=["--load", str(tmp_path / "none"),
                                                      "--exit-on-missing-checkpoint"]), verbose=False)


def _tiny_cpu_model() -> MambaModel:
    """A two-layer ``M-`` model on the CPU, for the CUDA-graph checks that need no GPU."""
    return MambaModel(HybridConfig(num_layers=2, hybrid_override_pattern="M-", hidden_size=32, vocab_size=64,
                                   ffn_hidden_size=64, mamba_state_dim=16, mamba_head_dim=8, mamba_num_groups=2))


def test_cuda_graphs_are_refused_on_cpu(byte_data: str) -> None:
    with pytest.raises(ConfigError, match="--enable-cuda-graph needs a CUDA device; this run is on cpu"):
        pretrain(run_flags(byte_data, iters=2, extra=["--enable-cuda-graph"]), verbose=False)
    model = _tiny_cpu_model()
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device; it is on cpu"):
        enable_layer_graphs(model)
    assert model.decoder.layer_graphs is None


def test_layer_graphs_give_parameters_gradients_to_accumulate_into() -> None:
    """A graph's backward hands out parameter gradients as views of its static buffers; autograd keeps such a view as
    ``.grad`` when ``.grad`` is empty, and the next micro-batch's replay overwrites it before adding (the CUDA run of
    test_cuda_graph_training_follows_eager_training caught exactly that). ``LayerGraphs`` therefore fills every missing
    ``.grad`` with zeros before a replay. Here both halves on CPU: the aliasing itself, with a stand-in backward that
    returns a view of one static buffer, and the fill (existing gradients untouched)."""
    weight = torch.nn.Parameter(torch.ones(3))
    static = torch.zeros(3)

    class StaticGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            return x * 1.0

        @staticmethod
        def backward(ctx, grad):
            static.copy_(grad)  # what a backward graph's replay does
            return grad, static.detach()

    def accumulate() -> list[float]:
        for value in (1.0, 2.0):
            StaticGradient.apply(torch.full((3,), value, requires_grad=True), weight).backward(torch.full((3,), value))
        return weight.grad.tolist()

    assert accumulate() == [4.0] * 3  # 2 + 2: the first micro-batch's gradient was overwritten
    weight.grad = torch.zeros(3)
    assert accumulate() == [3.0] * 3

    model = _tiny_cpu_model()
    graphs = LayerGraphs(list(model.decoder.layers.values()))
    kept = torch.full_like(model.decoder.layers["1"].mlp.linear_fc1.weight, 7.0)
    model.decoder.layers["1"].mlp.linear_fc1.weight.grad = kept
    graphs._give_parameters_gradients()
    params = [p for layer in model.decoder.layers.values() for p in layer.parameters()]
    filled = [p.grad for p in params if p.grad is not kept]
    assert len(filled) == len(params) - 1 and all(g is not None and not g.any() for g in filled)
    assert len({g.untyped_storage().data_ptr() for g in filled}) == 1  # one buffer (per dtype; all float32 here)
    assert torch.equal(model.decoder.layers["1"].mlp.linear_fc1.weight.grad, torch.full_like(kept, 7.0))
