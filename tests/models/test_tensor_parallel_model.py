"""Whole-model tensor parallelism: a MambaModel at TP = 2 and TP = 4 computes what the TP = 1 model computes.

Every check runs in real processes joined by gloo groups (``run_distributed``), one run per TP size that goes through
every case, because starting ranks is the expensive part. The TP = 1 reference is built once in the test process with
the same seed; the ranks send back their (gathered) results and the comparisons happen here, so a failure names the
case, the path and the parameter.

Cases (all with the three layer types, pattern ``M*-M-*``, GQA 8 heads / 4 query groups, 8 Mamba heads in 4 groups,
a vocabulary of 100 padded to 112 by ``make_vocab_size_divisible_by=16``, batch 2 x sequence 32):

* ``swiglu_rope_tied``: SwiGLU MLP, RoPE, tied embeddings, no sequence parallelism;
* ``sqrelu_sp_untied_bias``: squared-ReLU MLP, no position embedding, untied output layer, linear biases (so the
  row-parallel biases are sequence-parallel parameters too), sequence parallelism;
* ``swiglu_rope_sp_packed``: SwiGLU, RoPE, sequence parallelism and packed documents (``seq_idx``).

For each case both paths run forward and backward: logits (``model(ids)``, gathered over TP, padding removed;
objective ``sum(logits * probe)``) and loss (``model(ids, labels=...)``, vocab-parallel cross entropy over the padded
vocabulary; objective ``sum(loss * weights)``). Checked: the outputs of every rank, and every parameter's gradient
gathered to its full TP = 1 shape (``unshard_tensors``) after ``allreduce_sequence_parallel_grads``.

Tolerance: ``max|tp - ref| <= 1e-5 * max|ref|`` for every tensor (outputs and each parameter's gradient), i.e. 1e-5
relative to the tensor's largest entry, so a small gradient (the Mamba ``dt_bias`` / ``A_log`` ones are ~1e-3) is
held to the same relative accuracy as a large one. Observed: <= 2e-6. ``init_method_std=0.05`` makes the logits O(1)
(larger stds drive the recurrence into a regime where float32 round-off alone is ~1e-5). Weights built with the same
seed at any TP size, state-dict gathering and loading are pure data movement and are checked bit-exactly.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from megatron_hybrid.config import HybridConfig
from megatron_hybrid.models.mamba_model import MambaModel
from megatron_hybrid.parallel.grads import allreduce_sequence_parallel_grads, sequence_parallel_parameters
from megatron_hybrid.parallel.sharding import (
    gather_full_state_dict,
    is_tensor_parallel,
    shard_state_dict,
    shard_tensor,
    unshard_tensors,
)
from megatron_hybrid.parallel.state import ParallelGroups, initialize_parallel_groups
from megatron_hybrid.parallel.testing import run_distributed

TOL = 1e-5
SEED = 1234
BATCH, SEQ = 2, 32

BASE = dict(
    num_layers=6,
    hybrid_override_pattern="M*-M-*",
    hidden_size=64,
    vocab_size=100,
    make_vocab_size_divisible_by=16,  # 112 rows: 28 per rank at TP = 4, the last 12 of rank 3 are padding
    num_attention_heads=8,
    num_query_groups=4,
    kv_channels=16,
    ffn_hidden_size=96,
    mamba_num_heads=8,
    mamba_head_dim=16,
    mamba_num_groups=4,
    mamba_state_dim=16,
    mamba_chunk_size=16,
    init_method_std=0.05,
)

CASES: dict[str, dict[str, Any]] = {
    "swiglu_rope_tied": dict(activation="swiglu", position_embedding_type="rope"),
    "sqrelu_sp_untied_bias": dict(
        activation="squared_relu",
        sequence_parallel=True,
        untie_embeddings_and_output_weights=True,
        add_bias_linear=True,
    ),
    "swiglu_rope_sp_packed": dict(activation="swiglu", position_embedding_type="rope", sequence_parallel=True),
}
PACKED = {"swiglu_rope_sp_packed"}
PATHS = ("logits", "loss")


def _config(case: str) -> HybridConfig:
    return HybridConfig(**BASE, **CASES[case])


def _build(case: str, groups: ParallelGroups, seed: int = SEED) -> MambaModel:
    torch.manual_seed(seed)
    model = MambaModel(_config(case), groups)
    if CASES[case].get("add_bias_linear"):
        # Biases start at zero; give them values so that they matter: the same full tensor on every rank, drawn from
        # a private generator in parameter order (identical at every TP size), of which each rank keeps its shard.
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if not name.endswith(".bias") or ".conv1d." in name:
                    continue
                full_shape = list(param.shape)
                if is_tensor_parallel(param):
                    full_shape[param.tp_dim] *= groups.tp_size
                full = 0.5 * torch.randn(full_shape, generator=generator)
                if is_tensor_parallel(param):
                    full = shard_tensor(full, param.tp_dim, param.tp_components, groups.tp_rank, groups.tp_size)
                param.copy_(full)
    return model


def _inputs(case: str) -> dict[str, torch.Tensor]:
    """Token ids, labels, seq_idx (packed case only) and the probes of the two backward objectives."""
    generator = torch.Generator().manual_seed(99)
    vocab = BASE["vocab_size"]
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=generator)
    inputs = {
        "ids": ids,
        "labels": torch.randint(0, vocab, (BATCH, SEQ), generator=generator),
        "logits_probe": torch.randn(BATCH, SEQ, vocab, generator=generator),
        "loss_weights": torch.rand(BATCH, SEQ, generator=generator),
    }
    if case in PACKED:
        # Documents of 10, 15, 7 and 20, 12 tokens: boundaries fall inside chunks and inside sequence-parallel slices.
        inputs["seq_idx"] = torch.tensor([[0] * 10 + [1] * 15 + [2] * 7, [0] * 20 + [1] * 12], dtype=torch.int32)
    return inputs


def _run_path(model: MambaModel, inputs: dict[str, torch.Tensor], path: str) -> torch.Tensor:
    """Forward + backward of one path; returns the detached output."""
    model.zero_grad(set_to_none=True)
    seq_idx = inputs.get("seq_idx")
    if path == "logits":
        out = model(inputs["ids"], seq_idx=seq_idx)
        (out * inputs["logits_probe"]).sum().backward()
    else:
        out = model(inputs["ids"], labels=inputs["labels"], seq_idx=seq_idx)
        (out * inputs["loss_weights"]).sum().backward()
    return out.detach()


def _full_grads(model: nn.Module, groups: ParallelGroups) -> dict[str, torch.Tensor]:
    """Every parameter's gradient, tensor-parallel ones all-gathered and unsharded to their TP = 1 shape."""
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad.detach().contiguous()
        if is_tensor_parallel(param) and groups.tp_size > 1:
            shards = [torch.empty_like(grad) for _ in range(groups.tp_size)]
            dist.all_gather(shards, grad, group=groups.tp)
            grad = unshard_tensors(shards, param.tp_dim, param.tp_components)
        grads[name] = grad.clone()
    return grads


