"""Tensor-parallel layers, collectives and vocab-parallel cross entropy at TP 2 and 4 against the TP=1 computation.

Each world size is one multi-process run that performs every check and returns the maximum deviations; the parent
asserts them, so a failure names the check. The TP=1 reference is computed inside each rank with the same layers
built on ``ParallelGroups.single()``: equal seeds must give equal full weights at any TP size.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_hybrid.parallel import mappings
from megatron_hybrid.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_hybrid.parallel.sharding import (
    gather_full_state_dict,
    is_tensor_parallel,
    shard_state_dict,
    shard_tensor,
    unshard_tensors,
)
from megatron_hybrid.parallel.state import ParallelGroups, initialize_parallel_groups
from megatron_hybrid.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron_hybrid.parallel.testing import run_distributed

SINGLE = ParallelGroups.single()
TOL = 1e-6
# Large enough weights that outputs and gradients are O(1), so an absolute tolerance of 1e-6 means something.
INIT = functools.partial(nn.init.normal_, std=0.3)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max deviation of ``a`` from the reference ``b``, relative to ``b``'s scale when that exceeds 1 (float32 has
    ~7 significant digits: an absolute 1e-6 is only meaningful for O(1) values)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


def _gather_grad(param: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """The full gradient of a (possibly sharded) parameter."""
    grad = param.grad.contiguous()
    if not is_tensor_parallel(param) or groups.tp_size == 1:
        return grad
    shards = [torch.empty_like(grad) for _ in range(groups.tp_size)]
    dist.all_gather(shards, grad, group=groups.tp)
    return unshard_tensors(shards, param.tp_dim, param.tp_components)


def _seq_chunk(t: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    return t.chunk(groups.tp_size, dim=0)[groups.tp_rank]


class _MLP(nn.Module):
    def __init__(self, hidden: int, ffn: int, groups: ParallelGroups, sequence_parallel: bool,
                 dtype: torch.dtype) -> None:
        super().__init__()
        # Two components (as a gated fc1 would have) to exercise the per-component split.
        self.fc1 = ColumnParallelLinear(hidden, 2 * ffn, groups=groups, bias=True, sequence_parallel=sequence_parallel,
                                        init_method=INIT, tp_components=[ffn, ffn], dtype=dtype)
        self.fc2 = RowParallelLinear(ffn, hidden, groups=groups, bias=True, sequence_parallel=sequence_parallel,
                                     init_method=INIT, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.gelu(gate) * up)


def _check_mlp(groups: ParallelGroups, sequence_parallel: bool, dtype: torch.dtype, errors: dict[str, float]) -> None:
    tag = ("mlp_sp" if sequence_parallel else "mlp") + ("64" if dtype == torch.float64 else "32")
    s, b, hidden, ffn = 8, 3, 16, 24
    torch.manual_seed(1)
    ref = _MLP(hidden, ffn, SINGLE, False, dtype)
    torch.manual_seed(1)
    tp = _MLP(hidden, ffn, groups, sequence_parallel, dtype)
    # Biases start at zero; make them matter. Identical full tensors on every rank, each keeps its shard.
    torch.manual_seed(2)
    bias1, bias2 = torch.randn(2 * ffn), torch.randn(hidden)
    with torch.no_grad():
        ref.fc1.bias.copy_(bias1)
        ref.fc2.bias.copy_(bias2)
        tp.fc1.bias.copy_(shard_tensor(bias1, 0, [ffn, ffn], groups.tp_rank, groups.tp_size))
        tp.fc2.bias.copy_(bias2)
    x, grad_out = torch.randn(s, b, hidden, dtype=dtype), torch.randn(s, b, hidden, dtype=dtype)

    # Same seed -> exactly the TP=1 weights.
    full = gather_full_state_dict(tp, groups)
    errors[f"{tag}_init_weights"] = max(_max_err(full[k], v) for k, v in ref.state_dict().items())

    x_ref = x.clone().requires_grad_()
    y_ref = ref(x_ref)
    y_ref.backward(grad_out)

    x_tp = (_seq_chunk(x, groups) if sequence_parallel else x).clone().requires_grad_()
    y_tp = tp(x_tp)
    y_tp.backward(_seq_chunk(grad_out, groups) if sequence_parallel else grad_out)

    errors[f"{tag}_output"] = _max_err(y_tp, _seq_chunk(y_ref, groups) if sequence_parallel else y_ref)
    errors[f"{tag}_input_grad"] = _max_err(x_tp.grad, _seq_chunk(x_ref.grad, groups) if sequence_parallel
                                           else x_ref.grad)
    ref_params = dict(ref.named_parameters())
    for name, param in tp.named_parameters():
        grad = _gather_grad(param, groups)
        if getattr(param, "sequence_parallel", False):  # partial over the sequence: the trainer sums it over tp
            assert sequence_parallel and name == "fc2.bias"
            if groups.tp is not None:
                dist.all_reduce(grad, group=groups.tp)
        errors[f"{tag}_grad_{name}"] = _max_err(grad, ref_params[name].grad)


def _check_column_gather_and_row_split(groups: ParallelGroups, errors: dict[str, float]) -> None:
    s, b, hidden = 4, 2, 8
    comps = [8, 8, 4, 4, 4]  # e.g. Mamba in_proj's z, x, B, C, dt
    torch.manual_seed(3)
    ref_col = ColumnParallelLinear(hidden, sum(comps), groups=SINGLE, tp_components=comps, init_method=INIT)
    ref_row = RowParallelLinear(sum(comps), hidden, groups=SINGLE, input_is_parallel=False, init_method=INIT)
    torch.manual_seed(3)
    col = ColumnParallelLinear(hidden, sum(comps), groups=groups, tp_components=comps, init_method=INIT,
                               gather_output=True)
    row = RowParallelLinear(sum(comps), hidden, groups=groups, input_is_parallel=False, init_method=INIT)
    x = torch.randn(s, b, hidden)
    x_ref, x_tp = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_tp = ref_row(ref_col(x_ref)), row(col(x_tp))
    errors["gather_output_row_split_output"] = _max_err(y_tp, y_ref)
    (y_ref * y_ref).sum().backward()
    (y_tp * y_tp).sum().backward()
    errors["gather_output_row_split_input_grad"] = _max_err(x_tp.grad, x_ref.grad)
    # Both layers see the full (replicated) activations here, so each shard's grad is complete without a reduction.
    errors["gather_output_col_weight_grad"] = _max_err(_gather_grad(col.weight, groups), ref_col.weight.grad)
    errors["gather_output_row_weight_grad"] = _max_err(_gather_grad(row.weight, groups), ref_row.weight.grad)


def _check_embedding(groups: ParallelGroups, errors: dict[str, float]) -> None:
    vocab, hidden, b, s = 32, 8, 3, 8
    for reduce_scatter in (False, True):
        tag = "embedding_rs" if reduce_scatter else "embedding"
        torch.manual_seed(4)
        ref = VocabParallelEmbedding(vocab, hidden, groups=SINGLE, init_method=INIT)
        torch.manual_seed(4)
        emb = VocabParallelEmbedding(vocab, hidden, groups=groups, init_method=INIT,
                                     reduce_scatter_embeddings=reduce_scatter)
        ids = torch.randint(0, vocab, (b, s))
        ids[0, :4] = torch.tensor([0, vocab - 1, vocab // 2 - 1, vocab // 2])  # shard boundaries
        out_ref = ref(ids)  # [b, s, h]
        assert out_ref.shape == (b, s, hidden)
        grad_ref = torch.randn_like(out_ref)
        out_ref.backward(grad_ref)
        out = emb(ids)
        if reduce_scatter:  # sequence-first, this rank's sequence chunk
            expected, grad = _seq_chunk(out_ref.transpose(0, 1), groups), _seq_chunk(grad_ref.transpose(0, 1), groups)
        else:
            expected, grad = out_ref, grad_ref
        errors[f"{tag}_output"] = _max_err(out, expected)
        out.backward(grad)
        errors[f"{tag}_weight_grad"] = _max_err(_gather_grad(emb.weight, groups), ref.weight.grad)


def _check_cross_entropy(groups: ParallelGroups, errors: dict[str, float]) -> None:
    s, b, vocab = 6, 3, 40
    torch.manual_seed(5)
    logits = torch.randn(s, b, vocab) * 4
    logits[0, 0] += 1e4  # large logits: must stay finite and exact
    target = torch.randint(0, vocab, (s, b))
    target[0, :] = torch.tensor([0, vocab - 1, vocab // 2])
    weights = torch.rand(s, b)
    local_slice = slice(groups.tp_rank * vocab // groups.tp_size, (groups.tp_rank + 1) * vocab // groups.tp_size)

    for dtype in (torch.float32, torch.bfloat16):
        tag = "ce" if dtype == torch.float32 else "ce_bf16"
        full = logits.to(dtype).detach().clone().requires_grad_()
        loss_ref = F.cross_entropy(full.float().reshape(-1, vocab), target.reshape(-1), reduction="none")
        loss_ref = loss_ref.reshape(s, b)
        (loss_ref * weights).sum().backward()
        local = full.detach()[..., local_slice].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(local, target, groups)
        (loss * weights).sum().backward()
        assert local.grad.dtype == dtype and loss.dtype == torch.float32
        errors[f"{tag}_loss"] = _max_err(loss, loss_ref)
        # bf16 gradients are rounded once more on the way back: compare at bf16 resolution.
        scale = 1.0 if dtype == torch.float32 else 1e-6 / 4e-3
        errors[f"{tag}_grad"] = _max_err(local.grad, full.grad[..., local_slice]) * scale


def _check_mappings(groups: ParallelGroups, errors: dict[str, float]) -> None:
    """Forward and backward of every mapping against explicit formulas."""
    n, r, tp = groups.tp_size, groups.tp_rank, groups.tp
    torch.manual_seed(6)
    per_rank = torch.randn(n, 4 * n, 2 * n)  # identical on every rank; rank q "owns" per_rank[q]
    mine = per_rank[r]

    x = mine.clone().requires_grad_()
    mappings.copy_to_tp(x, tp).backward(mine)
    errors["map_copy_fwd_bwd"] = _max_err(x.grad, per_rank.sum(0))

    x = mine.clone().requires_grad_()
    y = mappings.reduce_from_tp(x, tp)
    y.backward(per_rank[0])
    errors["map_reduce_fwd"] = _max_err(y, per_rank.sum(0))
    errors["map_reduce_bwd"] = _max_err(x.grad, per_rank[0])

    full = per_rank[0]
    x = full.clone().requires_grad_()
    y = mappings.scatter_to_tp(x, tp)
    errors["map_scatter_tp_fwd"] = _max_err(y, full.chunk(n, -1)[r])
    z = mappings.gather_from_tp(y, tp)
    errors["map_gather_tp_fwd"] = _max_err(z, full)
    z.backward(per_rank[1 % n])
    errors["map_scatter_gather_tp_bwd"] = _max_err(x.grad, per_rank[1 % n])  # split then re-gathered

    x = mine.clone().requires_grad_()
    y = mappings.gather_from_sequence_parallel(x, tp)
    errors["map_gather_sp_fwd"] = _max_err(y, torch.cat(list(per_rank), 0))
    big = torch.randn(n, n * 4 * n, 2 * n)  # per-rank upstream gradients of the gathered tensor
    y.backward(big[r])
    errors["map_gather_sp_bwd_reduce_scatter"] = _max_err(x.grad, big.sum(0).chunk(n, 0)[r])

    x = mine.clone().requires_grad_()
    mappings.gather_from_sequence_parallel(x, tp, tensor_parallel_output_grad=False).backward(big[0])
    errors["map_gather_sp_bwd_split"] = _max_err(x.grad, big[0].chunk(n, 0)[r])

    x = mine.clone().requires_grad_()
    y = mappings.reduce_scatter_to_sequence_parallel(x, tp)
    errors["map_reduce_scatter_sp_fwd"] = _max_err(y, per_rank.sum(0).chunk(n, 0)[r])
    y.backward(y.detach() * 0 + r)
    expected = torch.cat([torch.full_like(y, q) for q in range(n)], 0)
    errors["map_reduce_scatter_sp_bwd"] = _max_err(x.grad, expected)

    x = full.clone().requires_grad_()
    y = mappings.scatter_to_sequence_parallel(x, tp)
    errors["map_scatter_sp_fwd"] = _max_err(y, full.chunk(n, 0)[r])
    y.backward(per_rank[r].chunk(n, 0)[0])
    errors["map_scatter_sp_bwd"] = _max_err(x.grad, torch.cat([per_rank[q].chunk(n, 0)[0] for q in range(n)], 0))


class _Tiny(nn.Module):
    def __init__(self, groups: ParallelGroups) -> None:
        super().__init__()
        self.emb = VocabParallelEmbedding(16, 8, groups=groups)
        self.norm = nn.LayerNorm(8)  # replicated
        self.proj = ColumnParallelLinear(8, 8, groups=groups, bias=True, tp_components=[4, 4])  # gate, up
        self.out = RowParallelLinear(4, 8, groups=groups)
        self.fused = ColumnParallelLinear(8, 20, groups=groups, tp_components=[8, 4, 4, 4])  # only round-tripped
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.emb(ids).transpose(0, 1))
        gate, up = self.proj(h).chunk(2, dim=-1)  # this rank's chunk of each: their product is a contiguous chunk
        return self.out(gate * up)


def _check_state_dict_round_trip(groups: ParallelGroups, errors: dict[str, float]) -> None:
    torch.manual_seed(7)
    ref = _Tiny(SINGLE)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p))  # nothing left at its init value
        ref.steps.fill_(3)
    full = {k: v.clone() for k, v in ref.state_dict().items()}
    torch.manual_seed(8)  # a different seed: loading must overwrite everything
    model = _Tiny(groups)
    shard_state_dict(model, full, groups.tp_rank, groups.tp_size)
    gathered = gather_full_state_dict(model, groups, device="cpu")
    assert sorted(gathered) == sorted(full)
    errors["state_dict_round_trip"] = max(_max_err(gathered[k], full[k]) for k in full)
    ids = torch.randint(0, 16, (2, 4))
    errors["state_dict_loaded_forward"] = _max_err(model(ids), ref(ids))


def _tp_worker(rank: int, world_size: int) -> dict[str, float]:
    groups = initialize_parallel_groups(tp=world_size)
    assert groups.tp_size == world_size and groups.dp is None and groups.pp is None
    errors: dict[str, float] = {}
    _check_mappings(groups, errors)
    for dtype in (torch.float32, torch.float64):
        _check_mlp(groups, False, dtype, errors)
        _check_mlp(groups, True, dtype, errors)
    _check_column_gather_and_row_split(groups, errors)
    _check_embedding(groups, errors)
    _check_cross_entropy(groups, errors)
    _check_state_dict_round_trip(groups, errors)
    return errors


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_matches_tp1(tp: int) -> None:
    results = run_distributed(_tp_worker, tp, timeout=120)
    exact = ("init_weights", "state_dict_round_trip")  # pure data movement: bit-exact
    for rank, errors in enumerate(results):
        assert len(errors) > 30
        for name, err in errors.items():
            limit = 0.0 if any(key in name for key in exact) else TOL
            assert err <= limit, f"rank {rank}: {name} deviates by {err:.3g} (limit {limit:g})"


def test_layers_at_tp1_match_torch() -> None:
    """No process group at all: the layers are plain linear / embedding / cross entropy."""
    errors: dict[str, float] = {}
    _check_mappings(SINGLE, errors)
    _check_mlp(SINGLE, False, torch.float32, errors)
    _check_column_gather_and_row_split(SINGLE, errors)
    _check_embedding(SINGLE, errors)
    _check_cross_entropy(SINGLE, errors)
    _check_state_dict_round_trip(SINGLE, errors)
    for name, err in errors.items():
        assert err <= TOL, f"{name} deviates by {err:.3g}"

    torch.manual_seed(0)
    col = ColumnParallelLinear(6, 5, groups=SINGLE, bias=True)
    linear = nn.Linear(6, 5)
    linear.load_state_dict(col.state_dict())
    x = torch.randn(4, 2, 6)
    torch.testing.assert_close(col(x), linear(x), rtol=0, atol=0)
    assert col.weight.tp_dim == 0 and col.weight.tp_components == [5]
    row = RowParallelLinear(6, 5, groups=SINGLE)
    assert row.weight.tp_dim == 1 and row.weight.tp_components == [6] and row.weight.shape == (5, 6)
    emb = VocabParallelEmbedding(10, 4, groups=SINGLE, reduce_scatter_embeddings=True)
    ids = torch.randint(0, 10, (2, 3))
    torch.testing.assert_close(emb(ids), F.embedding(ids, emb.weight).transpose(0, 1), rtol=0, atol=0)


def test_layer_argument_errors() -> None:
    with pytest.raises(ValueError, match="sum to"):
        ColumnParallelLinear(4, 10, groups=SINGLE, tp_components=[4, 4])
    with pytest.raises(ValueError, match="input_is_parallel"):
        RowParallelLinear(4, 4, groups=SINGLE, input_is_parallel=False, sequence_parallel=True)
    with pytest.raises(NotImplementedError):
        vocab_parallel_cross_entropy(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), SINGLE,
                                     label_smoothing=0.1)
    with pytest.raises(ValueError, match="disagree"):
        vocab_parallel_cross_entropy(torch.randn(2, 3, 5), torch.zeros(3, 2, dtype=torch.long), SINGLE)


def test_meta_device_then_reset_parameters() -> None:
    torch.manual_seed(0)
    eager = ColumnParallelLinear(4, 6, groups=SINGLE, tp_components=[2, 4])
    with torch.device("meta"):
        lazy = ColumnParallelLinear(4, 6, groups=SINGLE, tp_components=[2, 4])
    assert lazy.weight.is_meta
    assert lazy.weight.tp_dim == 0
    lazy.to_empty(device="cpu")  # new Parameter objects: the tp attributes are gone until reset_parameters()
    torch.manual_seed(0)
    lazy.reset_parameters()
    torch.testing.assert_close(lazy.weight, eager.weight, rtol=0, atol=0)
    assert lazy.weight.tp_dim == 0 and lazy.weight.tp_components == [2, 4]
