"""Mapping between full (TP=1) tensors and the per-rank shards that tensor-parallel modules hold.

Every tensor-parallel parameter carries two attributes:

* ``param.tp_dim``: the dim (0 or 1) that is split across tensor-parallel ranks;
* ``param.tp_components``: the FULL sizes of the logical components stacked along ``tp_dim``. Each component is
  split evenly across ranks and a rank's shard is the concatenation of its chunk of every component.

A fused projection such as Mamba's ``in_proj`` (rows ``z, x, B, C, dt``) must be split per component, otherwise rank
0 would get all of ``z`` and half of ``x``; with ``tp_components=[d_inner, d_inner, gn, gn, nheads]`` each rank gets its
own heads' slice of every component. One component is a plain contiguous split. Parameters without ``tp_dim`` are
replicated on every tensor-parallel rank.

Checkpoints and Hugging Face export always see full tensors: :func:`gather_full_state_dict` builds them from a
sharded model and :func:`shard_state_dict` loads them back into one of any TP size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from megatron_hybrid.parallel.state import ParallelGroups

__all__ = [
    "check_tp_components",
    "gather_full_state_dict",
    "is_tensor_parallel",
    "set_tensor_parallel_attributes",
    "shard_state_dict",
    "shard_tensor",
    "unshard_tensors",
]


def set_tensor_parallel_attributes(param: torch.Tensor, tp_dim: int, tp_components: Sequence[int]) -> None:
    """Mark ``param`` as sharded along ``tp_dim`` with the given FULL component sizes."""
    if tp_dim not in (0, 1):
        raise ValueError(f"tp_dim must be 0 or 1, got {tp_dim}")
    param.tp_dim = tp_dim
    param.tp_components = [int(c) for c in tp_components]


def is_tensor_parallel(param: torch.Tensor) -> bool:
    """Whether ``param`` is sharded across tensor-parallel ranks (has ``tp_dim``)."""
    return getattr(param, "tp_dim", None) is not None


def check_tp_components(full_size: int, tp_components: Sequence[int] | None, size: int, what: str) -> list[int]:
    """Validate ``tp_components`` for a dim of ``full_size`` split ``size`` ways (``None`` = one component).

    Returns the component list; raises ``ValueError`` (prefixed with ``what``) if the sizes do not add up or a
    component does not divide evenly.
    """
    components = [full_size] if tp_components is None else [int(c) for c in tp_components]
    if sum(components) != full_size:
        raise ValueError(f"{what}: tp_components {components} sum to {sum(components)}, but the dim has {full_size}")
    bad = [c for c in components if c % size != 0]
    if bad:
        raise ValueError(f"{what}: tp_components {components} are not all divisible by the tensor-parallel size {size}")
    return components


def shard_tensor(
    full: torch.Tensor, tp_dim: int, tp_components: Sequence[int] | None, rank: int, size: int
) -> torch.Tensor:
    """This rank's shard of a full tensor (a new contiguous tensor; ``tp_components=None`` means one component)."""
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is outside a tensor-parallel group of size {size}")
    what = f"shard_tensor of shape {tuple(full.shape)}"
    components = check_tp_components(full.shape[tp_dim], tp_components, size, what)
    pieces = [part.chunk(size, dim=tp_dim)[rank] for part in full.split(components, dim=tp_dim)]
    return torch.cat(pieces, dim=tp_dim)


def unshard_tensors(
    tensors: Sequence[torch.Tensor], tp_dim: int, tp_components: Sequence[int] | None
) -> torch.Tensor:
    """Rebuild the full tensor from every rank's shard, in rank order (the inverse of :func:`shard_tensor`)."""
    if len(tensors) == 0:
        raise ValueError("unshard_tensors needs at least one shard")
    size = len(tensors)
    full_size = sum(t.shape[tp_dim] for t in tensors)
    components = check_tp_components(full_size, tp_components, size, "unshard_tensors")
    local_sizes = [c // size for c in components]
    per_rank = [t.split(local_sizes, dim=tp_dim) for t in tensors]
    parts = [torch.cat([per_rank[r][i] for r in range(size)], dim=tp_dim) for i in range(len(components))]
    return torch.cat(parts, dim=tp_dim)


def _format_problems(missing: list[str], unexpected: list[str], mismatched: list[str]) -> str:
    lines = []
    if missing:
        lines.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        lines.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if mismatched:
        lines.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched)}")
    return "\n".join(lines)


@torch.no_grad()
def shard_state_dict(
    model: nn.Module, full_state_dict: Mapping[str, torch.Tensor], rank: int, size: int, *, strict: bool = True
) -> None:
    """Copy a full (TP=1) state dict into ``model``'s (possibly sharded) parameters and buffers, in place.

    Tensor-parallel entries are sharded with :func:`shard_tensor` for ``rank`` of ``size``; the rest are copied whole
    (dtype and device follow the model). Raises ``KeyError`` naming every missing and unexpected key (only when
    ``strict``) and ``ValueError`` naming every shape mismatch; nothing is copied if any problem is found.
    """
    own = model.state_dict(keep_vars=True)
    missing = [k for k in own if k not in full_state_dict]
    unexpected = [k for k in full_state_dict if k not in own]
    mismatched: list[str] = []
    plan: list[tuple[torch.Tensor, torch.Tensor]] = []
    for key, target in own.items():
        if key not in full_state_dict:
            continue
        source = full_state_dict[key]
        if is_tensor_parallel(target):
            expected_full = list(target.shape)
            expected_full[target.tp_dim] *= size
            if list(source.shape) != expected_full:
                mismatched.append(
                    f"{key}: checkpoint {tuple(source.shape)} vs model {tuple(expected_full)} "
                    f"(local {tuple(target.shape)} x tp {size} along dim {target.tp_dim})"
                )
                continue
            source = shard_tensor(source, target.tp_dim, target.tp_components, rank, size)
        elif source.shape != target.shape:
            mismatched.append(f"{key}: checkpoint {tuple(source.shape)} vs model {tuple(target.shape)}")
            continue
        plan.append((target, source))
    if mismatched or (strict and (missing or unexpected)):
        problems = _format_problems(missing if strict else [], unexpected if strict else [], mismatched)
        error = ValueError if mismatched else KeyError
        raise error(f"cannot load state dict into {type(model).__name__}:\n{problems}")
    for target, source in plan:
        target.copy_(source)


@torch.no_grad()
def gather_full_state_dict(
    model: nn.Module, groups: ParallelGroups, *, device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """The full (TP=1) state dict of a tensor-parallel ``model`` (collective over ``groups.tp``).

    Every tensor-parallel rank must call it; every rank gets the full result. Replicated entries are returned as they
    are (detached). Only the tensor-parallel dimension is gathered: pipeline stages hold different layers and are the
    caller's business. ``device`` moves each result (e.g. ``"cpu"`` to keep GPU memory for one tensor at a time).
    """
    size = groups.tp_size
    result: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        local = tensor.detach()
        if is_tensor_parallel(tensor) and size > 1:
            local = local.contiguous()
            shards = [torch.empty_like(local) for _ in range(size)]
            dist.all_gather(shards, local, group=groups.tp)
            full = unshard_tensors(shards, tensor.tp_dim, tensor.tp_components)
        else:
            full = local
        result[key] = full if device is None else full.to(device)
    return result
