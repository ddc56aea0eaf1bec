"""The ranks and shards: which rank speaks, which part of a tensor it holds, and the records' one trip to
the host. Pure torch, no Lightning."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch built without distributed support: no tensor is ever a DTensor
    _DTensor = ()  # type: ignore[assignment,misc]

__all__ = ["host", "is_sharded", "local_shard", "rank", "rank_zero_warn", "split"]


def rank() -> int:
    """This process's global rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def rank_zero_warn(message: str) -> None:
    """A ``UserWarning`` from rank 0 only, so that N ranks do not print it N times."""
    if rank() == 0:
        warnings.warn(message, UserWarning, stacklevel=3)


def host(parts: list[Tensor]) -> list[float]:
    """All of a step's records in one device-to-host transfer."""
    return torch.cat([p if p.dim() == 1 else p.reshape(-1) for p in parts]).tolist() if parts else []


def split(values: list[float], sizes: list[int]) -> list[list[float]]:
    out, start = [], 0
    for n in sizes:
        out.append(values[start : start + n])
        start += n
    return out


def local_shard(name: str, t: Tensor, world_size: int) -> tuple[Tensor, int]:
    """The part of ``t`` this rank holds, and how many of the ``world_size`` ranks hold that same part.

    A plain tensor is whole on every rank. A DTensor (FSDP2, tensor parallelism) holds a shard, copied on
    each replicated mesh dimension and on every rank outside its mesh: a sum over all ranks of each
    rank's record divided by its copies counts every element exactly once, and nothing is gathered.

    Raises:
        ValueError: if ``t`` is a DTensor with a placement other than sharded or replicated (a pending sum).
    """
    if not isinstance(t, _DTensor):
        return t, world_size
    mesh = t.device_mesh
    copies = max(world_size // mesh.size(), 1)
    for dim, placement in enumerate(t.placements):
        if placement.is_replicate():
            copies *= mesh.size(dim)
        elif not placement.is_shard():
            raise ValueError(f"Expected `{name}` to be sharded or replicated, got placements {t.placements}")
    return t.to_local(), copies


def is_sharded(t: Tensor) -> bool:
    return isinstance(t, _DTensor)