# ---------------------------------------------------------------------------------------------------------------------
# What every rank does.


class _Marked(nn.Module):
    """Parameters of two dtypes, some marked sequence-parallel, one marked but without a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(3, 2))
        self.b = nn.Parameter(torch.zeros(5, dtype=torch.float64))
        self.c = nn.Parameter(torch.zeros(4))
        self.unused = nn.Parameter(torch.zeros(2))
        self.plain = nn.Parameter(torch.zeros(6))
        for param in (self.a, self.b, self.c, self.unused):
            param.sequence_parallel = True


def _check_grad_helper(rank: int, groups: ParallelGroups) -> dict[str, Any]:
    """``allreduce_sequence_parallel_grads`` on a hand-made module: what it sums, what it leaves, how many calls."""
    module = _Marked()
    for name in ("a", "b", "c", "plain"):
        param = getattr(module, name)
        param.grad = torch.full_like(param, float(rank + 1)) * torch.arange(1, param.numel() + 1).view_as(param)
    marked = {id(p) for p in sequence_parallel_parameters(module)}
    calls = []
    original = dist.all_reduce

    def counting_all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append((tensor.dtype, tensor.numel()))
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        allreduce_sequence_parallel_grads(module, groups)
    finally:
        dist.all_reduce = original
    return {
        "calls": calls,
        "grads": {name: getattr(module, name).grad for name in ("a", "b", "c", "plain")},
        "unused_grad": module.unused.grad,
        "marked": [name for name, p in module.named_parameters() if id(p) in marked],
    }


def _tp_worker(rank: int, world_size: int, reference_states: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    groups = initialize_parallel_groups(tp=world_size)
    assert groups.tp_size == world_size
    result: dict[str, Any] = {"grad_helper": _check_grad_helper(rank, groups), "cases": {}}
    for case in CASES:
        model = _build(case, groups)
        inputs = _inputs(case)
        out: dict[str, Any] = {"outputs": {}, "grads": {}, "sp_grads_before_reduce": {}}
        # Same seed -> the TP = 1 weights (gathered), on every rank.
        out["gathered_init"] = gather_full_state_dict(model, groups)
        for path in PATHS:
            out["outputs"][path] = _run_path(model, inputs, path)
            out["sp_grads_before_reduce"][path] = {
                name: p.grad.clone() for name, p in model.named_parameters() if getattr(p, "sequence_parallel", False)
            }
            allreduce_sequence_parallel_grads(model, groups)
            grads = _full_grads(model, groups)
            if rank == 0:  # identical on every rank after the gather; send one copy
                out["grads"][path] = grads
        # Loading the parent's full state dict into a model built from another seed gives the same model.
        other = _build(case, groups, seed=SEED + 7)
        shard_state_dict(other, reference_states[case], groups.tp_rank, groups.tp_size)
        with torch.no_grad():
            out["loaded_logits"] = other(inputs["ids"], seq_idx=inputs.get("seq_idx"))
        if rank != 0:
            del out["gathered_init"]
        result["cases"][case] = out
    return result


# ---------------------------------------------------------------------------------------------------------------------
# The TP = 1 reference, computed once per case in the test process.


@functools.cache
def _reference(case: str) -> dict[str, Any]:
    model = _build(case, ParallelGroups.single())
    inputs = _inputs(case)
    ref: dict[str, Any] = {"state": {k: v.clone() for k, v in model.state_dict().items()}, "outputs": {}, "grads": {}}
    for path in PATHS:
        ref["outputs"][path] = _run_path(model, inputs, path)
        ref["grads"][path] = {name: p.grad.clone() for name, p in model.named_parameters()}
    return ref


def _err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|actual - expected| / max|expected|`` (the file's tolerance measure)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a, b = actual.double(), expected.double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_model_matches_tp1(tp: int) -> None:
    references = {case: _reference(case) for case in CASES}
    results = run_distributed(_tp_worker, tp, {case: ref["state"] for case, ref in references.items()}, timeout=240)

    # The gradient helper: one flat all-reduce per dtype, marked grads summed over ranks, others untouched.
    rank_sum = tp * (tp + 1) / 2
    for rank, result in enumerate(results):
        helper = result["grad_helper"]
        assert helper["marked"] == ["a", "b", "c", "unused"]
        assert helper["calls"] == [(torch.float32, 6 + 4), (torch.float64, 5)], helper["calls"]
        for name in ("a", "b", "c"):
            grad = helper["grads"][name]
            expected = rank_sum * torch.arange(1, grad.numel() + 1, dtype=grad.dtype).view_as(grad)
            assert torch.equal(grad, expected), (rank, name, grad)
        plain = helper["grads"]["plain"]
        assert torch.equal(plain, (rank + 1) * torch.arange(1, 7, dtype=plain.dtype)), (rank, plain)
        assert helper["unused_grad"] is None

    worst: dict[str, float] = {}
    for case, ref in references.items():
        sequence_parallel = CASES[case].get("sequence_parallel", False)
        rank0 = results[0]["cases"][case]

        # A TP = N model built with the TP = 1 seed holds exactly the TP = 1 weights.
        gathered = rank0["gathered_init"]
        assert gathered.keys() == ref["state"].keys()
        for name, tensor in ref["state"].items():
            assert torch.equal(gathered[name], tensor), f"{case}: TP={tp} init of {name} differs from TP=1"

        for path in PATHS:
            for rank, result in enumerate(results):
                err = _err(result["cases"][case]["outputs"][path], ref["outputs"][path])
                worst[f"{case}/{path}/output"] = max(worst.get(f"{case}/{path}/output", 0.0), err)
                assert err <= TOL, f"{case}: TP={tp} rank {rank} {path} deviates from TP=1 by {err:.3g}"

            grads = rank0["grads"][path]
            assert grads.keys() == ref["grads"][path].keys()
            for name, expected in ref["grads"][path].items():
                err = _err(grads[name], expected)
                worst[f"{case}/{path}/grad"] = max(worst.get(f"{case}/{path}/grad", 0.0), err)
                assert err <= TOL, f"{case}: TP={tp} {path}-path gradient of {name} deviates by {err:.3g}"

            # Sequence-parallel parameters: each rank's own gradient is a partial sum that only the reduction fixes.
            partials = [result["cases"][case]["sp_grads_before_reduce"][path] for result in results]
            names = sorted(partials[0])
            if sequence_parallel:
                assert any(name.endswith("norm.weight") for name in names) and "decoder.final_norm.weight" in names
                if CASES[case].get("add_bias_linear"):
                    assert any(name.endswith("linear_fc2.bias") for name in names)
                    assert any(name.endswith("linear_proj.bias") for name in names)
                for name in names:
                    expected = ref["grads"][path][name]
                    assert _err(sum(p[name] for p in partials), expected) <= TOL, (case, path, name)
                assert max(_err(partials[0][name], ref["grads"][path][name]) for name in names) > 1e-3
            else:
                assert names == [], f"{case}: no parameter should be sequence-parallel without sequence parallelism"

        for rank, result in enumerate(results):
            loaded = result["cases"][case]["loaded_logits"]
            assert _err(loaded, ref["outputs"]["logits"]) <= TOL, f"{case}: rank {rank} after shard_state_dict"
    print(f"\nTP={tp}: worst deviation from TP=1 per case/path (tolerance {TOL:g}):")
    for key, err in worst.items():
        print(f"  {key:45s} {err:.2e}")


def test_sequence_parallel_grad_reduction_is_a_no_op_without_tensor_parallelism() -> None:
    """TP = 1: no communication (torch.distributed is not even initialised here) and the gradients are untouched."""
    module = _Marked()
    module.a.grad = torch.ones(3, 2)
    allreduce_sequence_parallel_grads(module, ParallelGroups.single())
    assert torch.equal(module.a.grad, torch.ones(3, 2)) and module.b.grad is None
