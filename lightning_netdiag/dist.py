"""The ranks: which one speaks, and the records' one trip to the host. Pure torch, no Lightning."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import Tensor


def rank() -> int:
    """This process's global rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def rank_zero_warn(message: str) -> None:
    """A ``UserWarning`` from rank 0 only, so that N ranks do not print it N times."""
    if rank() == 0:
        warnings.warn(message, UserWarning, stacklevel=3)


def host(parts: list[Tensor]) -> list[float]:
    """All of a step's records in one device-to-host transfer."""
    return torch.cat([p.reshape(-1) for p in parts]).tolist() if parts else []


def split(values: list[float], sizes: list[int]) -> list[list[float]]:
    out, start = [], 0
    for n in sizes:
        out.append(values[start : start + n])
        start += n
    return out
