"""The base of the meters: a record to fill, where its measurements go, the one reduction across ranks."""

from __future__ import annotations

import zlib
from collections.abc import Container, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_netdiag import stats, tags
from lightning_netdiag.dist import host, rank_zero_warn, split
from lightning_netdiag.history import finite_only
from lightning_netdiag.record import KINDS, Key, Record, Tagged
from lightning_netdiag.run import Run, check_positive_int

__all__ = ["MOMENTS", "InRecord", "Meter", "listening", "records_by_kind", "requested_by"]


class InRecord:
    """A meter's attribute that lives in its record (what was watched): the views read it there, nowhere else."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, meter: Meter | None, owner: type | None = None) -> Any:
        return self if meter is None else getattr(meter.record, self.name)

    def __set__(self, meter: Meter, value: Any) -> None:
        setattr(meter.record, self.name, value)


class Meter:
    """Base of the meters: the record it fills and where measurements go. Not for use on its own.

    ``kind`` names the diagnostic (``"saturation"``, ``"grad_data"``, ``"update"``): its record's kind.

    Args:
        prefix: the first part of every tag.
        history_size: the number of points kept per series.
    """

    record_type: ClassVar[type[Record]] = Record
    prefix = InRecord()

    def __init__(self, prefix: str, history_size: int) -> None:
        check_positive_int("history_size", history_size)
        if not isinstance(prefix, str) or not prefix or prefix.strip("/") != prefix:
            raise ValueError(
                f"Expected `prefix` to be a non-empty string without leading or trailing '/', got {prefix!r}"
            )
        self.record = self.record_type(prefix=prefix, history_size=history_size)
        self.run: Run | None = None
        self._described: dict[str, Any] | None = None
        self._tags: dict[Key, str] = {}

    @property
    def kind(self) -> str:
        return self.record.kind

    @property
    def history(self) -> Tagged:
        """What was measured, by logged tag: ``tag -> [(step, value), ...]`` (histograms: ``.histograms``)."""
        return self.record.tagged

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history.load_state_dict(state_dict["history"])

    # --- the lifecycle --------------------------------------------------------------------------------
    # A front end tells every meter the moments of training, in this order, and nothing else: it walks its meters
    # and calls these. Each does nothing here; a meter overrides the moments it measures at.
    #
    #   attach, meet                 before the first forward
    #   step_starts                  an optimizer step begins (before its first forward)
    #   forward_starts, pause        each training forward (a micro-batch); a forward not trained (validation)
    #   batch_seen                   the micro-batch as the model receives it, and what identifies it
    #   backward_starts, backward_ends
    #   add_loss                     a micro-batch's loss, as the model computed it
    #   manual_step                  a manual update (no optimizer) is about to happen
    #   before_step, after_step      around each optimizer's step
    #   crashed, finish, detach      an exception (or a signal) ended training; training ended; hooks removed

    #: Whether the meter watches the forward (its front end arms it at each forward and tells it the backward).
    watches_forward: ClassVar[bool] = False
    #: Whether the meter records every step (not every n-th): its record's cadence is 1.
    every_step: ClassVar[bool] = False
    #: Whether the meter must hear of the process ending (SIGTERM, exit): the front end installs the lifeline.
    lifeline: ClassVar[bool] = False
    #: The steps this meter asks every meter to measure in full (the flight recorder's: the one after an event).
    requested: Container[int] = frozenset()

    def attach(self, model: nn.Module, run: Run, optimizers: Sequence[Any] = ()) -> None:
        """Select what to watch in ``model`` (final: created, sharded) and register the hooks."""
        self.run = run

    def meet(self, meters: Sequence[Meter]) -> None:
        """The run's meters (this one among them), once all are attached: a meter may share another's work."""

    def step_starts(self, step: int, measured: int | None) -> None:
        """Optimizer step ``step`` begins; ``measured``: its number where the meters measure it, else None."""

    def forward_starts(self, measured: int | None, device: torch.device | None) -> None:
        """A training forward of the step begins (one per micro-batch); ``device``: the model's where the step is
        measured, None where it is not (the front end does not look it up on a step between)."""

    def pause(self) -> None:
        """Until the next :meth:`forward_starts`, nothing is recorded (validation, the batch's end)."""

    @property
    def needs_loss(self) -> bool:
        """Whether :meth:`backward_starts` wants the loss (the front end computes it only then)."""
        return False

    def backward_starts(self, loss: Tensor | None) -> None:
        """A forward's backward starts from ``loss`` (unscaled, not divided for accumulation; None: not seen)."""

    def backward_ends(self) -> None:
        """That backward ended."""

    def forget_loss(self) -> None:
        """The losses told at the backward's start were not the step's (micro-batches scaled for accumulation)."""

    def batch_seen(self, inputs: object, index: Mapping[str, Any] | None) -> None:
        """A training micro-batch as the model receives it (``inputs``: its tensors, in any nesting), and what
        identifies it where the front end knows (Lightning's epoch and batch index, the user's own ids)."""

    def add_loss(self, loss: Tensor) -> None:
        """A micro-batch's loss, as the model computed it (the step's is their mean)."""

    def manual_step(self, loss: Tensor | None, lr: float | None) -> None:
        """A manual update ``p -= lr * p.grad`` is about to happen (no optimizer), after the backward of ``loss``."""

    def before_step(self, optimizer: Any | None) -> None:
        """Just before ``optimizer`` steps (None: a manual update), with the step's complete gradients."""

    def after_step(self, optimizer: Any | None, logging: bool) -> None:
        """Just after ``optimizer`` stepped; ``logging``: the step is a logging step of the run (its meters copy to
        the host there anyway)."""

    def write_out(self) -> None:
        """Bring the record up to date with what the meter still holds (before a view reads it)."""

    def crashed(self, error: BaseException | str, quiet: bool = False) -> None:
        """An exception (or, in words, a signal) ends training; ``quiet``: from a signal handler, no logger."""

    def finish(self) -> None:
        """Training ended."""

    def detach(self) -> None:
        """Remove every hook and drop every pending tensor; safe to call any number of times."""

    def _warn_nothing_selected(self, model: nn.Module, looked_for: str) -> None:
        rank_zero_warn(f"{type(self).__name__} found no {looked_for} in {type(model).__name__}; it will log nothing.")

    def _emit(self, step: int, scalars: Mapping[Key, float], histograms: Mapping[Key, stats.Histogram]) -> None:
        """Into the record, and to the loggers by tag (with the description when it changed)."""
        scalars = finite_only(scalars)
        self.record.add(step, scalars, histograms)
        meta = self.record.describe()
        fresh = meta != self._described
        self._described = meta
        if self.run is not None:
            tag = self._tag
            self.run.emit(
                step,
                {tag(key): v for key, v in scalars.items()},
                {tag(key): h for key, h in histograms.items()},
                meta if fresh else None,
            )

    def _tag(self, key: Key) -> str:
        """The tag ``key`` is logged under, built once per key."""
        found = self._tags.get(key)
        if found is None:
            found = self._tags[key] = tags.tag(self.record.prefix, *key)
        return found

    def _summed(
        self, parts: list[Tensor], across: bool, same: Sequence[Tensor] = (), peaks: Sequence[Tensor] = ()
    ) -> list[list[float]]:
        """The reduction, written once: additive ``parts`` summed over the ranks (``across``), ``peaks`` (largest
        values) maxed over them, and the values ``same`` on every rank (not reduced), moved to the host in one
        transfer, one list each, in that order."""
        sizes = [x.numel() for x in (*parts, *peaks, *same)]
        if across and parts:
            parts = [self.run.reduce(torch.cat(parts), "sum")]  # type: ignore[union-attr]
        if across and peaks:
            peaks = [self.run.reduce(torch.cat(list(peaks)), "max")]  # type: ignore[union-attr]
        return split(host([*parts, *peaks, *(x.to(torch.float64) for x in same)]), sizes)

    def _union(self, specs: Mapping[str, Any]) -> dict[str, Any]:
        """name -> spec of what every rank found (layers are found as they run, and a rank may run one that
        another does not), by name; one small collective when the ranks agree, a gather when they do not."""
        if self._world() == 1:
            return dict(specs)
        run: Run = self.run  # type: ignore[assignment]
        names = sorted(specs)
        local = torch.tensor([len(names), zlib.crc32("\n".join(names).encode())], dtype=torch.float64)
        both = run.reduce(torch.cat([local, -local]).to(run.device), "max")
        high_count, high_sum, neg_low_count, neg_low_sum = both.tolist()
        out = dict(specs)
        if (high_count, high_sum) != (-neg_low_count, -neg_low_sum):
            gathered: list[Any] = [None] * self._world()
            dist.all_gather_object(gathered, list(specs.items()))
            for items in gathered:
                out.update((name, spec) for name, spec in items if name not in out)
        return {name: out[name] for name in sorted(out)}

    def _world(self) -> int:
        return 1 if self.run is None else self.run.world_size


def records_by_kind(candidates: Iterable[object]) -> dict[str, Any]:
    """kind -> the record of the first meter of that kind among ``candidates`` (None for a kind with none): what
    the report and the plots take, ``summarize(**records_by_kind(...))``."""
    out: dict[str, Any] = dict.fromkeys(KINDS)
    for meter in candidates:
        if isinstance(meter, Meter) and out[meter.kind] is None:
            out[meter.kind] = meter.record
    return out


class _Requested:
    """The steps any of some meters asks to measure in full (a live view: events add steps as training runs)."""

    def __init__(self, sets: list[Container[int]]) -> None:
        self.sets = sets

    def __contains__(self, step: object) -> bool:
        return any(step in s for s in self.sets)


def requested_by(meters: Iterable[object]) -> Container[int]:
    """The steps that any of ``meters`` asks every meter to measure in full."""
    sets = [m.requested for m in meters if isinstance(m, Meter) and m.requested is not Meter.requested]
    if len(sets) < 2:  # as a rule: a set of its own, no call a step
        return sets[0] if sets else frozenset()
    return _Requested(sets)


#: The moments of the lifecycle, as :class:`Meter`'s methods.
MOMENTS = (
    "meet", "step_starts", "forward_starts", "pause", "batch_seen", "backward_starts", "backward_ends",
    "forget_loss", "add_loss", "manual_step", "before_step", "after_step", "write_out",
    "crashed", "finish",
)  # fmt: skip


def listening(meters: Iterable[Meter], moment: str) -> list[Meter]:
    """Those of ``meters`` that act at ``moment`` (their class overrides it): a front end tells them alone, so that a
    step makes no call for nothing."""
    base = getattr(Meter, moment)
    return [m for m in meters if getattr(type(m), moment) is not base]
