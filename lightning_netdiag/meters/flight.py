"""The flight recorder: cheap records of every step in a ring buffer on the device, spike scores for the loss, the
total gradient norm and each weight's update and norm, and the window written out when a run spikes, goes
non-finite or dies.

A step's life, as the front ends drive it: :meth:`FlightMeter.begin` with the step's number; :meth:`add_loss` with
each micro-batch's loss (where the front end sees it); :meth:`before_step` just before the optimizer steps (the
gradients, complete); :meth:`after_step` after it (the update). :meth:`crashed` when an exception ends training,
:meth:`finish` when it ends. Nothing is copied to the host on a step without an event: on a GPU each step's
verdict (a few bits) travels asynchronously and is read one step later.
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_netdiag import spikes, tags
from lightning_netdiag.dist import is_sharded, local_shard, rank, rank_zero_warn
from lightning_netdiag.meters.base import InRecord
from lightning_netdiag.meters.parameters import ParameterMeter
from lightning_netdiag.record import FlightRecord, Key
from lightning_netdiag.run import Run, check_positive_int
from lightning_netdiag.select import WEIGHT_NDIMS

__all__ = ["CAUSES", "MAX_EVENTS", "FlightMeter"]

#: The bits of a step's verdict; the first set names the event (the others are said with it).
CAUSES = ("non-finite loss", "non-finite gradients", "loss spike", "gradient spike", "weight spike")
#: The events kept per run: a run that keeps blowing up says so, its first events say where it began.
MAX_EVENTS = 32
# A row as the host reads it: the step's loss, the micro-batch losses seen, the gradient, update and weight norms over
# every watched weight, then each weight's gradient, update and weight norms. On the device the scored columns come
# first (the loss, the total gradient norm, each weight's update and norm), so that they are one slice: no gather.
_LOSS, _LOSSES, _GRAD, _UPDATE, _WEIGHT = range(5)
_FIRST = 5


def _host_order(w: int) -> list[int]:
    """The device row's column of each host column, for ``w`` weights."""
    return [0, 2 + 2 * w, 1, 3 + 2 * w, 4 + 2 * w, *range(5 + 2 * w, 5 + 3 * w), *range(2, 2 + 2 * w)]


_SERIES = ("gradient norm", "update norm", "weight norm")
# At the same step, a weight's own change (its norm, its update) comes before the gradients it makes.
_PRIORITY = (2, 1, 0)


