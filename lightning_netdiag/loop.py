"""The four diagnostics in a plain PyTorch loop or a notebook: a front end with no Lightning.

Attach to a model (and its optimizer, when there is one) and train as before::

    diag = NetDiag(model, optimizer, writer=SummaryWriter("runs/mlp"), every_n_steps=100)
    with diag:
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    diag.report()

The lecture's loop has no optimizer (``p.data += -lr * p.grad``): there, call ``diag.step(loss, lr)`` between
``loss.backward()`` and the update, once per step.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.amp.grad_scaler import OptState

from lightning_netdiag import plots, report, stats
from lightning_netdiag.capture import HookHandles
from lightning_netdiag.dist import rank
from lightning_netdiag.meters import (
    ActivationMeter,
    FlightMeter,
    GradDataMeter,
    LogitMeter,
    Meter,
    OptimizerMeter,
    UpdateMeter,
    records_by_kind,
)
from lightning_netdiag.origin import floating_tensors
from lightning_netdiag.run import TorchRun, check_positive_int, scaler_scale
from lightning_netdiag.sinks import LoggerSink

__all__ = ["NetDiag", "WriterLogger"]


_F = TypeVar("_F", bound=Callable[..., Any])


class _Sigterm:
    """SIGTERM (a scheduler's preemption; torchrun ending every rank when one failed) kills a process that has no
    handler for it without a word. While a NetDiag with a flight recorder is attached and nothing else handles
    SIGTERM, this handler writes each one's window to its JSON file, then puts the default back and sends the signal
    again: the process dies as it would have. A handler already there is the user's (or their framework's) way out
    and is left alone; so is a thread that may not set one. A signal that comes while NetDiag is inside one of its
    calls (a step's row half written, the window being written out) waits until that call returns; a second one
    does not wait. A child forked from the process (a multiprocessing pool: its parent ends it with SIGTERM) holds a
    stale copy of everything: there SIGTERM gets its default back as the child starts, and is blocked across the
    fork so that none reaches the child before (Python drops a signal caught between fork and its own reset)."""

    def __init__(self) -> None:
        self.attached: weakref.WeakSet[NetDiag] = weakref.WeakSet()
        self.busy = 0  # NetDiag calls in progress
        self.pending = False  # a SIGTERM waits for them
        self.mask: set[int | signal.Signals] | None = None  # the signal mask before a fork, while SIGTERM is blocked
        os.register_at_fork(before=self.before_fork, after_in_parent=self.after_fork, after_in_child=self.forked)

    def before_fork(self) -> None:
        if self.attached:
            self.mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def after_fork(self) -> None:
        if self.mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)
            self.mask = None

    def forked(self) -> None:
        self.attached.clear()
        self.busy, self.pending = 0, False
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGTERM) == self.handle:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        self.after_fork()  # a SIGTERM already sent is delivered now, with the default: the child dies

    def watch(self, diag: NetDiag) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, self.handle):
            signal.signal(signal.SIGTERM, self.handle)
            self.attached.add(diag)

    def unwatch(self, diag: NetDiag) -> None:
        self.attached.discard(diag)
        if not self.attached and threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGTERM) == self.handle:  # not replaced since
                signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def handle(self, signum: int, frame: object) -> None:
        if self.busy and not self.pending:
            self.pending = True
            return
        self.deliver(write=not self.busy)

    def deliver(self, write: bool = True) -> None:
        if write:
            for diag in list(self.attached):
                diag._terminated()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    def held(self, method: _F) -> _F:
        """A NetDiag method during which SIGTERM waits."""

        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            self.busy += 1
            try:
                return method(*args, **kwargs)
            finally:
                self.busy -= 1
                if self.pending and not self.busy:
                    self.deliver()

        return call  # type: ignore[return-value]


_SIGTERM = _Sigterm()


class WriterLogger:
    """A bare ``SummaryWriter`` as the sinks see a Lightning TensorBoardLogger (``experiment``, ``log_metrics``)."""

    def __init__(self, writer: Any) -> None:
        self.experiment = writer

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for tag, value in metrics.items():
            self.experiment.add_scalar(tag, value, global_step=step)


class NetDiag:
    """The four diagnostics of a model trained by a plain PyTorch loop; nothing else in the loop changes.

    Hooks on the model tell it when a forward starts and when its backward starts; the optimizer's step
    hooks (``register_step_pre_hook`` / ``register_step_post_hook``) tell it when a step happens: D1-D3 are
    read just before it, D4 across it. Every forward of a step adds to its records (gradient accumulation);
    forwards in eval mode or without grad (validation) are not recorded. Steps 0, n, 2n, ... of the
    optimizer are measured. Under DDP (``torch.distributed`` initialised), the ranks' records are summed as
    under Lightning; pass the inner module or the ``DistributedDataParallel`` wrapper alike.

    Without an optimizer (the lecture's manual update), call :meth:`step` once per step between the
    backward and the update.

    Args:
        model: the model (or its DDP wrapper).
        optimizer: the optimizer that steps it, a sequence of them, or None for a manual update.
        writer: a ``torch.utils.tensorboard.SummaryWriter`` to log to; None keeps the history in memory only.
        every_n_steps: measure every n-th optimizer step.
        scaler: the AMP ``GradScaler`` that scales the loss, if any. Its ``step`` is wrapped while attached,
            so that a step it skips (non-finite gradients) is measured and logged as ``update_skipped``.
        saturation, grad_data, update: the meters to run (D1-D2, D3, D4), each ``True`` (the defaults), a
            configured meter (:class:`~lightning_netdiag.meters.ActivationMeter`, ...) or None to leave out.
        logits, optimizer_state: likewise, the attention and output logits
            (:class:`~lightning_netdiag.meters.LogitMeter`, see :class:`~lightning_netdiag.LogitMonitor`) and the
            Adam family's state (:class:`~lightning_netdiag.meters.OptimizerMeter`, see
            :class:`~lightning_netdiag.OptimizerState`).
        flight: the flight recorder (:class:`~lightning_netdiag.meters.FlightMeter`, see
            :class:`~lightning_netdiag.FlightRecorder`): every step's loss and norms in a ring, an event when they
            spike. It sees the loss where the model returns one (``output.loss``), in :meth:`step`, or where
            :meth:`loss` is called; used as a context manager (``with NetDiag(...)``), an exception that ends the
            loop writes its window out before it propagates. While attached, SIGTERM writes it out too before the
            signal ends the process (where the process had no handler of its own for it).
        loss_from_output: read a model's own ``loss`` output (Hugging Face models given labels) as the loss
            at init. Otherwise the loss is read where ``loss.backward()`` is called (seen through the function
            mode that watches functional activations: not with ``functional=False`` nor under torch.compile),
            and only without accumulation; where it is not seen, the over-confident output rule stays silent.

    Raises:
        ValueError: if an argument is out of range or of the wrong type.

    Attributes:
        saturation, grad_data, update, logits, optimizer_state, flight: the meters (None where left out); their
            ``history`` holds every
            measurement; their ``record`` is what :func:`lightning_netdiag.plots.draw_all` and
            :func:`lightning_netdiag.report.summarize` read.
        steps: the optimizer steps counted so far.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        writer: Any = None,
        every_n_steps: int = 100,
        scaler: Any = None,
        saturation: ActivationMeter | bool | None = True,
        grad_data: GradDataMeter | bool | None = True,
        update: UpdateMeter | bool | None = True,
        loss_from_output: bool = True,
        logits: LogitMeter | bool | None = True,
        optimizer_state: OptimizerMeter | bool | None = True,
        flight: FlightMeter | bool | None = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"Expected `model` to be a torch.nn.Module, got {type(model).__name__}")
        optimizers = [] if optimizer is None else [optimizer] if hasattr(optimizer, "param_groups") else optimizer
        if not all(hasattr(o, "param_groups") for o in optimizers):  # type: ignore[union-attr]
            raise ValueError(
                f"Expected `optimizer` to be a torch.optim.Optimizer, a sequence of them or None, got {optimizer!r}"
            )
        check_positive_int("every_n_steps", every_n_steps)
        if writer is not None and not callable(getattr(writer, "add_histogram_raw", None)):
            raise ValueError(f"Expected `writer` to be a torch.utils.tensorboard.SummaryWriter or None, got {writer!r}")
        if scaler is not None and not callable(getattr(scaler, "unscale_", None)):
            raise ValueError(f"Expected `scaler` to be a torch.amp.GradScaler or None, got {scaler!r}")
        self.model = getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model
        self.optimizers: list[torch.optim.Optimizer] = list(optimizers)  # type: ignore[arg-type]
        self.writer, self.every_n_steps, self.scaler = writer, every_n_steps, scaler
        self.loss_from_output = bool(loss_from_output)
        self.saturation = _meter("saturation", saturation, ActivationMeter)
        self.grad_data = _meter("grad_data", grad_data, GradDataMeter)
        self.update = _meter("update", update, UpdateMeter)
        self.logits = _meter("logits", logits, LogitMeter)
        self.optimizer_state = _meter("optimizer_state", optimizer_state, OptimizerMeter)
        self.flight = _meter("flight", flight, FlightMeter)
        # armed for each forward and told when its backward starts and ends (known once: every forward asks)
        self._forward_meters: list[ActivationMeter | LogitMeter] = [
            m for m in (self.saturation, self.logits) if m is not None
        ]
        self.steps = 0
        self.verdicts: list[report.Verdict] = []
        self._handles = HookHandles()
        self._backward_seen = False  # a backward began since the current forward started
        self._backwards = 0  # `loss.backward()` calls seen in this step
        self._snapshot_pending = False  # a manual step's copies wait for the update to happen
        self._in_scaler_step = False  # inside the GradScaler's step: it ends the step, not the optimizer's hook
        self._stepped = False  # the optimizer's pre-step hook ran
        self._scaler_step: Any = None
        self._ended = False  # an exception ended the run: its window is written out

    @property
    def meters(self) -> list[Meter]:
        meters = (self.saturation, self.grad_data, self.update, self.logits, self.optimizer_state, self.flight)
        return [m for m in meters if m is not None]

    # --- lifetime -------------------------------------------------------------------------------------

    def attach(self) -> NetDiag:
        """Select what to watch and register the hooks (before the first forward)."""
        self.close()
        self._ended = False
        for meter in self.meters:
            meter.record.every_n_steps = 1 if meter is self.flight else self.every_n_steps
            sink = LoggerSink(meter.kind, meter.prefix)
            loggers = [] if self.writer is None else [WriterLogger(self.writer)]
            emit = None if self.writer is None else _emitter(sink, loggers)
            run = TorchRun(emit, self.scaler, None, self._flush)
            if isinstance(meter, (ActivationMeter, LogitMeter)):
                meter.attach(self.model, run)
            else:
                meter.attach(self.model, run, self.optimizers)  # type: ignore[attr-defined]
        if self.update is not None:
            self.update.grad_data = self.grad_data
        if self.flight is not None:
            self.flight.log_dir = getattr(self.writer, "log_dir", None)
            _SIGTERM.watch(self)
        if self.saturation is not None and self.optimizers:  # a manual step is told the loss by step()
            self.saturation.watch_backward_calls(self._backward_called)
        # first of the pre-hooks: a manual update is measured (its step ends) before anything of the next step starts
        self._handles.add(self.model.register_forward_pre_hook(self._forward_starts, prepend=True))
        self._handles.add(self.model.register_forward_hook(self._forward_ends))
        for opt in self.optimizers:
            self._handles.add(opt.register_step_pre_hook(self._before_step))
            self._handles.add(opt.register_step_post_hook(self._after_step))
        if self.scaler is not None and self.scaler.is_enabled():  # a disabled one steps the optimizer itself
            self._scaler_step = self.scaler.step
            self.scaler.step = self._scaled_step  # an instance attribute: removed again by close()
        self._begin()
        return self

    @_SIGTERM.held
    def close(self) -> None:
        """Finish a pending measurement, write the flight recorder's window out, remove every hook; safe to call
        any number of times."""
        if self._snapshot_pending:
            self._manual_update_done()
        self._snapshot_pending = False
        if self.flight is not None and self._handles:
            self.flight.finish()
        self._flush()
        self._handles.remove()
        if self._scaler_step is not None:
            del self.scaler.step
            self._scaler_step = None
        for meter in self.meters:
            meter.detach()
        _SIGTERM.unwatch(self)

    def __enter__(self) -> NetDiag:
        return self.attach()

    def __exit__(self, kind: object, error: BaseException | None, traceback: object) -> None:
        if error is not None:
            self.crashed(error)
        self.close()

    @_SIGTERM.held
    def crashed(self, error: BaseException | str) -> None:
        """The run dies of ``error`` (an exception, or what ended it in words): the flight recorder's last steps to
        the logs. Called by ``with NetDiag(...)`` as an exception leaves the block; call it where the loop catches
        the exception itself, before :meth:`close`."""
        if self.flight is not None and self._handles:
            self.flight.crashed(error)
            self._flush()
            self._ended = True

    def _terminated(self) -> None:
        """SIGTERM, between two of NetDiag's calls: the flight recorder's window to its file (unless an exception
        ended the run first)."""
        if self.flight is not None and self._handles and not self._ended:
            self.flight.crashed(signal.SIGTERM.name, quiet=True)

    def _flush(self) -> None:
        if self.writer is not None and callable(getattr(self.writer, "flush", None)):
            self.writer.flush()

    # --- when: the hooks --------------------------------------------------------------------------------

    def _measured(self) -> int | None:
        """This step's number if it is measured: every n-th, and the one after a flight recorder's event."""
        step = self.steps
        if step % self.every_n_steps == 0 or (self.flight is not None and step in self.flight.requested):
            return step
        return None

    def _begin(self) -> None:
        for meter in (self.grad_data, self.update, self.optimizer_state):
            if meter is not None:
                meter.begin(self._measured())
        if self.flight is not None:
            self.flight.begin(self.steps)

    def _manual_update_done(self) -> None:
        if self.update is not None:
            self.update.measure()
        if self.flight is not None:
            self.flight.after_step(logging=self._measured() is not None)

    @_SIGTERM.held
    def _forward_starts(self, module: nn.Module, inputs: object) -> None:
        if self._snapshot_pending:  # the manual update happened since step(): measure it
            self._snapshot_pending = False
            self._manual_update_done()
            self._begin()
        forward_meters = self._forward_meters
        if not forward_meters:
            return
        if not (module.training and torch.is_grad_enabled()):
            for meter in forward_meters:
                meter.stop()  # validation: never recorded
            return
        backward_ended, self._backward_seen = self._backward_seen, False
        step = self._measured()
        device = _device(self.model) if step is not None else torch.device("cpu")  # not measured: a flag only
        for meter in forward_meters:
            if backward_ended:
                meter.backward_done()
            meter.arm(step, device)

    @_SIGTERM.held
    def _forward_ends(self, module: nn.Module, inputs: object, output: object) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        # A model that computes its loss (Hugging Face) hands it over: to the flight recorder always (a loss
        # divided by the window's token count is off by a constant factor, which its scores do not see).
        own = _loss_of(output)
        if own is not None and self.flight is not None:
            self.flight.add_loss(own)
        loss = own if self.loss_from_output else None
        # Only measured steps need to know when their backward starts: no gradient hook on the others.
        if not self._forward_meters or self._measured() is None:
            return
        # The first output gradient computed is the first thing a backward does: nothing (a checkpointed
        # segment's recomputation) runs before it.
        first = next((t for t in floating_tensors(output) if t.requires_grad), None)
        if first is not None:
            first.register_hook(lambda grad: self._backward_starts(loss))

    def _backward_called(self, loss: Tensor) -> None:
        """``loss.backward()`` in an armed step: the loss as backpropagated (loss-scaled under a GradScaler)."""
        self._backwards += 1
        if self._backwards == 1 and self.saturation is not None and self.saturation.needs_loss:
            scale = scaler_scale(self.scaler)
            self._backward_starts(loss.detach() if scale is None else loss.detach() / scale)

    def _backward_starts(self, loss: Tensor | None) -> None:
        if not self._backward_seen:
            self._backward_seen = True
            if self.saturation is not None:
                self.saturation.backward(loss if self.saturation.needs_loss else None)
            if self.logits is not None:
                self.logits.backward()

    @_SIGTERM.held
    def _before_step(self, optimizer: Any, args: object = None, kwargs: object = None) -> None:
        self._stepped = True
        if self.saturation is not None:
            if self._backwards > 1:  # accumulation: each micro-batch's loss may be divided by their number
                self.saturation.forget_loss()
            self._backwards = 0
            self.saturation.flush()
        if self.logits is not None:
            self.logits.flush()
        if self.grad_data is not None:
            self.grad_data.measure(optimizer)
        if self.update is not None:
            self.update.snapshot(optimizer)
        if self.flight is not None:
            self.flight.before_step(optimizer)

    @_SIGTERM.held
    def _after_step(self, optimizer: Any, args: object = None, kwargs: object = None) -> None:
        if self._in_scaler_step:
            return
        self._step_done(optimizer)

    def _step_done(self, optimizer: Any) -> None:
        if self.update is not None:
            self.update.measure()
        if self.optimizer_state is not None:
            self.optimizer_state.measure(optimizer)
        if self.flight is not None:
            self.flight.after_step(logging=self._measured() is not None)
        self.steps += 1
        self._begin()

    @_SIGTERM.held
    def _scaled_step(self, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        """The GradScaler's step, unscaling first (as it would), so that a step it skips (non-finite
        gradients: the optimizer's hooks never run) is measured all the same, as under Lightning."""
        if self.scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.READY:
            self.scaler.unscale_(optimizer)
        self._stepped, self._in_scaler_step = False, True
        try:
            out = self._scaler_step(optimizer, *args, **kwargs)
        finally:
            self._in_scaler_step = False
        if optimizer in self.optimizers:
            if not self._stepped:
                self._before_step(optimizer)
            self._step_done(optimizer)
        return out

    @_SIGTERM.held
    def step(self, loss: Tensor | None = None, lr: float | None = None) -> None:
        """A manual update is about to happen (no optimizer): call it after ``loss.backward()``, before the
        update. ``loss``: the step's loss (for the report's loss at init); ``lr``: the rate of the update
        ``p -= lr * p.grad`` (the report judges it as plain SGD's; None: not judged)."""
        if self.optimizers:
            raise RuntimeError("NetDiag.step() is for a manual update; with an optimizer, its step is seen by itself")
        if self.saturation is not None and loss is not None and self.steps == 0:
            self.saturation.add_loss(loss.detach())
        if self.flight is not None and loss is not None:
            self.flight.add_loss(loss)
        if self.update is not None:
            self.update.manual(lr)
        if self.saturation is not None:
            self.saturation.flush()
        if self.logits is not None:
            self.logits.flush()
        if self.grad_data is not None:
            self.grad_data.measure(None)
        if self.update is not None:
            self.update.snapshot(None)
        if self.flight is not None:
            self.flight.before_step(None)
        self.steps += 1
        self._snapshot_pending = True

    @_SIGTERM.held
    def loss(self, loss: Tensor) -> None:
        """The loss of a micro-batch, for the flight recorder: call it once per micro-batch, before the optimizer
        steps (after ``loss.backward()`` is a good place); the step's loss is their mean. Not needed where the model
        returns its own ``loss`` (Hugging Face models given labels) nor with :meth:`step`; without it the recorder
        watches the gradients only."""
        if self.flight is not None:
            self.flight.add_loss(loss)

    # --- views ----------------------------------------------------------------------------------------

    @_SIGTERM.held
    def records(self) -> dict[str, Any]:
        """The meters' records by kind (None for a meter left out): what the report and the plots read (the
        flight recorder's window is written into its record first)."""
        if self.flight is not None:
            self.flight.write_out()
        return records_by_kind(self.meters)

    def report(self, print_table: bool = True) -> list[report.Verdict]:
        """The health report of what was measured so far (:func:`lightning_netdiag.report.summarize`, printed as
        a table with ``print_table``): its verdicts, also kept in ``verdicts``."""
        summary = report.summarize(**self.records())
        self.verdicts = summary.verdicts
        if print_table:
            print(summary.table())
        return self.verdicts

    def plots(self) -> dict[str, Any]:
        """The lecture's plots (matplotlib figures by name) of what was measured so far."""
        return plots.draw_all(**self.records())


def _meter(name: str, value: object, kind: Any) -> Any:
    if value is None or value is False:
        return None
    if value is True:
        return kind()
    if isinstance(value, kind):
        return value
    raise ValueError(f"Expected `{name}` to be True, None or a {kind.__name__}, got {value!r}")


def _emitter(sink: LoggerSink, loggers: list[Any]) -> Any:
    def emit(
        step: int,
        scalars: Mapping[str, float],
        histograms: Mapping[str, stats.Histogram],
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        sink.emit(loggers, step, scalars, histograms, rank() == 0, meta)

    return emit


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _loss_of(output: object) -> Tensor | None:
    """The loss a model computed itself (Hugging Face models given labels: ``output.loss``), or None."""
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    return loss if isinstance(loss, Tensor) and loss.numel() == 1 else None
