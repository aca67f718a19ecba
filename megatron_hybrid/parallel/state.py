"""Process groups of the four parallel dimensions: the one place that creates them.

A run with ``world_size`` ranks is split into tensor (tp), context (cp), data (dp) and pipeline (pp) parallel groups.
Ranks are laid out as in Megatron-LM's default order ``"tp-cp-dp-pp"``: tp varies fastest, pp slowest, i.e.

    global_rank = tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank))

so a tensor-parallel group is a run of consecutive ranks (one node's NVLink domain) and a pipeline group strides over
the whole world. Megatron checkpoints, launch scripts and profiles therefore line up with ours rank for rank.

Convention used everywhere in this package: a group that would have size 1 is stored as ``None``, and every consumer
treats ``None`` as "size 1, no communication". Beware that ``None`` passed to ``torch.distributed`` itself means the
*world* group, so code must branch on ``None`` (the helpers in :mod:`megatron_hybrid.parallel.mappings` do) rather than
forwarding it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

__all__ = [
    "ParallelGroups",
    "group_rank",
    "group_size",
    "init_distributed",
    "initialize_parallel_groups",
    "rank_layout",
]


def group_size(group: ProcessGroup | None) -> int:
    """Size of ``group``; ``None`` is a group of one (not the world, unlike ``torch.distributed``)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    """This process' rank inside ``group``; 0 for ``None``."""
    return 0 if group is None else dist.get_rank(group)