class FlightMeter(ParameterMeter):
    """Every step: the loss, each selected weight's gradient, update and weight norms, in a ring of the last
    ``window`` steps; an event when the loss or the total gradient norm spikes or turns non-finite, or a weight's
    update or norm jumps.

    See :class:`lightning_netdiag.FlightRecorder` for the arguments and what is logged.
    """

    record_type = FlightRecord
    record: FlightRecord
    window = InRecord()
    events = InRecord()

    def __init__(
        self,
        window: int = 256,
        params: Sequence[type | str] | None = None,
        exclude: Sequence[type | str] = (),
        ndims: Sequence[int] | None = WEIGHT_NDIMS,
        update_norms: bool = True,
        prefix: str = "netdiag",
        history_size: int = 10_000,
    ) -> None:
        super().__init__(params, exclude, ndims, prefix, history_size)
        check_positive_int("window", window)
        if window <= spikes.MIN_BAND:
            raise ValueError(f"Expected `window` to be more than {spikes.MIN_BAND} steps, got {window}")
        self.window = window
        self.update_norms = bool(update_norms)
        self.log_dir: str | None = None  # where the window's JSON file goes (the front end's logs)
        self.requested: set[int] = set()  # steps the front end should measure in full (the one after an event)
        self._names: list[str] = []
        self._params: list[tuple[str, nn.Parameter]] = []  # the selected weights, in depth order
        self._views: list[Tensor] | None = None  # their detached views, when none is sharded
        self._copies: Tensor | None = None  # the ranks holding each part (their sum counts it once)
        self._empty: dict[tuple[torch.device, torch.dtype], Tensor] = {}  # a missing gradient's stand-in
        self._reset()

    def _reset(self) -> None:
        self._ring: Tensor | None = None  # [window, 5 + 3 * weights], float32, on the device
        # [BAND, 2 + 2 * weights]: the loss, the total gradient norm, each weight's update and norm, in decades
        self._band: Tensor | None = None
        self._bands: tuple[Tensor, Tensor] | None = None  # their median and spread, refreshed every REFRESH steps
        self._limits: Tensor | None = None  # each scored column's spike level
        self._constants: dict[float, Tensor] = {}  # counts of losses, on the device once each
        self._steps: list[int | None] = [None] * self.window  # the step of each ring row
        self._rows = 0  # rows written so far
        self._loss: Tensor | None = None  # this step's summed micro-batch losses, on the device
        self._losses = 0
        self._grads: list[Tensor] | None = None  # this step's gradient norms, before the optimizer step
        self._unscale: Tensor | float | None = None  # the loss scale a fused optimizer's gradients still carry
        self._snapshot: list[Tensor] = []  # the weights before the step, for the update norms
        # (step, its flags on the host, their CUDA event, whether a loss was seen, whether a loss scaler is on)
        self._pending: deque[tuple[int, Tensor, Any, bool, bool]] = deque()
        self._armed = True  # a step without a verdict has passed since the last event: a blow-up is one event
        self._out = 0  # rows already in the record and the logs (rows are written out in order)

    # --- lifetime -------------------------------------------------------------------------------------

    def attach(self, model: nn.Module, run: Run, optimizers: Sequence[Any] = ()) -> None:
        super().attach(model, run, optimizers)
        self._reset()
        self.events = []
        self.requested.clear()  # the same set: the other callbacks hold it
        self._names = [name for name, _ in self._selected.values()]
        self._params = list(self._selected.values())
        self._views = None if any(is_sharded(p) for _, p in self._params) else [p.detach() for _, p in self._params]
        # every rank's row is summed (one collective): a replicated weight is held by every rank
        parts = [local_shard(name, p.detach(), self._world()) for name, p in self._params]
        device = parts[0][0].device if parts else None
        # each part's copies, for the three norms of the row: on the device once (not copied there each step)
        self._copies = torch.tensor([float(c) for _, c in parts] * 3, dtype=torch.float32, device=device)
        if self.update_norms:
            self._snapshot = [part.clone() for part, _ in parts]

    def detach(self) -> None:
        super().detach()
        self._params, self._snapshot, self._views = [], [], None
        self._pending.clear()

    def _weights(self) -> list[Tensor]:
        """This rank's part of each selected weight, as it is now (a plain tensor's view is kept: no call a step)."""
        if self._views is not None:
            return self._views
        return [self._shard(name, p)[0] for name, p in self._params]

    def begin(self, step: int | None) -> None:
        """A training step begins (every step is recorded: ``step`` is its number)."""
        self._step = step
        self._loss, self._losses = None, 0

    # --- every step: a few fused kernels, nothing read back -------------------------------------------

    def add_loss(self, loss: Tensor) -> None:
        """One micro-batch's loss (the step's is their mean): a scalar tensor, kept on its device."""
        if self._step is None or not self._params:
            return
        value = loss.detach().float()
        value = value.mean() if value.dim() else value  # a loss is a scalar: no kernel for it
        self._loss = value if self._loss is None else self._loss + value
        self._losses += 1

    def before_step(self, optimizer: Any | None) -> None:
        """Just before the optimizer steps (None: a manual update): the gradients' norms, and the weights kept."""
        if self._step is None or not self._params:
            return
        weights = self._weights()
        plain = self._views is not None
        grads = [
            self._missing(part) if p.grad is None else p.grad if plain else self._shard(name, p.grad)[0]
            for (name, p), part in zip(self._params, weights, strict=True)
        ]
        self._grads = list(torch._foreach_norm(grads, 2, dtype=torch.float32))
        amp = None if self.run is None else self.run.loss_scale()
        # a fused optimizer unscales inside its step: its gradients are still scaled here
        self._unscale = amp if getattr(optimizer, "_step_supports_amp_scaling", False) else None
        if self.update_norms:
            torch._foreach_copy_(self._snapshot, weights)

    def _missing(self, part: Tensor) -> Tensor:
        key = (part.device, part.dtype)
        if key not in self._empty:
            self._empty[key] = part.new_zeros(0)
        return self._empty[key]

    def _constant(self, value: float, like: Tensor) -> Tensor:
        """``value`` as a float32 tensor on ``like``'s device, made once: no copy to the device each step."""
        if value not in self._constants:
            self._constants[value] = torch.full((), value, dtype=torch.float32, device=like.device)
        return self._constants[value]

    def after_step(self) -> None:
        """After the step's update: the row of this step into the ring, its verdict computed on the device."""
        step, grads = self._step, self._grads
        if step is None or grads is None or not self._params:
            return
        self._grads = None
        weights = self._weights()
        if self.update_norms:
            torch._foreach_sub_(self._snapshot, weights)  # now the update (with its sign flipped)
            norms = torch.stack([*grads, *torch._foreach_norm([*self._snapshot, *weights], 2, dtype=torch.float32)])
        else:
            nans = [self._constant(math.nan, grads[0])] * len(grads)
            norms = torch.stack([*grads, *nans, *torch._foreach_norm(weights, 2, dtype=torch.float32)])
        if self._unscale is not None:
            norms[: len(grads)] /= self._unscale
        loss = self._loss if self._loss is not None else self._constant(0.0, norms)
        count = self._constant(float(self._losses), norms)
        if self._world() > 1:  # one small collective: the same row, exactly, on every rank
            parts = torch.cat([loss.reshape(1), count.reshape(1), norms.square() / self._copies])  # type: ignore[operator]
            summed = self.run.reduce(parts, "sum")  # type: ignore[union-attr]
            loss, count, norms = summed[0], summed[1], summed[2:].sqrt()
        w = len(grads)
        totals = torch.linalg.vector_norm(norms.view(3, w), dim=1)
        # as the device keeps it (_host_order); 0 / 0 (no loss seen): NaN
        row = torch.cat([(loss / count).reshape(1), totals[:1], norms[w:], count.reshape(1), totals[1:], norms[:w]])
        self._write(step, row, scaled=self.run is not None and self.run.loss_scale() is not None)

    def _write(self, step: int, row: Tensor, scaled: bool) -> None:
        if self._ring is None:
            self._allocate(row)
        i = self._rows % self.window
        self._ring[i] = row  # type: ignore[index]
        self._steps[i] = step
        # the verdict, on the device: the loss and the total gradient norm not finite; each score above its level
        scored = row[: 2 + 2 * len(self._params)]
        decades = spikes.decades(scored)
        if self._rows % spikes.REFRESH == 0:
            self._bands = spikes.band(self._band)  # type: ignore[arg-type]
        median, spread = self._bands  # type: ignore[misc]
        flags = torch.cat([~torch.isfinite(scored[:2]), (decades - median) / spread > self._limits])  # type: ignore[operator]
        self._band[self._rows % spikes.BAND] = decades  # type: ignore[index]
        self._rows += 1
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

    def _allocate(self, row: Tensor) -> None:
        """The ring, the bands and the indices, on the row's device, once."""
        w, device = len(self._params), row.device
        self._ring = torch.full((self.window, row.numel()), math.nan, dtype=torch.float32, device=device)
        self._band = torch.full((spikes.BAND, 2 + 2 * w), math.nan, dtype=torch.float32, device=device)
        # not each weight's gradient: far too noisy a series to judge alone
        levels = [spikes.SPIKE] * 2 + [spikes.WEIGHT_SPIKE] * (2 * w)
        self._limits = torch.tensor(levels, dtype=torch.float32, device=device)

    def _resolve(self, step: int, flags: Tensor, event: Any, seen: bool, scaled: bool) -> None:
        if event is not None:
            event.synchronize()
        values = flags.tolist()  # the loss and the total gradient not finite, then the scores above their levels
        bits = [
            values[0] and seen,  # no loss seen: nothing to judge
            values[1] and not scaled,  # a loss scaler skips the steps whose gradients overflow: no event
            values[2], values[3], any(values[4:]),  # a weight's update or norm
        ]  # fmt: skip
        if not any(bits):
            self._armed = True
            return
        if self._armed and len(self.events) < MAX_EVENTS:
            causes = [c for c, bit in zip(CAUSES, bits, strict=True) if bit]
            self._event(step, causes[0], also=causes[1:])
        self._armed = False

    # --- events ---------------------------------------------------------------------------------------

    def _window(self, since: int = 0) -> tuple[list[int], Tensor]:
        """The ring's rows from row ``since`` on (those still held) on the host, oldest first: their steps and
        values (one copy, at an event or the end only)."""
        n = min(self._rows - since, self.window)
        if self._ring is None or n <= 0:
            return [], torch.empty(0)
        order = [(self._rows - n + k) % self.window for k in range(n)]
        rows = self._ring[torch.tensor(order, device=self._ring.device)].cpu()[:, _host_order(len(self._names))]
        return [self._steps[i] for i in order], rows  # type: ignore[misc]

    def _event(self, step: int, cause: str, error: str | None = None, also: Sequence[str] = ()) -> None:
        steps, rows = self._window()
        event: dict[str, Any] = {"step": step, "cause": cause}
        if also:
            event["also"] = list(also)
        if error is not None:
            event["error"] = error
        if step in steps:
            at = steps.index(step)
            event["loss"] = _number(rows[at, _LOSS])
            event["grad_total"] = _number(rows[at, _GRAD])
            w = len(self._names)
            found = spikes.began(rows[:, _FIRST:], at, [_PRIORITY[c // w] for c in range(3 * w)])
            event["began"] = [
                {"name": self._names[c % w], "series": _SERIES[c // w], "step": steps[t], "score": _number(score)}
                for c, t, score in found[:8]
            ]
            event["lead"] = step - steps[found[0][1]] if found else 0
        self.events.append(event)
        self.requested.add(step + 1 + len(self._pending))  # the first step not yet begun
        kept = f"the last {len(steps)} steps are written to the logs"
        rank_zero_warn(f"FlightRecorder: {spikes.event_text(event)}; {kept}")
        self.write_out()

    def crashed(self, error: BaseException | str) -> None:
        """An exception ends training (or, in words, something else did): an event of its own at the last step
        recorded, naming the weights out of their band then; the window is written out."""
        self._drain()
        if self._rows:
            what = error if isinstance(error, str) else f"{type(error).__name__}: {error}"[:300]
            self._event(self._steps[(self._rows - 1) % self.window], "exception", what)  # type: ignore[arg-type]

    def finish(self) -> None:
        """Training ended: the verdicts still travelling are read, the window is written out."""
        self._drain()
        self.write_out()

    def _drain(self) -> None:
        """The verdicts still travelling from the device, read now."""
        while self._pending:
            self._resolve(*self._pending.popleft())

    def write_out(self) -> None:
        """The ring's steps not yet written, into the record and to the loggers; the record to its JSON file."""
        steps, rows = self._window(since=self._out)
        if not steps:  # no new row: no copy; only an event on rows already written changes what is kept
            last = self.record.last_step
            if last is not None and self.record.describe() != self._described:
                self._emit(last, {}, {})  # the description, with its new event
                self._keep()
            return
        self._out = self._rows
        w = len(self._names)
        for step, row in zip(steps, rows.tolist(), strict=True):
            scalars: dict[Key, float] = {
                ("flight_grad_total", ""): row[_GRAD], ("flight_update_total", ""): row[_UPDATE]
            }  # fmt: skip
            if row[_LOSSES] > 0:
                scalars[("flight_loss", "")] = row[_LOSS]  # dropped when not finite, as every value is:
                if not math.isfinite(row[_LOSS]):
                    scalars[("flight_loss_nonfinite", "")] = 1.0
            if self.update_norms and row[_UPDATE] == 0:  # no weight changed: the step was skipped
                scalars[("flight_skipped", "")] = 1.0
            for k, name in enumerate(self._names):
                grad, update, weight = row[_FIRST + k], row[_FIRST + w + k], row[_FIRST + 2 * w + k]
                scalars[("flight_grad_norm", name)] = grad
                if not math.isfinite(grad):
                    scalars[("flight_grad_nonfinite", name)] = 1.0
                scalars[("flight_update_norm", name)] = update
                scalars[("flight_weight_norm", name)] = weight
            self._emit(step, scalars, {})
        self._keep()

    def _keep(self) -> None:
        """The record to its JSON file, and the loggers flushed: on disk before the run may die."""
        self._save()
        if self.run is not None:
            self.run.flush()

    def _save(self) -> None:
        if self.log_dir is None or rank() != 0:
            return
        os.makedirs(self.log_dir, exist_ok=True)
        path = os.path.join(self.log_dir, tags.record_file(self.prefix, self.kind))
        with open(path + ".tmp", "w") as f:  # replaced whole: a reader never sees half a file
            json.dump(self.record.to_json(), f)
        os.replace(path + ".tmp", path)


def _number(x: Tensor | float) -> float | str:
    """A JSON-able value: the float, or its name where it is not finite."""
    v = float(x)
    return v if math.isfinite(v) else str(v)
