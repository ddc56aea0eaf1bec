"""The flight recorder: cheap records of every step in a ring buffer on the device, spike scores for the loss, the
total gradient norm and each weight's update and norm, and the window written out when a run spikes, goes
non-finite or dies.

A step's life, at the moments of the meters' one lifecycle (:class:`~lightning_netdiag.meters.Meter`):
:meth:`~FlightMeter.step_starts` with the step's number; :meth:`~FlightMeter.add_loss` with each micro-batch's loss
(where the front end sees it); :meth:`~FlightMeter.before_step` just before the optimizer steps (the gradients,
complete); :meth:`~FlightMeter.after_step` after it (the update). :meth:`~FlightMeter.crashed` when an exception
ends training, :meth:`~FlightMeter.finish` when it ends. Nothing is copied to the host on a step without an event:
on a GPU each step's verdict (a few bits) travels asynchronously and is read one step later.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_netdiag import spikes, stats, tags
from lightning_netdiag.capture import compiled
from lightning_netdiag.dist import is_sharded, local_shard, rank, rank_zero_warn
from lightning_netdiag.flight import persist
from lightning_netdiag.flight.events import (
    AFTER,
    CAUSES,
    JOINED,
    RATE_JUMP,
    Batch,
    Event,
    Rate,
    event_text,
    guarded_text,
    live_text,
    step_causes,
)
from lightning_netdiag.flight.ring import BATCH, GRAD_TOTAL, LOSS, NORMS, PRIORITY, SERIES, Ring, Row
from lightning_netdiag.flight.sample import MODES, sampled, stride
from lightning_netdiag.history import finite_only
from lightning_netdiag.meters.base import InRecord
from lightning_netdiag.meters.parameters import ParameterMeter
from lightning_netdiag.origin import ForwardCalls, Made, Replayed, reproduces, where_nonfinite
from lightning_netdiag.record import FlightRecord, Key
from lightning_netdiag.run import Run, check_positive_int
from lightning_netdiag.select import WEIGHT_NDIMS

__all__ = ["KEEP_BATCH", "MAX_EVENTS", "FlightMeter", "GuardStopped"]

#: The events kept per run: a run that keeps blowing up says so, its first events say where it began.
MAX_EVENTS = 32
#: The bytes of an event's batch kept beside the logs by default (each tensor cut to its first rows beyond it).
KEEP_BATCH = 16 * 2**20


class GuardStopped(RuntimeError):
    """More steps in a row than the guard may skip were events: the run is stopped, not skipped forever."""


class FlightMeter(ParameterMeter):
    """Every step: the loss, each selected weight's gradient, update and weight norms, in a ring of the last
    ``window`` steps; an event when the loss or the total gradient norm spikes or turns non-finite, or a weight's
    update or norm jumps.

    See :class:`lightning_netdiag.FlightRecorder` for the arguments and what is logged.
    """

    record_type = FlightRecord
    every_step = True
    lifeline = True
    record: FlightRecord
    window = InRecord()
    events = InRecord()

    def __init__(
        self,
        window: int = 256,
        params: Sequence[type | str] | None = None,
        exclude: Sequence[type | str] = (),
        ndims: Sequence[int] | None = WEIGHT_NDIMS,
        update_norms: str = "sampled",
        replay: bool | None = None,
        prefix: str = "netdiag",
        history_size: int = 10_000,
        save_interval: float | None = 30.0,
        keep_batch: int = KEEP_BATCH,
        guard: int = 0,
    ) -> None:
        super().__init__(params, exclude, ndims, prefix, history_size)
        if isinstance(guard, bool) or not isinstance(guard, int) or guard < 0:
            raise ValueError(f"Expected `guard` to be the most steps in a row to skip (an int >= 0), got {guard!r}")
        self.guard = guard
        if isinstance(keep_batch, bool) or not isinstance(keep_batch, int) or keep_batch < 0:
            raise ValueError(f"Expected `keep_batch` to be a number of bytes >= 0, got {keep_batch!r}")
        self.keep_batch = keep_batch
        check_positive_int("window", window)
        if window <= spikes.MIN_BAND:
            raise ValueError(f"Expected `window` to be more than {spikes.MIN_BAND} steps, got {window}")
        if replay not in (None, True, False):
            raise ValueError(f"Expected `replay` to be None, True or False, got {replay!r}")
        if save_interval is not None and (
            isinstance(save_interval, bool) or not isinstance(save_interval, (int, float)) or not save_interval >= 0
        ):
            raise ValueError(f"Expected `save_interval` to be None or a number of seconds >= 0, got {save_interval!r}")
        if update_norms not in MODES:
            modes = ", ".join(map(repr, MODES))
            raise ValueError(f"Expected `update_norms` to be one of {modes}, got {update_norms!r}")
        self.window = window
        self.update_norms = update_norms
        self.replay = replay
        self.save_interval = save_interval
        self.log_dir: str | None = None  # where the window's JSON file goes (the front end's logs)
        self.requested: set[int] = set()  # steps the front end should measure in full (the one after an event)
        self._names: list[str] = []
        self._params: list[tuple[str, nn.Parameter]] = []  # the selected weights, in depth order
        self._views: list[Tensor] | None = None  # their detached views, when none is sharded
        self._strides: list[int] = []  # each weight's sample (flight.sample): every so many of its elements
        self._samples: list[Tensor] | None = None  # the sampled views of ``_views``
        self._scale: Tensor | None = None  # each sample's norm to the whole update's, sqrt(numel / sampled)
        self._copies: Tensor | None = None  # the ranks holding each part (their sum counts it once)
        self._empty: dict[tuple[torch.device, torch.dtype], Tensor] = {}  # a missing gradient's stand-in
        self._calls: ForwardCalls | None = None  # the step's forwards, where a non-finite one can be replayed
        self._reset()

    def _reset(self) -> None:
        self._ring = Ring(self.window)  # the last steps' rows, on the device
        self._levels: Tensor | None = None  # each scored column's spike level
        self._upper: Tensor | None = None  # the value above which each scores over its level, refreshed every REFRESH
        self._refreshed = 0  # the ring's rows when it was last refreshed
        self._quiet_until = 0  # the ring's rows from which the bands are refreshed again (after parameters joined)
        self._lines: tuple[int, float, float] | None = None  # its loss and total gradient lines on the host, and when
        self._flags: Tensor | None = None  # the step's verdict: the loss and total gradient non-finite, then the spikes
        self._nonfinite: Tensor | None = None  # its first two bits (a view, written in place)
        self._spiked: Tensor | None = None  # the others: each scored value over its threshold (a view)
        self._rates: list[float] = []  # this step's parameter groups' learning rates, as the optimizers step
        self._manual_rate: float | None = None  # a manual update's
        self._decided: tuple[int, bool] | None = None  # the guard's decision on the step under way: (step, skip)
        self._host: tuple[int | None, float, float] | None = None  # (step, its loss, its gradient norm), read
        self._skips = 0  # the steps the guard skipped in a row
        self._trained: dict[int, int] = {}  # optimizer -> the most of its parameters that had a gradient at a step
        self._joined: tuple[int, int] = (-JOINED, 0)  # the last step parameters began training at, how many
        self._after: Event | None = None  # the spike whose aftermath is watched (its loss back under its line)
        self._loss: Tensor | None = None  # this step's summed micro-batch losses, on the device
        self._batch: Tensor | None = None  # this step's batch fingerprint, on the device
        # step -> its micro-batches (the inputs, as received) and their ids: held until the step's verdict is read
        self._held: dict[int, list[tuple[object, Mapping[str, Any] | None]]] = {}
        self._losses = 0
        self._stepped = False  # the gradients' norms are in the step's row: the optimizer steps now
        self._scaled = False  # whether a loss scaler is on (it skips the steps whose gradients overflow)
        self._snapshot: list[Tensor] = []  # the weights before the step, for the update norms
        # (step, its flags on the host, their CUDA event, whether a loss was seen, whether a loss scaler is on)
        self._pending: deque[tuple[int, Tensor, Any, bool, bool]] = deque()
        self._armed = True  # a step without a verdict has passed since the last event: a blow-up is one event
        self._made: dict[int, Made | None] = {}  # step -> its replay: where its non-finite values began
        self._replayed: dict[int, Replayed | None] = {}  # step -> its replay: whether its spike reproduces
        self._out = 0  # rows already in the record and the logs (rows are written out in order)
        self._saved_at = time.monotonic()  # when the JSON file was last written
        self._unreadable = False  # an exception left the device unreadable: nothing more is read from it

    # --- lifetime -------------------------------------------------------------------------------------

    def attach(self, model: nn.Module, run: Run, optimizers: Sequence[Any] = ()) -> None:
        super().attach(model, run, optimizers)
        self.log_dir = run.log_dir
        self._reset()
        self.events = []
        self.requested.clear()  # the same set: the other callbacks hold it
        self._ranks = self._world()  # every rank's row is summed (one collective)
        # a weight frozen now is watched from the step it trains (unfrozen): until then none of its bytes is read
        self._watch([(name, p) for name, p in self._selected.values() if p.requires_grad])
        device = self._params[0][1].device if self._params else None
        # By default where the verdict is read at once (not on a GPU: there it comes a step late, after the optimizer
        # step; asked for, one synchronisation a step), a step whose gradients turn non-finite is replayed to find the
        # module that made them, one whose loss or gradient norm spikes to tell whether it reproduces; never when
        # sharded (a replay is a forward every rank must run) nor compiled.
        on_gpu = device is not None and device.type == "cuda"
        replay = not on_gpu if self.replay is None else self.replay
        if device is not None and replay and self._views is not None and not compiled(model):
            self._calls = ForwardCalls(model, device)  # type: ignore[arg-type]

    def _watch(self, params: list[tuple[str, nn.Parameter]]) -> None:
        """Watch ``params`` (names and parameters, in depth order): their views, their samples for the update norms,
        and (once allocated) the ring widened to them, its rows kept for the weights watched before."""
        before = {name: i for i, name in enumerate(self._names)}
        self._names = [name for name, _ in params]
        self._params = params
        self._views = None if any(is_sharded(p) for _, p in params) else [p.detach() for _, p in params]
        # a replicated weight is held by every rank
        parts = [local_shard(name, p.detach(), self._ranks) for name, p in params]
        device = parts[0][0].device if parts else None
        # each part's copies, for the three norms of the row: on the device once (not copied there each step)
        self._copies = torch.tensor([float(c) for _, c in parts] * 3, dtype=torch.float32, device=device)
        if self.update_norms != "off":  # the sampled elements are kept across the step: 1 % of the bytes, "exact" all
            self._strides = [stride(part.numel(), self.update_norms) for part, _ in parts]
            samples = [sampled(part, s) for (part, _), s in zip(parts, self._strides, strict=True)]
            views, strides = self._views, self._strides
            self._samples = None if views is None else [sampled(v, s) for v, s in zip(views, strides, strict=True)]
            self._snapshot = [x.clone() for x in samples]
            scale = [math.sqrt(part.numel() / max(x.numel(), 1)) for (part, _), x in zip(parts, samples, strict=True)]
            self._scale = None if all(c == 1 for c in scale) else torch.tensor(scale, device=device)
        if self._ring.tensor is not None and device is not None:
            self._allocate(device, len(params), [before.get(name) for name in self._names])

    def _watch_trained(self) -> None:
        """The selected weights that train now (unfrozen) and were not watched, watched from this step (none is ever
        left: its columns keep the window's rows)."""
        watched = {name for name, _ in self._params}
        params = [(name, p) for name, p in self._selected.values() if name in watched or p.requires_grad]
        if len(params) > len(self._params):
            self._watch(params)

    def detach(self) -> None:
        super().detach()
        if self._calls is not None:
            self._calls.remove()
            self._calls = None
        self._params, self._snapshot, self._views, self._samples = [], [], None, None
        self._pending.clear()
        self._held = {}

    def _weights(self) -> list[Tensor]:
        """This rank's part of each selected weight, as it is now (a plain tensor's view is kept: no call a step)."""
        if self._views is not None:
            return self._views
        return [self._shard(name, p)[0] for name, p in self._params]

    def _sampled(self, weights: list[Tensor]) -> list[Tensor]:
        """The sampled elements of each weight (:meth:`_weights`), as views."""
        if self._samples is not None:
            return self._samples
        return [sampled(part, s) for part, s in zip(weights, self._strides, strict=True)]

    def step_starts(self, step: int, measured: int | None) -> None:
        """A training step begins (every step is recorded: ``step`` is its number)."""
        self._step = step
        self._loss, self._losses, self._batch = None, 0, None
        self._rates = []
        if self.keep_batch:  # the steps whose verdicts are still to be read (a step late on a GPU), and this one
            self._held = {s: b for s, b in self._held.items() if s >= step - 1 - len(self._pending)}

    def manual_step(self, loss: Tensor | None, lr: float | None) -> None:
        self._manual_rate = lr
        if self.guard and self._step == 0:
            rank_zero_warn("FlightRecorder: the guard cannot skip a manual update (NetDiag.step): it is off")

    # --- every step: a few fused kernels, nothing read back -------------------------------------------

    def add_loss(self, loss: Tensor) -> None:
        """One micro-batch's loss (the step's is their mean): a scalar tensor, kept on its device."""
        if self._step is None or not self._params:
            return
        value = loss.detach().float()
        value = value.mean() if value.dim() else value  # a loss is a scalar: no kernel for it
        self._loss = value if self._loss is None else self._loss + value
        self._losses += 1

    def batch_seen(self, inputs: object, index: Mapping[str, Any] | None) -> None:
        """A micro-batch: its fingerprint added to the step's, on the device (per tensor the sum of its values and
        1e-3 times the sum of their squares: additive, so that micro-batches and ranks add up to the global batch's;
        nothing read back); the inputs held until the step's verdict is read, so that an event's batch can be kept."""
        if self._step is None or not self._params:
            return
        tensors = [t.detach() for t in _tensors(inputs)]
        if not tensors:
            return
        with torch.no_grad():
            sums = [stats.sum_and_squares(t) for t in tensors]  # no float64 copy of a batch of images
            both = sums[0] if len(sums) == 1 else torch.stack(sums).sum(0)
            value = torch.add(both[0], both[1], alpha=1e-3)
        self._batch = value if self._batch is None else self._batch + value
        if self.keep_batch:
            self._held.setdefault(self._step, []).append((inputs, None if index is None else dict(index)))

    def before_step(self, optimizer: Any | None) -> None:
        """Just before the optimizer steps (None: a manual update): the gradients' norms, and the weights kept."""
        if self._step is None:
            return
        # each group's rate, as cheaply as the loss: host floats (a tensor rate would wait for the device: not read)
        groups = () if optimizer is None else optimizer.param_groups
        self._rates += [_rate(g["lr"]) for g in groups] if optimizer is not None else [_rate(self._manual_rate)]
        if optimizer is not None:  # parameters that begin training (unfrozen): more with a gradient than ever before
            trained = sum(p.grad is not None for g in groups for p in g["params"])
            most = self._trained.get(id(optimizer))
            if most is None or trained > most:
                self._watch_trained()
            if most is not None and trained > most:
                self._joined = (self._step, trained - most)  # type: ignore[assignment]
                self._forget_bands()
            self._trained[id(optimizer)] = max(trained, most or 0)
        if not self._params:
            return
        weights = self._weights()
        plain = self._views is not None
        dense = torch.strided
        grads = [  # each .grad read once: a read is a call into C++
            self._missing(part) if (g := p.grad) is None else g if plain and g.layout == dense else self._part(name, g)
            for (name, p), part in zip(self._params, weights, strict=True)
        ]
        if self._ring.tensor is None:
            self._allocate(weights[0].device, len(weights))
        row = self._ring.next
        torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32), out=row.grads)
        self._stepped = True
        amp = None if self.run is None else self.run.loss_scale()
        self._scaled = amp is not None
        if amp is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            row.grads.div_(amp)  # a fused optimizer unscales inside its step
        torch.linalg.vector_norm(row.grads, out=row.grad_total)  # this rank's, for now
        if self.update_norms != "off":
            torch._foreach_copy_(self._snapshot, self._sampled(weights))
        if self.guard:
            self._guard(optimizer, row)
        if self._calls is not None and self._armed:  # once a blow-up
            self._replay(row)

    def _part(self, name: str, grad: Tensor) -> Tensor:
        """What the norm of a gradient that is not a whole strided tensor is taken of: this rank's shard; the values
        of a sparse one (``nn.Embedding(sparse=True)``: its dense form's norm)."""
        part = grad if self._views is not None else self._shard(name, grad)[0]
        return part if part.layout == torch.strided else stats.sparse_values(part)

    def _replay(self, row: Row) -> None:
        """The step's forward run again, before the optimizer steps (the weights still those that ran it): where its
        gradients are not finite, to find the module that made them (not under a loss scaler: there an overflow is
        routine); where its loss or gradient norm spikes, to tell whether it reproduces. Kept for the step's event,
        with those still to be read (on a GPU the verdict comes a step late)."""
        step: int = self._step  # type: ignore[assignment]
        if not self._scaled and not math.isfinite(self._read(row)[1]):
            self._made = {s: m for s, m in self._made.items() if s >= step - 2}
            self._made[step] = where_nonfinite(self._calls)  # type: ignore[arg-type]
            return
        decided = self._decided[1] if self._decided is not None and self._decided[0] == step else None
        if decided is None and (self._ranks == 1 or self.replay):  # several ranks decide together: a collective
            decided = self._is_event(row)
        if decided:
            self._replayed = {s: r for s, r in self._replayed.items() if s >= step - 2}
            self._replayed[step] = reproduces(self._calls)  # type: ignore[arg-type]

    def _guard(self, optimizer: Any | None, row: Row) -> None:
        """The guard: a step whose loss or total gradient norm is an event (over its spike line, or not finite) is
        not applied. Every gradient of the optimizer is dropped (``grad = None``): torch's optimizers leave a
        parameter without one as it was, and its state too (Adam's moments, its step count). Decided once a step,
        at one host read; more than ``guard`` such steps in a row stop the run (:class:`GuardStopped`)."""
        step = self._step
        if optimizer is None:  # a manual update: the user's code applies it, nothing can keep it out
            return
        if self._decided is None or self._decided[0] != step:  # several optimizers step in one step: decided once
            skip = self._is_event(row)
            self._decided = (step, skip)  # type: ignore[assignment]
            self._skips = self._skips + 1 if skip else 0
            if self._skips > self.guard:
                first = step - self._skips + 1  # type: ignore[operator]
                raise GuardStopped(
                    f"FlightRecorder: {self._skips} steps in a row ({first} to {step}) had a loss or gradient norm "
                    f"out of its band or not finite: more than guard={self.guard} skips; the run is stopped"
                )
        if self._decided is not None and self._decided[1]:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    def _forget_bands(self) -> None:
        """Parameters began training (unfrozen): the bands describe the model before, whose loss and gradients move
        as the new parameters begin to learn. For :data:`JOINED` steps nothing scores, as before the first band."""
        if self._upper is not None:
            self._upper = torch.full_like(self._upper, math.nan)
            self._refreshed = -1  # the host's lines are read again (NaN: nothing is over them)
        self._quiet_until = self._ring.rows + JOINED

    def _is_event(self, row: Row) -> bool:
        """Whether the step's loss (the mean of its micro-batches') or total gradient norm, reduced across ranks,
        is over its spike line or not finite (not a loss unseen; not gradients under a loss scaler, which skips
        those itself): one read from the device, compared on the host (the lines read once each refresh)."""
        if self._ranks > 1:  # each rank's loss and part of the gradients: the row's sums, early
            w = len(self._names)
            own = self._loss if self._loss is not None else row.loss.new_zeros(())  # a NaN loss stays NaN
            parts = torch.stack([own, own.new_tensor(float(self._losses)),
                                 (row.grads.square() / self._copies[2 * w :]).sum()])  # type: ignore[index]  # fmt: skip
            total, count, squares = self.run.reduce(parts, "sum").tolist()  # type: ignore[union-attr]
            loss, grad = total / count if count else math.nan, math.sqrt(squares)
        else:
            (loss, grad), count = self._read(row), self._losses
        if self._lines is None or self._lines[0] != self._refreshed:
            self._lines = (self._refreshed, *self._upper[:2].tolist())  # type: ignore[index]
        _, loss_line, grad_line = self._lines
        nonfinite = (not math.isfinite(loss), not math.isfinite(grad))
        # a NaN line (no band yet): never over
        return bool(step_causes(nonfinite, (loss > loss_line, grad > grad_line), count > 0, self._scaled))

    def _read(self, row: Row) -> tuple[float, float]:
        """This rank's loss of the step (the mean of its micro-batches'; NaN: none seen) and total gradient norm, on
        the host: one read a step, shared by the guard and the replay."""
        if self._host is None or self._host[0] != self._step:
            pair = [math.nan, float(row.grad_total)] if self._loss is None else torch.stack(
                [self._loss / self._losses, row.grad_total]).tolist()  # fmt: skip
            self._host = (self._step, pair[0], pair[1])
        return self._host[1], self._host[2]

    def _missing(self, part: Tensor) -> Tensor:
        key = (part.device, part.dtype)
        if key not in self._empty:
            self._empty[key] = part.new_zeros(0)
        return self._empty[key]

    def after_step(self, optimizer: Any | None = None, logging: bool = True) -> None:
        """After the step's update: the row of this step written into the ring, its verdict computed on the device.
        A few kernels, each writing in place into views made once (on a CPU a call, not its work, is the cost).
        ``logging``: the front end measures this step (its meters copy to the host there anyway): only such a step
        saves the window while training runs (``save_interval``), so that no other step waits for the device."""
        step = self._step
        if step is None or not self._stepped or not self._params:
            return
        self._stepped = False
        weights, row = self._weights(), self._ring.next
        if self.update_norms != "off":
            torch._foreach_sub_(self._snapshot, self._sampled(weights))  # now the update (with its sign flipped)
            torch.stack(torch._foreach_norm([*self._snapshot, *weights], 2, dtype=torch.float32), out=row.changes)
            if self._scale is not None:  # a sample's norm to the whole update's
                row.updates.mul_(self._scale)
        else:  # the update columns stay NaN (the row is made so)
            torch.stack(torch._foreach_norm(weights, 2, dtype=torch.float32), out=row.weights)
        if self._loss is None:
            row.loss.fill_(math.nan)
        else:
            row.loss.copy_(self._loss)
        if self._batch is None:
            row.batch.fill_(math.nan)
        else:
            row.batch.copy_(self._batch)
        if self._ranks > 1:  # one small collective: the same row, exactly, on every rank
            row.count.fill_(self._losses)
            row.norms.square_().div_(self._copies)  # type: ignore[arg-type]
            row.loss.nan_to_num_(0.0)
            row.batch.nan_to_num_(0.0)
            row.all.copy_(self.run.reduce(row.all, "sum"))  # type: ignore[union-attr]
            row.norms.sqrt_()
            row.loss.div_(row.count)  # 0 / 0 (no loss seen): NaN
            torch.linalg.vector_norm(row.grads, out=row.grad_total)
        elif self._losses > 1:
            row.loss.div_(self._losses)
        joined = self._joined[1] if self._joined[0] == step else 0
        self._ring.written(step, self._losses > 0, tuple(self._rates), self._decided == (step, True), joined)
        self._judge(step, row)
        if self._calls is not None:
            self._calls.step_done()
        if logging and self.save_interval is not None and time.monotonic() - self._saved_at >= self.save_interval:
            self._keep(running=True)

    def _judge(self, step: int, row: Row) -> None:
        """The verdict of the step's row, on the device: the loss and the total gradient norm not finite; each scored
        value over its level (against the bands of the steps before, refreshed every few steps)."""
        flags, scaled, rows = self._flags, self._scaled, self._ring.rows
        assert flags is not None
        # before MIN_BAND no band is long enough; for JOINED rows after parameters began training none describes them
        due = rows % spikes.REFRESH == 0 or rows == self._quiet_until
        if due and rows >= max(spikes.MIN_BAND, self._quiet_until):
            self._upper = spikes.over(self._ring.band(row.scored.numel()), self._levels)  # type: ignore[arg-type]
            self._refreshed = rows
        self._ring.advance()
        # x - x is 0 for a finite x, NaN for NaN and inf: one kernel fewer than isfinite
        torch.ne(row.judged - row.judged, 0, out=self._nonfinite)
        torch.gt(row.scored, self._upper, out=self._spiked)  # type: ignore[arg-type]
        seen = self._losses > 0
        if flags.device.type == "cuda":  # read one step later, when the copy is surely done: no wait now
            host = torch.empty(flags.shape, dtype=torch.bool, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((step, host, event, seen, scaled))
            while len(self._pending) > 1:
                self._resolve(*self._pending.popleft())
        else:
            self._resolve(step, flags, None, seen, scaled)

    def _allocate(self, device: torch.device, w: int, kept: Sequence[int | None] = ()) -> None:
        """The ring, the levels and the verdict, on the device: once, and again where weights join (``kept``: see
        :meth:`Ring.allocate`)."""
        self._ring.allocate(device, w, kept)
        # not each weight's gradient: far too noisy a series to judge alone
        levels = [spikes.SPIKE] * 2 + [spikes.WEIGHT_SPIKE] * (2 * w)
        self._levels = torch.tensor(levels, dtype=torch.float32, device=device)
        self._upper = torch.full_like(self._levels, math.nan)  # no band yet: nothing scores
        self._flags = torch.zeros(4 + 2 * w, dtype=torch.bool, device=device)
        self._nonfinite, self._spiked = self._flags[:2], self._flags[2:]

    def _resolve(self, step: int, flags: Tensor, event: Any, seen: bool, scaled: bool) -> None:
        if event is not None:
            event.synchronize()
        values = flags.tolist()  # the loss and the total gradient not finite, then the scores above their levels
        if self._after is not None and step > self._after["step"]:
            self._aftermath(step, back=seen and not values[0] and not values[2])
        causes = step_causes(values[:2], values[2:4], seen, scaled, weights=any(values[4:]))
        if not causes:
            self._armed = True
            return
        if self._armed and len(self.events) < MAX_EVENTS:
            self._event(step, causes[0], also=causes[1:])
        self._armed = False

    # --- events ---------------------------------------------------------------------------------------

    def _event(
        self, step: int, cause: str, error: str | None = None, also: Sequence[str] = (), quiet: bool = False
    ) -> None:
        slots, rows = self._ring.read()
        steps: list[int] = [self._ring.steps[i] for i in slots]  # type: ignore[misc]
        event: Event = {"step": step, "cause": cause}
        if also:
            event["also"] = list(also)
        if error is not None:
            event["error"] = error
        made, replayed = self._made.pop(step, None), self._replayed.pop(step, None)
        if made is not None:
            event["made"] = made
        if replayed is not None:
            event["replayed"] = replayed
        if step in steps:
            at = steps.index(step)
            event["loss"] = _number(rows[at, LOSS])
            event["grad_total"] = _number(rows[at, GRAD_TOTAL])
            w = len(self._names)
            found = spikes.began(rows[:, NORMS : NORMS + 3 * w], at, [PRIORITY[c // w] for c in range(3 * w)])
            event["began"] = [
                {"name": self._names[c % w], "series": SERIES[c // w], "step": steps[t], "score": _number(score)}
                for c, t, score in found[:8]
            ]
            event["lead"] = step - steps[found[0][1]] if found else 0
            if cause in CAUSES:  # not an exception's end
                if self._ring.guarded[slots[at]]:
                    event["skipped"] = True
                self._evidence(event, slots, rows, at)
                self._keep_batch(event, rows[at, BATCH])
        self.events.append(event)
        if cause in CAUSES[2:]:  # a spike: is its loss back under its line at the next steps?
            self._after = event
        self.requested.add(step + 1 + len(self._pending))  # the first step not yet begun
        if quiet:  # the file only, with the ring's steps not yet written out
            self._save(running=True)
            return
        kept = f"the last {len(steps)} steps are written to the logs"
        rank_zero_warn(f"FlightRecorder: {live_text(event)}{guarded_text(event)}; {kept}")
        self.write_out()

    def _evidence(self, event: Event, slots: list[int], rows: Tensor, at: int) -> None:
        """Why the event's step spiked, as far as the window tells: the loss of the steps before (its median), how
        many weights' gradient and update norms left their band with it, a rise of the learning rate at it."""
        w, band = len(self._names), rows[max(at - spikes.BAND, 0) : at]
        losses = band[:, LOSS][band[:, LOSS].isfinite()]
        if len(losses):
            event["loss_median"] = _number(losses.median())
        rows_at = rows[at, NORMS : NORMS + 3 * w]
        scores = spikes.band_scores(spikes.decades(band[:, NORMS : NORMS + 3 * w]), spikes.decades(rows_at))
        out = (scores > spikes.LEFT) | ~rows_at.isfinite()
        event["rose"] = {"gradient": int(out[2 * w :].sum()), "update": int(out[:w].sum()), "of": w}
        before, now = (self._ring.rates[slots[i]] if i >= 0 else () for i in (at - 1, at))
        # the groups in order, as the optimizers stepped; one added since (unfrozen layers) has no rate before
        jumps = [(a, b) for a, b in zip(before, now) if a > 0 and b >= RATE_JUMP * a]  # noqa: B905
        if jumps:
            first, last = max(jumps, key=lambda j: j[1] / j[0])
            rate: Rate = {"from": first, "to": last, "groups": len(jumps), "of": len(now)}
            event["rate"] = rate

    def _keep_batch(self, event: Event, fingerprint: Tensor) -> None:
        """The event's batch: its fingerprint, and (``keep_batch``) its inputs as the model received them, on the host
        and cut to ``keep_batch`` bytes, to a file beside the logs (this rank's micro-batches; rank 0's file)."""
        batch: Batch = {}
        if math.isfinite(fingerprint):
            batch["fingerprint"] = float(fingerprint)
        held = self._held.pop(event["step"], None)
        if held and self.keep_batch:
            inputs, kept, cut = _to_host([inputs for inputs, _ in held], self.keep_batch)
            index = [dict(ids) for _, ids in held if ids is not None]
            batch["bytes"], batch["cut"] = kept, cut
            if index:
                batch["index"] = index
            if self.log_dir is not None and rank() == 0:
                name = tags.batch_file(self.prefix, event["step"])
                os.makedirs(self.log_dir, exist_ok=True)
                saved = {"step": event["step"], "index": index, "micro_batches": inputs, "cut": cut}
                torch.save(saved, os.path.join(self.log_dir, name))
                batch["file"] = name
        if batch:
            event["batch"] = batch

    def _aftermath(self, step: int, back: bool) -> None:
        """A step after a spike: its loss back under the spike's line ends the watch (``back``: that step), as do
        :data:`AFTER` steps without; the window is written out again, so that the steps after it are kept."""
        event = self._after
        assert event is not None
        if not back and step - event["step"] < AFTER:
            return
        event["back"] = step if back else None
        self._after = None
        self.write_out()

    def crashed(self, error: BaseException | str, quiet: bool = False) -> None:
        """An exception ends training (or, in words, something else did): an event of its own at the last step
        recorded, naming the weights out of their band then; the window is written out. Where the device cannot be
        read any more (a CUDA error breaks its context; torch raises a RuntimeError) the event goes into the file as
        it was last saved, so that the exception that ends training stays the only one. ``quiet``: from a signal
        handler, to the JSON file only (no logger, no warning: the code it interrupted may be inside either)."""
        step = self._ring.last_step
        if step is None or self._unreadable:
            return
        # an exception without a message (KeyboardInterrupt) is said by its type alone
        what = error if isinstance(error, str) else type(error).__name__ + (f": {error}" if str(error) else "")
        try:
            self._drain()
            self._event(step, "exception", what[:300], quiet=quiet)
        except RuntimeError as failed:  # what torch raises from a broken device (a CUDA error, out of memory)
            self._unreadable = True
            self._events_only(step, what[:300], failed, quiet)

    def _events_only(self, step: int, what: str, failed: RuntimeError, quiet: bool) -> None:
        """The exception's event, without the ring (the device cannot be read): into the record and into the JSON
        file as it was last saved (its steps up to that save: the file is the copy kept on the host)."""
        event: Event = {
            "step": step,
            "cause": "exception",
            "error": what,
            "unread": f"{type(failed).__name__}: {failed}"[:300],
        }
        self.events.append(event)
        if not quiet:
            rank_zero_warn(f"FlightRecorder: {event_text(event)}")
        path = self._path()
        if path is None:
            return
        data = persist.read(path) or self.record.to_json()  # never saved (or not readable): the record as it is
        data.update(self.record.describe())  # the events, this one with them
        persist.write(path, data)

    def finish(self) -> None:
        """Training ended: the verdicts still travelling are read, the window is written out."""
        self._drain()
        self.write_out()

    def _drain(self) -> None:
        """The verdicts still travelling from the device, read now."""
        if self._unreadable:  # they are lost
            self._pending.clear()
        while self._pending:
            self._resolve(*self._pending.popleft())

    def write_out(self) -> None:
        """The ring's steps not yet written, into the record and to the loggers; the record to its JSON file."""
        if self._unreadable:  # the file has what could be kept
            return
        slots, rows = self._ring.read(since=self._out)
        if not slots:  # no new row: no copy; only an event on rows already written changes what is kept
            last = self.record.last_step
            if last is not None and self.record.describe() != self._described:
                self._emit(last, {}, {})  # the description, with its new event
                self._keep()
            return
        self._out = self._ring.rows
        for step, scalars in self._rows_scalars(slots, rows):
            self._emit(step, scalars, {})
        self._keep()

    def _rows_scalars(self, slots: list[int], rows: Tensor) -> list[tuple[int, dict[Key, float]]]:
        """Ring rows (their places and values, as :meth:`_window` gives them) as the steps and scalars recorded."""
        if not slots:
            return []
        w = len(self._names)
        update_totals = torch.linalg.vector_norm(rows[:, NORMS : NORMS + w], dim=1).tolist()
        out = []
        for i, row, update_total in zip(slots, rows.tolist(), update_totals, strict=True):
            scalars: dict[Key, float] = {
                ("flight_grad_total", ""): row[GRAD_TOTAL], ("flight_update_total", ""): update_total
            }  # fmt: skip
            if self._ring.seen[i]:
                scalars[("flight_loss", "")] = row[LOSS]  # dropped when not finite, as every value is:
                if not math.isfinite(row[LOSS]):
                    scalars[("flight_loss_nonfinite", "")] = 1.0
            if math.isfinite(row[BATCH]):
                scalars[("flight_batch", "")] = row[BATCH]
            if self._ring.guarded[i]:
                scalars[("flight_guarded", "")] = 1.0
            if self._ring.joined[i]:
                scalars[("flight_joined", "")] = float(self._ring.joined[i])
            if self.update_norms != "off" and update_total == 0:  # no weight changed: the step was skipped
                scalars[("flight_skipped", "")] = 1.0
            for k, name in enumerate(self._names):
                update, weight, grad = row[NORMS + k], row[NORMS + w + k], row[NORMS + 2 * w + k]
                scalars[("flight_grad_norm", name)] = grad
                if not math.isfinite(grad):
                    scalars[("flight_grad_nonfinite", name)] = 1.0
                scalars[("flight_update_norm", name)] = update
                scalars[("flight_weight_norm", name)] = weight
            out.append((self._ring.steps[i], scalars))
        return out  # type: ignore[return-value]  # a written row has its step

    def _keep(self, running: bool = False) -> None:
        """The record to its JSON file (``running``: see :meth:`_save`), and the loggers flushed: on disk before the
        run may die."""
        self._save(running)
        if self.run is not None:
            self.run.flush()

    def _save(self, running: bool = False) -> None:
        """The record to its JSON file; ``running``: with the ring's rows not yet written out added (to the file
        only: the record and the loggers get them at an event or the end), what a run killed without an exception
        (SIGKILL, the out-of-memory killer, an abort) leaves. One copy from the device."""
        self._saved_at = time.monotonic()
        path = self._path()
        if path is None:
            return
        later = self._rows_scalars(*self._ring.read(since=self._out)) if running else []
        persist.write(path, self.record.to_json([(step, finite_only(scalars)) for step, scalars in later]))

    def _path(self) -> str | None:
        """The window's file (rank 0's, beside the logs); None without logs."""
        if self.log_dir is None or rank() != 0:
            return None
        return os.path.join(self.log_dir, tags.record_file(self.prefix, self.kind))


def _tensors(inputs: object) -> list[Tensor]:
    """The tensors of a batch, in any nesting of tuples, lists and mappings (a model's args and kwargs)."""
    if isinstance(inputs, Tensor):
        return [inputs]
    if isinstance(inputs, Mapping):
        return [t for value in inputs.values() for t in _tensors(value)]
    if isinstance(inputs, (tuple, list)):
        return [t for value in inputs for t in _tensors(value)]
    return []


def _to_host(inputs: object, cap: int) -> tuple[object, int, bool]:
    """``inputs`` with every tensor copied to the host, in the same nesting, each cut to its first rows where the
    bytes so far would pass ``cap``; the bytes kept and whether any tensor was cut."""
    kept, cut = 0, False

    def copy(x: object) -> object:
        nonlocal kept, cut
        if isinstance(x, Tensor):
            row = x.element_size() * (x[0].numel() if x.dim() else 1)
            rows = x.shape[0] if x.dim() else 1
            fit = rows if row == 0 else min(rows, max(cap - kept, 0) // row)
            cut = cut or fit < rows
            part = x[:fit] if x.dim() else x
            kept += part.numel() * x.element_size()
            return part.detach().cpu()
        if isinstance(x, Mapping):
            return {k: copy(v) for k, v in x.items()}
        if isinstance(x, (tuple, list)):
            return [copy(v) for v in x]
        return x

    return copy(inputs), kept, cut


def _rate(lr: object) -> float:
    """A parameter group's rate as the host holds it; NaN for a tensor rate (reading it would wait for the device)."""
    return float(lr) if isinstance(lr, (float, int)) else math.nan


def _number(x: Tensor | float) -> float | str:
    """A JSON-able value: the float, or its name where it is not finite."""
    v = float(x)
    return v if math.isfinite(v) else str(v)