@dataclass(frozen=True)
class ParallelGroups:
    """The process groups this rank belongs to, one per parallel dimension (``None`` = size 1).

    ``dp_cp`` is the combined data x context parallel group: every rank in it holds the same parameters (context
    parallel ranks see different tokens of the same sequences), so gradients are all-reduced over it.
    The object is immutable and cheap to pass around; modules take it as their ``groups`` argument.
    """

    tp: ProcessGroup | None = None
    cp: ProcessGroup | None = None
    pp: ProcessGroup | None = None
    dp: ProcessGroup | None = None
    dp_cp: ProcessGroup | None = None

    def __copy__(self) -> ParallelGroups:
        return self

    def __deepcopy__(self, memo: dict) -> ParallelGroups:
        # Process groups are process-wide communicator handles (and not copyable): a copied module shares them.
        return self

    @classmethod
    def single(cls) -> ParallelGroups:
        """No parallelism at all (a single process, or every dimension of size 1)."""
        return cls()

    @property
    def tp_size(self) -> int:
        return group_size(self.tp)

    @property
    def tp_rank(self) -> int:
        return group_rank(self.tp)

    @property
    def cp_size(self) -> int:
        return group_size(self.cp)

    @property
    def cp_rank(self) -> int:
        return group_rank(self.cp)

    @property
    def pp_size(self) -> int:
        return group_size(self.pp)

    @property
    def pp_rank(self) -> int:
        return group_rank(self.pp)

    @property
    def dp_size(self) -> int:
        return group_size(self.dp)

    @property
    def dp_rank(self) -> int:
        return group_rank(self.dp)

    @property
    def dp_cp_size(self) -> int:
        return group_size(self.dp_cp)

    @property
    def dp_cp_rank(self) -> int:
        return group_rank(self.dp_cp)

    @property
    def pp_ranks(self) -> tuple[int, ...]:
        """Global ranks of this pipeline, stage 0 first: point-to-point sends address global ranks."""
        if self.pp is not None:
            return tuple(dist.get_process_group_ranks(self.pp))
        return (dist.get_rank() if dist.is_available() and dist.is_initialized() else 0,)

    @property
    def is_pipeline_first(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_pipeline_last(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def rank_layout(world_size: int, tp: int = 1, pp: int = 1, cp: int = 1) -> dict[str, list[list[int]]]:
    """Every group of every kind, as lists of global ranks, for Megatron's ``tp-cp-dp-pp`` order.

    Pure function (no communication) so the layout can be checked and printed without a cluster. Keys are
    ``"tp"``, ``"cp"``, ``"dp"``, ``"pp"`` and ``"dp_cp"``; each value partitions ``range(world_size)``.
    """
    for name, value in (("tp", tp), ("pp", pp), ("cp", cp)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    model_parallel = tp * pp * cp
    if world_size % model_parallel != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tp*pp*cp = {tp}*{pp}*{cp} = {model_parallel}; "
            f"the data-parallel size would not be an integer"
        )
    dp = world_size // model_parallel
    sizes = {"tp": tp, "cp": cp, "dp": dp, "pp": pp}  # fastest to slowest varying
    order = list(sizes)

    def global_rank(coords: dict[str, int]) -> int:
        rank, stride = 0, 1
        for dim in order:
            rank += coords[dim] * stride
            stride *= sizes[dim]
        return rank

    def groups_over(varying: tuple[str, ...]) -> list[list[int]]:
        # One group per combination of the fixed coordinates; inside a group the varying dims run (fastest first).
        fixed = [d for d in order if d not in varying]
        result = []
        for fixed_index in range(_prod(sizes[d] for d in fixed)):
            coords = _unravel(fixed_index, [(d, sizes[d]) for d in fixed])
            members = []
            for var_index in range(_prod(sizes[d] for d in varying)):
                coords.update(_unravel(var_index, [(d, sizes[d]) for d in varying]))
                members.append(global_rank(coords))
            result.append(sorted(members))
        return sorted(result)

    return {
        "tp": groups_over(("tp",)),
        "cp": groups_over(("cp",)),
        "dp": groups_over(("dp",)),
        "pp": groups_over(("pp",)),
        "dp_cp": groups_over(("cp", "dp")),
    }


def _prod(values: Iterable[int]) -> int:
    result = 1
    for v in values:
        result *= v
    return result


def _unravel(index: int, dims: list[tuple[str, int]]) -> dict[str, int]:
    coords = {}
    for name, size in dims:
        coords[name] = index % size
        index //= size
    return coords


def initialize_parallel_groups(
    tp: int = 1, pp: int = 1, cp: int = 1, *, timeout: timedelta | None = None
) -> ParallelGroups:
    """Create the tp/cp/dp/pp/dp_cp groups of this rank (collective: every rank must call it, same arguments).

    ``torch.distributed`` must already be initialised (see :func:`init_distributed`). ``new_group`` is itself a
    collective over the world, so every rank creates every group in the same order and keeps the ones it belongs to.
    Groups of size 1 are not created and come back as ``None``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "torch.distributed is not initialised: call init_distributed() (or torch.distributed.init_process_group) "
            "before initialize_parallel_groups(), or use ParallelGroups.single() for a single process"
        )
    world_size = dist.get_world_size()
    rank = dist.get_rank()
    layout = rank_layout(world_size, tp=tp, pp=pp, cp=cp)

    mine: dict[str, ProcessGroup | None] = {}
    for kind in ("tp", "cp", "dp", "pp", "dp_cp"):
        mine[kind] = None
        for ranks in layout[kind]:
            if len(ranks) == 1:
                continue  # same decision on every rank (all groups of a kind have equal size), so still collective
            group = dist.new_group(ranks=ranks, timeout=timeout)
            if rank in ranks:
                mine[kind] = group
    return ParallelGroups(tp=mine["tp"], cp=mine["cp"], pp=mine["pp"], dp=mine["dp"], dp_cp=mine["dp_cp"])


def init_distributed(backend: str | None = None, *, timeout: timedelta | None = None) -> torch.device:
    """Initialise ``torch.distributed`` from torchrun's environment and return this rank's device.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (``env://``). Without them
    (a plain ``python script.py``) it starts a world of one on 127.0.0.1 so scripts need no special casing. The backend
    defaults to NCCL when CUDA is available, else gloo; on CUDA the current device is set to ``LOCAL_RANK`` *before*
    the process group exists so NCCL binds each rank to its own GPU. Calling it again is a no-op.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device
    if "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("RANK", "0")
        os.environ["WORLD_SIZE"] = "1"
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            from megatron_hybrid.parallel.testing import find_free_port

            os.environ["MASTER_PORT"] = str(find_free_port())
    if backend is None:
        backend = "nccl" if use_cuda else "gloo"
    kwargs = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        **kwargs,
    )
    return device
