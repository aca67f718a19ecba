"""The multi-process test harness itself: results, failures, hangs and the distributed init helper."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from megatron_hybrid.parallel.state import init_distributed
from megatron_hybrid.parallel.testing import DistributedRunError, run_distributed


def _echo(rank: int, world_size: int, payload: dict) -> dict:
    total = torch.tensor([float(rank)])
    dist.all_reduce(total)
    return {"rank": rank, "world": world_size, "sum": total.item(), "payload": payload,
            "tensor": torch.arange(3) * rank, "env_rank": os.environ["RANK"]}


def _fail_on_rank1(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("boom from rank 1")
    dist.barrier()  # rank 0 blocks forever: the harness must terminate it


def _sleep(rank: int, world_size: int) -> None:
    time.sleep(60)


def _init_distributed_checks(rank: int, world_size: int) -> dict:
    out = {"already": str(init_distributed())}  # already initialised by the harness: no-op, returns the device
    dist.destroy_process_group()
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    device = init_distributed()  # no torchrun environment: a world of one
    out.update(device=str(device), backend=dist.get_backend(), world=dist.get_world_size(), rank=dist.get_rank())
    return out


def test_results_in_rank_order() -> None:
    results = run_distributed(_echo, 3, {"x": 1}, timeout=60)
    assert [r["rank"] for r in results] == [0, 1, 2]
    assert all(r["world"] == 3 and r["sum"] == 3.0 and r["payload"] == {"x": 1} for r in results)
    assert torch.equal(results[2]["tensor"], torch.tensor([0, 2, 4]))
    assert [r["env_rank"] for r in results] == ["0", "1", "2"]


def test_failure_carries_child_traceback_and_stops_hung_ranks() -> None:
    start = time.monotonic()
    with pytest.raises(DistributedRunError) as info:
        run_distributed(_fail_on_rank1, 2, timeout=60)
    assert time.monotonic() - start < 30  # not the 60 s timeout: the blocked rank was terminated
    message = str(info.value)
    assert "rank 1" in message and "ValueError: boom from rank 1" in message and "_fail_on_rank1" in message
    assert 1 in info.value.failures


def test_timeout() -> None:
    with pytest.raises(TimeoutError, match=r"ranks \[0\] not done after 2"):
        run_distributed(_sleep, 1, timeout=2)


def test_unpicklable_function() -> None:
    with pytest.raises(TypeError, match="picklable"):
        run_distributed(lambda rank, world_size: None, 1)


def test_init_distributed_without_torchrun_env() -> None:
    (out,) = run_distributed(_init_distributed_checks, 1, timeout=60)
    assert out["already"] == "cpu"
    assert out == {"already": "cpu", "device": "cpu", "backend": "gloo", "world": 1, "rank": 0}
