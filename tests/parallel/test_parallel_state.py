"""Process-group layout: Megatron's tp-cp-dp-pp rank order, checked without and with real process groups."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from megatron_hybrid.parallel.state import ParallelGroups, initialize_parallel_groups, rank_layout
from megatron_hybrid.parallel.testing import run_distributed

# Written out by hand from global_rank = tp_rank + tp*(cp_rank + cp*(dp_rank + dp*pp_rank)).
EXPECTED_TP2_PP2 = {  # world 8 -> dp 2
    "tp": [[0, 1], [2, 3], [4, 5], [6, 7]],
    "cp": [[r] for r in range(8)],
    "dp": [[0, 2], [1, 3], [4, 6], [5, 7]],
    "pp": [[0, 4], [1, 5], [2, 6], [3, 7]],
    "dp_cp": [[0, 2], [1, 3], [4, 6], [5, 7]],
}
EXPECTED_TP2_CP2 = {  # world 8 -> dp 2, pp 1
    "tp": [[0, 1], [2, 3], [4, 5], [6, 7]],
    "cp": [[0, 2], [1, 3], [4, 6], [5, 7]],
    "dp": [[0, 4], [1, 5], [2, 6], [3, 7]],
    "pp": [[r] for r in range(8)],
    "dp_cp": [[0, 2, 4, 6], [1, 3, 5, 7]],
}


def _normalise(groups: list[list[int]]) -> list[list[int]]:
    return sorted(sorted(g) for g in groups)


def test_rank_layout_hand_computed() -> None:
    assert rank_layout(8, tp=2, pp=2) == EXPECTED_TP2_PP2
    assert rank_layout(8, tp=2, cp=2) == EXPECTED_TP2_CP2
    assert rank_layout(1) == {k: [[0]] for k in ("tp", "cp", "dp", "pp", "dp_cp")}


@pytest.mark.parametrize(
    "world,tp,pp,cp",
    [(w, tp, pp, cp) for w, tp, pp, cp in itertools.product([1, 2, 4, 8, 12, 16], [1, 2, 4], [1, 2, 3], [1, 2])
     if w % (tp * pp * cp) == 0],
)
def test_rank_layout_matches_megatron_core(world: int, tp: int, pp: int, cp: int) -> None:
    parallel_state = pytest.importorskip("megatron.core.parallel_state")
    dp = world // (tp * pp * cp)
    oracle = parallel_state.RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order="tp-cp-ep-dp-pp")
    ours = rank_layout(world, tp=tp, pp=pp, cp=cp)
    for ours_key, megatron_key in [("tp", "tp"), ("cp", "cp"), ("dp", "dp"), ("pp", "pp"), ("dp_cp", "dp-cp")]:
        assert ours[ours_key] == _normalise(oracle.get_ranks(megatron_key)), ours_key
    for groups in ours.values():  # every kind partitions the world
        assert sorted(itertools.chain.from_iterable(groups)) == list(range(world))


def test_rank_layout_errors() -> None:
    with pytest.raises(ValueError, match=r"world size 8 is not divisible by tp\*pp\*cp = 3\*1\*1"):
        rank_layout(8, tp=3)
    with pytest.raises(ValueError, match="not divisible"):
        rank_layout(6, tp=2, pp=2)
    with pytest.raises(ValueError, match="tp must be >= 1"):
        rank_layout(4, tp=0)


def test_single_groups() -> None:
    g = ParallelGroups.single()
    assert (g.tp, g.cp, g.pp, g.dp, g.dp_cp) == (None,) * 5
    assert (g.tp_size, g.cp_size, g.pp_size, g.dp_size, g.dp_cp_size) == (1,) * 5
    assert (g.tp_rank, g.cp_rank, g.pp_rank, g.dp_rank, g.dp_cp_rank) == (0,) * 5
    assert g.pp_ranks == (0,)
    assert g.is_pipeline_first and g.is_pipeline_last
    with pytest.raises(AttributeError):
        g.tp = None  # frozen


def test_initialize_requires_distributed() -> None:
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="not initialised"):
        initialize_parallel_groups(tp=1)


def _describe(groups: ParallelGroups) -> dict:
    def ranks(group: object) -> list[int]:
        return [dist.get_rank()] if group is None else dist.get_process_group_ranks(group)

    info = {kind: ranks(getattr(groups, kind)) for kind in ("tp", "cp", "dp", "pp", "dp_cp")}
    info["sizes"] = (groups.tp_size, groups.cp_size, groups.dp_size, groups.pp_size, groups.dp_cp_size)
    info["ranks"] = (groups.tp_rank, groups.cp_rank, groups.dp_rank, groups.pp_rank, groups.dp_cp_rank)
    info["pp_ranks"] = groups.pp_ranks
    info["first_last"] = (groups.is_pipeline_first, groups.is_pipeline_last)
    # The groups must actually work: sum of global ranks over each group.
    sums = {}
    for kind in ("tp", "cp", "dp", "pp", "dp_cp"):
        value = torch.tensor([float(dist.get_rank())])
        group = getattr(groups, kind)
        if group is not None:
            dist.all_reduce(value, group=group)
        sums[kind] = value.item()
    info["sums"] = sums
    return info


def _layout_worker(rank: int, world_size: int) -> dict:
    out = {}
    try:
        initialize_parallel_groups(tp=3)
    except ValueError as exc:
        out["error"] = str(exc)
    out["tp2pp2"] = _describe(initialize_parallel_groups(tp=2, pp=2))
    out["tp2cp2"] = _describe(initialize_parallel_groups(tp=2, cp=2))
    return out


def test_groups_world8_follow_megatron_order() -> None:
    results = run_distributed(_layout_worker, 8, timeout=120)
    for rank, out in enumerate(results):
        assert "not divisible" in out["error"] and "world size 8" in out["error"]
        for key, expected in (("tp2pp2", EXPECTED_TP2_PP2), ("tp2cp2", EXPECTED_TP2_CP2)):
            info = out[key]
            for kind in ("tp", "cp", "dp", "pp", "dp_cp"):
                (mine,) = [g for g in expected[kind] if rank in g]
                assert info[kind] == mine, (key, kind, rank)
                assert info["sums"][kind] == float(sum(mine)), (key, kind, rank)
            sizes = tuple(len([g for g in expected[k] if rank in g][0]) for k in ("tp", "cp", "dp", "pp", "dp_cp"))
            assert info["sizes"] == sizes
            positions = tuple(
                [g for g in expected[k] if rank in g][0].index(rank) for k in ("tp", "cp", "dp", "pp", "dp_cp")
            )
            assert info["ranks"] == positions
            (pipeline,) = [g for g in expected["pp"] if rank in g]
            assert info["pp_ranks"] == tuple(pipeline)
            assert info["first_last"] == (rank == pipeline[0], rank == pipeline[-1])


def test_deepcopy_shares_groups() -> None:
    import copy

    g = ParallelGroups.single()
    assert copy.deepcopy(g) is g and copy.copy(g) is g
