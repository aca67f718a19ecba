"""Full <-> shard conversion (no processes needed: rank and size are plain arguments)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from megatron_hybrid.parallel.sharding import (
    gather_full_state_dict,
    is_tensor_parallel,
    shard_state_dict,
    shard_tensor,
    unshard_tensors,
)
from megatron_hybrid.parallel.state import ParallelGroups
from megatron_hybrid.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear

SINGLE = ParallelGroups.single()


def test_multi_component_shard_is_per_component() -> None:
    # Mamba in_proj rows: z (8), x (8), B (4), C (4), dt (2); rank r of 2 gets the r-th half of each.
    comps = [8, 8, 4, 4, 2]
    z, x, b, c, dt = (torch.full((n, 3), float(i)) + torch.arange(n)[:, None] / 100 for i, n in enumerate(comps))
    full = torch.cat([z, x, b, c, dt])
    shard1 = shard_tensor(full, 0, comps, rank=1, size=2)
    torch.testing.assert_close(shard1, torch.cat([z[4:], x[4:], b[2:], c[2:], dt[1:]]), rtol=0, atol=0)
    assert shard1.shape == (13, 3) and shard1.is_contiguous()


@pytest.mark.parametrize("size", [1, 2, 4])
@pytest.mark.parametrize("tp_dim", [0, 1])
@pytest.mark.parametrize("comps", [None, [16], [8, 8], [4, 4, 4, 4], [8, 4, 4]])
def test_round_trip(size: int, tp_dim: int, comps: list[int] | None) -> None:
    full = torch.randn(16, 5) if tp_dim == 0 else torch.randn(5, 16)
    shards = [shard_tensor(full, tp_dim, comps, r, size) for r in range(size)]
    for shard in shards:
        assert shard.shape[tp_dim] == 16 // size
    torch.testing.assert_close(unshard_tensors(shards, tp_dim, comps), full, rtol=0, atol=0)
    if comps is not None and len(comps) > 1 and size > 1:  # a per-component split is not a contiguous split
        assert not torch.equal(shards[0], full.chunk(size, dim=tp_dim)[0])


def test_shard_errors() -> None:
    full = torch.zeros(12, 2)
    with pytest.raises(ValueError, match="sum to 10"):
        shard_tensor(full, 0, [6, 4], 0, 2)
    with pytest.raises(ValueError, match="not all divisible"):
        shard_tensor(full, 0, [6, 6], 0, 4)
    with pytest.raises(ValueError, match="outside"):
        shard_tensor(full, 0, None, 2, 2)
    with pytest.raises(ValueError, match="at least one"):
        unshard_tensors([], 0, None)


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.col = ColumnParallelLinear(4, 6, groups=SINGLE, bias=True, tp_components=[4, 2])
        self.row = RowParallelLinear(6, 4, groups=SINGLE)
        self.norm = nn.LayerNorm(4)


def test_shard_state_dict_names_every_problem() -> None:
    model = _Model()
    good = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    shard_state_dict(model, good, 0, 1)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, good[k], rtol=0, atol=0)

    bad = dict(good)
    del bad["norm.bias"]
    bad["extra.weight"] = torch.zeros(1)
    bad["row.weight"] = torch.zeros(4, 7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        shard_state_dict(model, bad, 0, 1)
    message = str(info.value)
    assert "missing keys (1): norm.bias" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "row.weight: checkpoint (4, 7) vs model (4, 6)" in message
    for k, v in model.state_dict().items():  # nothing was copied
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)

    del bad["row.weight"]
    bad["row.weight"] = good["row.weight"]
    with pytest.raises(KeyError, match="norm.bias"):
        shard_state_dict(model, bad, 0, 1)
    shard_state_dict(model, bad, 0, 1, strict=False)  # missing / unexpected tolerated, the rest loaded
    torch.testing.assert_close(model.row.weight, good["row.weight"], rtol=0, atol=0)


def test_shard_state_dict_into_a_tp_shard_shape() -> None:
    """A full state dict against rank 1 of 2: tensor-parallel entries are checked against local x tp."""
    model = _Model()
    full = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    # Pretend the model is rank 1 of 2 by replacing its parameters with half-size ones carrying the same attributes.
    for module, name, dim in [(model.col, "weight", 0), (model.col, "bias", 0), (model.row, "weight", 1)]:
        old = getattr(module, name)
        new = nn.Parameter(old.detach().chunk(2, dim=dim)[0].clone())
        new.tp_dim, new.tp_components = old.tp_dim, old.tp_components
        setattr(module, name, new)
    shard_state_dict(model, full, 1, 2)
    torch.testing.assert_close(model.col.weight, shard_tensor(full["col.weight"], 0, [4, 2], 1, 2), rtol=0, atol=0)
    torch.testing.assert_close(model.row.weight, full["row.weight"][:, 3:], rtol=0, atol=0)
    torch.testing.assert_close(model.norm.weight, full["norm.weight"], rtol=0, atol=0)


def test_gather_full_state_dict_single() -> None:
    model = _Model()
    full = gather_full_state_dict(model, SINGLE, device="cpu")
    assert sorted(full) == sorted(model.state_dict())
    assert all(not t.requires_grad for t in full.values())
    assert is_tensor_parallel(model.col.weight) and not is_tensor_parallel(model.norm.weight)
