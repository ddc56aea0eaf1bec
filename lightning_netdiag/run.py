"""What a meter needs from the training loop it is attached to (:class:`Run`), its implementation over
``torch.distributed`` for the front ends without a Trainer, and the checks every front end shares. Pure torch."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_netdiag import stats

__all__ = ["Run", "TorchRun", "check_positive_int", "chosen_part", "scaler_scale"]


class Run(Protocol):
    """What a meter needs from the training loop it is attached to; each front end provides one."""

    @property
    def world_size(self) -> int:
        """The number of data-parallel ranks (1 in a single process)."""

    @property
    def device(self) -> torch.device:
        """Where this rank's collectives run."""

    def reduce(self, t: Tensor, op: str) -> Tensor:
        """``t`` summed (``op="sum"``) or maxed (``"max"``) over the ranks; every rank calls it alike."""

    def loss_scale(self) -> Tensor | float | None:
        """The AMP GradScaler's current scale, or None when the gradients are not scaled."""

    def emit(
        self,
        step: int,
        scalars: Mapping[str, float],
        histograms: Mapping[str, stats.Histogram],
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        """Send one meter's measurement of one step to the loggers, with what it watches (``meta``, see
        :meth:`Meter.describe`) when that changed."""

    def flush(self) -> None:
        """Put what was sent onto the disk now (the run may die next)."""

    @property
    def log_dir(self) -> str | None:
        """The directory of the run's logs, where files beside them go (None: no logs)."""


class TorchRun:
    """A :class:`Run` over ``torch.distributed`` (when initialised) for the front ends without a Trainer.

    Args:
        emit: where measurements go (the front end's loggers), or None to keep them in the history only.
        scaler: the AMP GradScaler that scales the loss, if any.
        device: where collectives run; None: CUDA's current device under NCCL, the CPU otherwise.
        flush: puts what was emitted onto the disk (None: nothing to do).
        log_dir: the directory of the logs (None: no logs).
    """

    def __init__(
        self,
        emit: Callable[..., None] | None = None,
        scaler: Any = None,
        device: torch.device | None = None,
        flush: Callable[[], None] | None = None,
        log_dir: str | None = None,
    ) -> None:
        self._emit, self.scaler, self._device, self._flush = emit, scaler, device, flush
        self.log_dir = log_dir

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def device(self) -> torch.device:
        if self._device is not None:
            return self._device
        nccl = self.world_size > 1 and dist.get_backend() == "nccl"
        return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def reduce(self, t: Tensor, op: str) -> Tensor:
        if self.world_size == 1:
            return t
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return out

    def loss_scale(self) -> Tensor | float | None:
        return scaler_scale(self.scaler)

    def emit(
        self,
        step: int,
        scalars: Mapping[str, float],
        histograms: Mapping[str, stats.Histogram],
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        if self._emit is not None:
            self._emit(step, scalars, histograms, meta)

    def flush(self) -> None:
        if self._flush is not None:
            self._flush()


def scaler_scale(scaler: Any) -> Tensor | float | None:
    """A GradScaler's current scale, or None when there is none or it is off (fp32, bf16).

    Read from the scaler's scale tensor where it has one, so that no host synchronisation happens.
    """
    if scaler is None or not scaler.is_enabled():
        return None
    scale = getattr(scaler, "_scale", None)
    return scale if isinstance(scale, Tensor) else scaler.get_scale()


def check_positive_int(name: str, value: object, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive integer, got {value!r}")


def chosen_part(name: str, value: object, kind: type, make: Callable[[], Any]) -> Any:
    """What an argument that turns a part on or off (a meter, a callback) asks for: None (None, False: left out), a new
    one (True: ``make()``), or the ``kind`` it is."""
    if value is None or value is False:
        return None
    if value is True:
        return make()
    if isinstance(value, kind):
        return value
    article = "an" if kind.__name__[0] in "AEIOU" else "a"
    raise ValueError(f"Expected `{name}` to be True, None or {article} {kind.__name__}, got {value!r}")
