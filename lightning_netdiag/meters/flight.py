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
from lightning_netdiag.dist import local_shard, rank, rank_zero_warn
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
# the ring's first columns (the step's loss, the micro-batch losses seen, the totals, skipped), then each weight's
# gradient, update and weight norms
_LOSS, _LOSSES, _GRAD, _UPDATE, _SKIPPED = range(5)
_FIRST = 5
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
        self._copies: Tensor | None = None  # the ranks holding each part (their sum counts it once)
        self._empty: dict[tuple[torch.device, torch.dtype], Tensor] = {}  # a missing gradient's stand-in
        self._reset()

    def _reset(self) -> None:
        self._ring: Tensor | None = None  # [window, 5 + 3 * weights], on the device
        # [BAND, 2 + 2 * weights]: the loss, the total gradient norm, each weight's update and norm, in decades
        self._band: Tensor | None = None
        self._steps: list[int | None] = [None] * self.window  # the step of each ring row
        self._rows = 0  # rows written so far
        self._loss: Tensor | None = None  # this step's summed micro-batch losses, on the device
        self._losses = 0
        self._grads: Tensor | None = None  # this step's gradient norms, before the optimizer step
        self._snapshot: list[Tensor] = []  # the weights before the step, for the update norms
        self._pending: deque[tuple[int, Tensor, Any]] = deque()  # (step, its verdict on the host, its CUDA event)
        self._armed = True  # a step without a verdict has passed since the last event: a blow-up is one event
        self._written: set[int] = set()  # steps already in the record and the logs

    # --- lifetime -------------------------------------------------------------------------------------

    def attach(self, model: nn.Module, run: Run, optimizers: Sequence[Any] = ()) -> None:
        super().attach(model, run, optimizers)
        self._reset()
        self.events = []
        self.requested.clear()  # the same set: the other callbacks hold it
        self._names = [name for name, _ in self._selected.values()]
        self._params = list(self._selected.values())
        # every rank's row is summed (one collective): a replicated weight is held by every rank
        parts = [local_shard(name, p.detach(), self._world()) for name, p in self._params]
        device = parts[0][0].device if parts else None
        # each part's copies, for the three norms of the row: on the device once (not copied there each step)
        self._copies = torch.tensor([float(c) for _, c in parts] * 3, dtype=torch.float64, device=device)
        if self.update_norms:
            self._snapshot = [part.clone() for part, _ in parts]

    def detach(self) -> None:
        super().detach()
        self._params, self._snapshot = [], []
        self._pending.clear()

    def _weights(self) -> list[Tensor]:
        """This rank's part of each selected weight, as it is now."""
        return [self._shard(name, p)[0] for name, p in self._params]

    def begin(self, step: int | None) -> None:
        """A training step begins (every step is recorded: ``step`` is its number)."""
        self._step = step
        self._loss, self._losses = None, 0

    # --- every step -----------------------------------------------------------------------------------

    def add_loss(self, loss: Tensor) -> None:
        """One micro-batch's loss (the step's is their mean): a scalar tensor, kept on its device."""
        if self._step is None or not self._params:
            return
        value = loss.detach().double().mean().reshape(1)
        self._loss = value if self._loss is None else self._loss + value
        self._losses += 1

    def before_step(self, optimizer: Any | None) -> None:
        """Just before the optimizer steps (None: a manual update): the gradients' norms, and the weights kept."""
        if self._step is None or not self._params:
            return
        weights = self._weights()
        grads = [
            self._shard(name, p.grad)[0] if p.grad is not None else self._missing(part)
            for (name, p), part in zip(self._params, weights, strict=True)
        ]
        norms = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).double()
        amp = None if self.run is None else self.run.loss_scale()
        if amp is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            norms = norms / amp  # a fused optimizer unscales inside its step: these are still scaled
        self._grads = norms
        if self.update_norms:
            torch._foreach_copy_(self._snapshot, weights)

    def _missing(self, part: Tensor) -> Tensor:
        key = (part.device, part.dtype)
        if key not in self._empty:
            self._empty[key] = part.new_zeros(0)
        return self._empty[key]

    def after_step(self) -> None:
        """After the step's update: the row of this step into the ring, its verdict computed on the device."""
        step, grads = self._step, self._grads
        if step is None or grads is None or not self._params:
            return
        self._grads = None
        weights = self._weights()
        if self.update_norms:
            torch._foreach_sub_(self._snapshot, weights)  # now the update (with its sign flipped)
            updates = torch.stack(torch._foreach_norm(self._snapshot, 2, dtype=torch.float32)).double()
        else:
            updates = torch.full_like(grads, math.nan)
        norms = torch.stack(torch._foreach_norm(weights, 2, dtype=torch.float32)).double()
        loss = self._loss if self._loss is not None else grads.new_zeros(1)
        count = grads.new_full((1,), float(self._losses))
        squares = torch.cat([grads, updates, norms]).pow(2)
        if self._world() > 1:  # one small collective: the same row, exactly, on every rank
            parts = torch.cat([loss, count, squares / self._copies])  # type: ignore[operator]
            summed = self.run.reduce(parts, "sum")  # type: ignore[union-attr]
            loss, count, squares = summed[:1], summed[1:2], summed[2:]
        loss = torch.where(count > 0, loss / count, math.nan)  # a NaN loss stays NaN
        w = len(self._params)
        totals = squares.reshape(3, w).sum(dim=1).sqrt()
        skipped = (totals[1] == 0).double().reshape(1) if self.update_norms else grads.new_full((1,), math.nan)
        row = torch.cat([loss, count, totals[:1], totals[1:2], skipped, squares.sqrt()])
        self._write(step, row, scaled=self.run is not None and self.run.loss_scale() is not None)

    def _write(self, step: int, row: Tensor, scaled: bool) -> None:
        if self._ring is None:
            self._ring = torch.full((self.window, row.numel()), math.nan, dtype=torch.float64, device=row.device)
            width = 2 + 2 * len(self._params)
            self._band = torch.full((spikes.BAND, width), math.nan, dtype=torch.float64, device=row.device)
        i = self._rows % self.window
        self._ring[i] = row
        self._steps[i] = step
        # the verdict, on the device: bits as in CAUSES
        skipped = row[_SKIPPED] == 1
        grad = torch.where(skipped, math.nan, row[_GRAD : _GRAD + 1])  # a skipped step's gradients: not scored
        decades = spikes.decades(torch.cat([row[_LOSS : _LOSS + 1], grad, row[_FIRST + len(self._params) :]]))
        z = spikes.band_scores(self._band, decades)  # type: ignore[arg-type]
        loss_bad = ~torch.isfinite(row[_LOSS]) & (row[_LOSSES] > 0)
        grad_bad = ~torch.isfinite(row[_GRAD]) & (not scaled)  # a loss scaler skips those steps: no event
        spiked = z[:2] > spikes.SPIKE
        jumped = (z[2:] > spikes.WEIGHT_SPIKE).any()  # a weight's update or norm: far steadier series
        verdict = loss_bad.int() + grad_bad.int() * 2 + spiked[0].int() * 4 + spiked[1].int() * 8 + jumped.int() * 16
        self._band[self._rows % spikes.BAND] = decades  # type: ignore[index]
        self._rows += 1
        if verdict.device.type == "cuda":  # read one step later, when the copy is surely done: no wait now
            host = torch.empty((), dtype=torch.int32, pin_memory=True)
            host.copy_(verdict, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((step, host, event))
            while len(self._pending) > 1:
                self._resolve(*self._pending.popleft())
        else:
            self._resolve(step, verdict, None)

    def _resolve(self, step: int, verdict: Tensor, event: Any) -> None:
        if event is not None:
            event.synchronize()
        bits = int(verdict)
        if not bits:
            self._armed = True
            return
        if self._armed and len(self.events) < MAX_EVENTS:
            causes = [c for i, c in enumerate(CAUSES) if bits >> i & 1]
            self._event(step, causes[0], also=causes[1:])
        self._armed = False

    # --- events ---------------------------------------------------------------------------------------

    def _window(self) -> tuple[list[int], Tensor]:
        """The ring on the host, oldest step first: its steps and their rows (one copy, at an event only)."""
        if self._ring is None:
            return [], torch.empty(0)
        n = min(self._rows, self.window)
        order = [(self._rows - n + k) % self.window for k in range(n)]
        rows = self._ring[torch.tensor(order, device=self._ring.device)].cpu()
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
        while self._pending:
            self._resolve(*self._pending.popleft())
        if self._rows:
            what = error if isinstance(error, str) else f"{type(error).__name__}: {error}"[:300]
            self._event(self._steps[(self._rows - 1) % self.window], "exception", what)  # type: ignore[arg-type]

    def finish(self) -> None:
        """Training ended: the verdicts still travelling are read, the window is written out."""
        while self._pending:
            self._resolve(*self._pending.popleft())
        self.write_out()

    def write_out(self) -> None:
        """The ring's steps not yet written, into the record and to the loggers; the record to its JSON file."""
        steps, rows = self._window()
        w = len(self._names)
        for step, row in zip(steps, rows.tolist(), strict=True):
            if step in self._written:
                continue
            self._written.add(step)
            scalars: dict[Key, float] = {
                ("flight_grad_total", ""): row[_GRAD], ("flight_update_total", ""): row[_UPDATE]
            }  # fmt: skip
            if row[_LOSSES] > 0:
                scalars[("flight_loss", "")] = row[_LOSS]  # dropped when not finite, as every value is:
                if not math.isfinite(row[_LOSS]):
                    scalars[("flight_loss_nonfinite", "")] = 1.0
            if row[_SKIPPED] == 1:
                scalars[("flight_skipped", "")] = 1.0
            for k, name in enumerate(self._names):
                grad, update, weight = row[_FIRST + k], row[_FIRST + w + k], row[_FIRST + 2 * w + k]
                scalars[("flight_grad_norm", name)] = grad
                if not math.isfinite(grad):
                    scalars[("flight_grad_nonfinite", name)] = 1.0
                scalars[("flight_update_norm", name)] = update
                scalars[("flight_weight_norm", name)] = weight
            self._emit(step, scalars, {})
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
