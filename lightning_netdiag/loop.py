"""The diagnostics in a plain PyTorch loop or a notebook: a front end with no Lightning. It tells its meters the
moments of each training step (:class:`~lightning_netdiag.meters.Meter`'s lifecycle), seen through hooks on the model
and the optimizer.

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

import signal
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.amp.grad_scaler import OptState

from lightning_netdiag import backward, plots, report, stats
from lightning_netdiag.capture import HookHandles
from lightning_netdiag.dist import rank
from lightning_netdiag.flight.lifeline import LIFELINE
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
from lightning_netdiag.meters.base import MOMENTS, listening, requested_by
from lightning_netdiag.origin import floating_tensors
from lightning_netdiag.run import TorchRun, check_positive_int, chosen_part, scaler_scale
from lightning_netdiag.sinks import LoggerSink

__all__ = ["METERS", "NetDiag", "WriterLogger", "meter_option"]

#: The meters a NetDiag runs, by the argument that configures each (True: the default, None: left out), in the
#: order they are told each moment of a step.
METERS: dict[str, type[Meter]] = {
    "saturation": ActivationMeter, "grad_data": GradDataMeter, "update": UpdateMeter, "logits": LogitMeter,
    "optimizer_state": OptimizerMeter, "flight": FlightMeter,
}  # fmt: skip


class WriterLogger:
    """A bare ``SummaryWriter`` as the sinks see a Lightning TensorBoardLogger (``experiment``, ``log_metrics``)."""

    def __init__(self, writer: Any) -> None:
        self.experiment = writer

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for tag, value in metrics.items():
            self.experiment.add_scalar(tag, value, global_step=step)


class NetDiag:
    """The diagnostics of a model trained by a plain PyTorch loop; nothing else in the loop changes.

    Hooks on the model tell it when a forward starts and when its backward starts; the optimizer's step
    hooks (``register_step_pre_hook`` / ``register_step_post_hook``) tell it when a step happens: D1-D3 are
    read just before it, D4 across it. Every forward of a step adds to its records (gradient accumulation);
    forwards in eval mode or without grad (validation) are not recorded. Steps 0, n, 2n, ... of the
    optimizer are measured. Under DDP (``torch.distributed`` initialised), the ranks' records are summed as
    under Lightning; pass the inner module or the ``DistributedDataParallel`` wrapper alike.

    Without an optimizer (the lecture's manual update), call :meth:`step` once per step between the
    backward and the update.

    Args:
        model: the model (or its DDP wrapper, or Lightning Fabric's).
        optimizer: the optimizer that steps it, a sequence of them, or None for a manual update (a wrapper,
            Lightning Fabric's or accelerate's, alike: its loss scaler is then found where ``scaler`` is None).
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
            spike. Its loss is the one told (:meth:`loss`, :meth:`step`, or the model's own ``output.loss``), else the
            sum of those backpropagated in the step (``loss.backward()``: the loss whose gradient the optimizer
            applies; under a GradScaler, unscaled; in a loop that backpropagates several models' losses, a GAN's,
            tell it with :meth:`loss`). Used as a context manager (``with NetDiag(...)``), an exception that ends the
            loop writes its window out before it propagates. While attached, SIGTERM writes it out too before the
            signal ends the process (where the process had no handler of its own for it).
        loss_from_output: read a model's own ``loss`` output (Hugging Face models given labels) as the loss
            at init. Otherwise the loss is read where ``loss.backward()`` is called, and only without
            accumulation; where it is not seen, the over-confident output rule stays silent.

    Raises:
        ValueError: if an argument is out of range or of the wrong type, or the optimizer steps none of the model's
            parameters.

    Attributes:
        saturation, grad_data, update, logits, optimizer_state, flight: the meters (None where left out); their
            ``history`` holds every measurement; their ``record`` is what :func:`lightning_netdiag.plots.draw_all`
            and :func:`lightning_netdiag.report.summarize` read.
        meters: those run, in the order each is told the moments of a step (:class:`~lightning_netdiag.meters.Meter`).
        steps: the optimizer steps counted so far.
    """

    saturation: ActivationMeter | None
    grad_data: GradDataMeter | None
    update: UpdateMeter | None
    logits: LogitMeter | None
    optimizer_state: OptimizerMeter | None
    flight: FlightMeter | None

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
        optimizers: Any = [] if optimizer is None else [optimizer] if hasattr(optimizer, "param_groups") else optimizer
        if not isinstance(optimizers, (list, tuple)) or not all(hasattr(o, "param_groups") for o in optimizers):
            hint = " (a learning-rate scheduler: pass its optimizer)" if hasattr(optimizer, "get_last_lr") else ""
            raise ValueError(
                f"Expected `optimizer` to be a torch.optim.Optimizer, a sequence of them or None, got {optimizer!r}"
                + hint
            )
        mine = {id(p) for p in model.parameters()}
        if optimizers and not any(id(p) in mine for o in optimizers for g in o.param_groups for p in g["params"]):
            raise ValueError(
                "Expected `optimizer` to step parameters of `model`, got one that steps none of them (another "
                "model's optimizer, or one made before the model's parameters were replaced?)"
            )
        check_positive_int("every_n_steps", every_n_steps)
        if writer is not None and not callable(getattr(writer, "add_histogram_raw", None)):
            raise ValueError(f"Expected `writer` to be a torch.utils.tensorboard.SummaryWriter or None, got {writer!r}")
        if scaler is not None and not callable(getattr(scaler, "unscale_", None)):
            raise ValueError(f"Expected `scaler` to be a torch.amp.GradScaler or None, got {scaler!r}")
        self.model = getattr(model, "module", model) if type(model).__name__ in _MODEL_WRAPPERS else model
        scaler = scaler if scaler is not None else next(filter(None, map(_wrappers_scaler, optimizers)), None)
        # the torch optimizer a wrapper steps: its step hooks see that one
        self.optimizers: list[torch.optim.Optimizer] = [
            inner if isinstance(inner := getattr(o, "optimizer", None), torch.optim.Optimizer) else o
            for o in optimizers
        ]
        self.writer, self.every_n_steps, self.scaler = writer, every_n_steps, scaler
        self.loss_from_output = bool(loss_from_output)
        chosen = {"saturation": saturation, "grad_data": grad_data, "update": update, "logits": logits,
                  "optimizer_state": optimizer_state, "flight": flight}  # fmt: skip
        for name in METERS:
            setattr(self, name, meter_option(name, chosen[name]))
        #: the meters, in the order they are told each moment
        self.meters: list[Meter] = [m for name in METERS if (m := getattr(self, name)) is not None]
        self._at = {moment: listening(self.meters, moment) for moment in MOMENTS}  # who acts at each moment
        self._forward = any(m.watches_forward for m in self.meters)  # the forward's hooks are needed
        self._requested = requested_by(self.meters)
        self.steps = 0
        self.verdicts: list[report.Verdict] = []
        self._handles = HookHandles()
        self._backward_seen = False  # a backward began since the current forward started
        self._backwards = 0  # `loss.backward()` calls seen in this step
        self._backpropagated: list[Tensor] = []  # their losses, as backpropagated (loss-scaled under a GradScaler)
        self._told = False  # the step's loss was told (loss(), step(loss), the model's own): it wins over those
        self._manual_pending = False  # a manual step's copies wait for the update to happen
        self._in_scaler_step = False  # inside the GradScaler's step: it ends the step, not the optimizer's hook
        self._stepped = False  # the optimizer's pre-step hook ran
        self._scaler_step: Any = None
        self._ended = False  # an exception ended the run: its window is written out
        self._index: dict[str, Any] | None = None  # what identifies the batches now (batch_index)

    # --- lifetime -------------------------------------------------------------------------------------

    def attach(self) -> NetDiag:
        """Select what to watch and register the hooks (before the first forward)."""
        self.close()
        self._ended = False
        loggers = [] if self.writer is None else [WriterLogger(self.writer)]
        for meter in self.meters:
            meter.record.every_n_steps = 1 if meter.every_step else self.every_n_steps
            emit = None if self.writer is None else _emitter(LoggerSink(meter.kind, meter.prefix), loggers)
            log_dir = getattr(self.writer, "log_dir", None)
            meter.attach(self.model, TorchRun(emit, self.scaler, None, self._flush, log_dir), self.optimizers)
        for meter in self._at["meet"]:
            meter.meet(self.meters)
        if any(m.lifeline for m in self.meters):
            LIFELINE.watch(self)
        if self._at["add_loss"] or any(m.needs_loss for m in self.meters):
            backward.listen(self._backward_called)
        # first of the pre-hooks: a manual update is measured (its step ends) before anything of the next step starts
        self._handles.add(self.model.register_forward_pre_hook(self._forward_starts, prepend=True, with_kwargs=True))
        self._handles.add(self.model.register_forward_hook(self._forward_ends))
        for opt in self.optimizers:
            self._handles.add(opt.register_step_pre_hook(self._before_step))
            self._handles.add(opt.register_step_post_hook(self._after_step))
        if self.scaler is not None and self.scaler.is_enabled():  # a disabled one steps the optimizer itself
            self._scaler_step = self.scaler.step
            self.scaler.step = self._scaled_step  # an instance attribute: removed again by close()
        self._step_starts()
        return self

    @LIFELINE.held
    def close(self) -> None:
        """Finish a pending measurement, write the flight recorder's window out, remove every hook; safe to call
        any number of times."""
        if self._manual_pending:
            self._manual_update_done()
        self._manual_pending = False
        if self._handles:
            for meter in self._at["finish"]:
                meter.finish()
        self._flush()
        self._handles.remove()
        backward.unlisten(self._backward_called)
        if self._scaler_step is not None:
            del self.scaler.step
            self._scaler_step = None
        for meter in self.meters:
            meter.detach()
        LIFELINE.unwatch(self)

    def __enter__(self) -> NetDiag:
        return self.attach()

    def __exit__(self, kind: object, error: BaseException | None, traceback: object) -> None:
        if error is not None:
            self.crashed(error)
        self.close()

    @LIFELINE.held
    def crashed(self, error: BaseException | str) -> None:
        """The run dies of ``error`` (an exception, or what ended it in words): the flight recorder's last steps to
        the logs. Called by ``with NetDiag(...)`` as an exception leaves the block; call it where the loop catches
        the exception itself, before :meth:`close`."""
        if self._handles:
            for meter in self._at["crashed"]:
                meter.crashed(error)
            self._flush()
            self._ended = True

    def terminated(self) -> None:
        """SIGTERM, between two of NetDiag's calls (the lifeline calls it): the flight recorder's window to its file
        (unless an exception ended the run first)."""
        if self._handles and not self._ended:
            for meter in self._at["crashed"]:
                meter.crashed(signal.SIGTERM.name, quiet=True)

    def _flush(self) -> None:
        if self.writer is not None and callable(getattr(self.writer, "flush", None)):
            self.writer.flush()

    # --- when: the hooks --------------------------------------------------------------------------------

    def _measured(self) -> int | None:
        """This step's number if it is measured: every n-th, and one a meter asks for (after a flight event)."""
        step = self.steps
        return step if step % self.every_n_steps == 0 or step in self._requested else None

    def _step_starts(self) -> None:
        measured = self._measured()
        for meter in self._at["step_starts"]:
            meter.step_starts(self.steps, measured)

    def _manual_update_done(self) -> None:
        logging = self._measured() is not None
        for meter in self._at["after_step"]:
            meter.after_step(None, logging)

    @LIFELINE.held
    def _forward_starts(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._manual_pending:  # the manual update happened since step(): measure it
            self._manual_pending = False
            self._manual_update_done()
            self._step_starts()
        training = module.training and torch.is_grad_enabled()
        if training:
            for meter in self._at["batch_seen"]:
                meter.batch_seen((args, kwargs), self._index)
        if not self._forward:
            return
        if not training:
            for meter in self._at["pause"]:
                meter.pause()  # validation: never recorded
            return
        backward_ended, self._backward_seen = self._backward_seen, False
        measured = self._measured()
        device = _device(self.model) if measured is not None else None
        if backward_ended:
            for meter in self._at["backward_ends"]:
                meter.backward_ends()
        for meter in self._at["forward_starts"]:
            meter.forward_starts(measured, device)

    @LIFELINE.held
    def _forward_ends(self, module: nn.Module, inputs: object, output: object) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        # A model that computes its loss (Hugging Face) hands it over: to the flight recorder always (a loss
        # divided by the window's token count is off by a constant factor, which its scores do not see).
        own = _loss_of(output)
        if own is not None:
            self._told = True
            for meter in self._at["add_loss"]:
                meter.add_loss(own)
        loss = own if self.loss_from_output else None
        # Only measured steps need to know when their backward starts: no gradient hook on the others.
        if not self._forward or self._measured() is None:
            return
        # The first output gradient computed is the first thing a backward does: nothing (a checkpointed
        # segment's recomputation) runs before it.
        first = next((t for t in floating_tensors(output) if t.requires_grad), None)
        if first is not None:
            first.register_hook(lambda grad: self._backward_starts(loss))

    def _backward_called(self, loss: Tensor) -> None:
        """``loss.backward()`` (any tensor's, while attached): the loss as backpropagated (loss-scaled under a
        GradScaler), for the flight recorder (:meth:`_tell_backpropagated`) and, on a measured step, the output's
        record at init."""
        if loss.numel() != 1 or not loss.is_floating_point():
            return  # `out.backward(gradient)` of a tensor that is no loss
        self._backwards += 1
        self._backpropagated.append(loss.detach())
        measured = self.optimizers and self._measured() is not None  # a manual step is told the loss by step()
        if self._backwards == 1 and measured and any(m.needs_loss for m in self.meters):
            self._backward_starts(self._unscaled(loss.detach()))

    def _unscaled(self, loss: Tensor) -> Tensor:
        """A loss as backpropagated, divided by the GradScaler's scale where one scales it (on the device)."""
        scale = scaler_scale(self.scaler)
        return loss if scale is None else loss / scale

    def _tell_backpropagated(self) -> None:
        """Where the step's loss was not told: the sum of the losses backpropagated since the last step (the loss
        whose gradient the optimizer applies: under accumulation, each micro-batch's divided by their number), to
        the flight recorder, unscaled. Nothing is read from the device."""
        losses, self._backpropagated = self._backpropagated, []
        told, self._told = self._told, False
        if told or not losses or not self._at["add_loss"]:
            return
        total = self._unscaled(
            losses[0] if len(losses) == 1 else torch.stack([t.reshape(()).float() for t in losses]).sum()
        )
        for meter in self._at["add_loss"]:
            meter.add_loss(total)

    def _backward_starts(self, loss: Tensor | None) -> None:
        if not self._backward_seen:
            self._backward_seen = True
            for meter in self._at["backward_starts"]:
                meter.backward_starts(loss if meter.needs_loss else None)

    @LIFELINE.held
    def _before_step(self, optimizer: Any, args: object = None, kwargs: object = None) -> None:
        self._stepped = True
        self._tell_backpropagated()
        if self._backwards > 1:  # accumulation: each micro-batch's loss may be divided by their number
            for meter in self._at["forget_loss"]:
                meter.forget_loss()
        self._backwards = 0
        for meter in self._at["before_step"]:
            meter.before_step(optimizer)

    @LIFELINE.held
    def _after_step(self, optimizer: Any, args: object = None, kwargs: object = None) -> None:
        if self._in_scaler_step:
            return
        self._step_done(optimizer)

    def _step_done(self, optimizer: Any) -> None:
        logging = self._measured() is not None
        for meter in self._at["after_step"]:
            meter.after_step(optimizer, logging)
        self.steps += 1
        self._step_starts()

    @LIFELINE.held
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

    @LIFELINE.held
    def step(self, loss: Tensor | None = None, lr: float | None = None) -> None:
        """A manual update is about to happen (no optimizer): call it after ``loss.backward()``, before the
        update. ``loss``: the step's loss (for the report's loss at init); ``lr``: the rate of the update
        ``p -= lr * p.grad`` (the report judges it as plain SGD's; None: not judged)."""
        if self.optimizers:
            raise RuntimeError("NetDiag.step() is for a manual update; with an optimizer, its step is seen by itself")
        if loss is not None:
            self._told = True
            for meter in self._at["add_loss"]:
                meter.add_loss(loss)
        self._tell_backpropagated()
        self._backwards = 0
        for meter in self._at["manual_step"]:
            meter.manual_step(loss, lr)
        for meter in self._at["before_step"]:
            meter.before_step(None)
        self.steps += 1
        self._manual_pending = True

    def batch_index(self, **ids: Any) -> None:
        """What identifies the batches from now on (``diag.batch_index(epoch=2, indices=idx)`` before the forward):
        kept with a batch the flight recorder saves at an event, so that its source can be found."""
        self._index = ids

    @LIFELINE.held
    def loss(self, loss: Tensor) -> None:
        """The loss of a micro-batch, for the flight recorder: call it once per micro-batch, before the optimizer
        steps (after ``loss.backward()`` is a good place); the step's loss is their mean. Not needed where the loss
        backpropagated is the step's (the recorder reads it from ``loss.backward()``), where the model returns its
        own ``loss`` (Hugging Face models given labels) nor with :meth:`step`; a loss told wins over those."""
        self._told = True
        for meter in self._at["add_loss"]:
            meter.add_loss(loss)

    # --- views ----------------------------------------------------------------------------------------

    @LIFELINE.held
    def records(self) -> dict[str, Any]:
        """The meters' records by kind (None for a meter left out): what the report and the plots read (the
        flight recorder's window is written into its record first)."""
        for meter in self._at["write_out"]:
            meter.write_out()
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


def meter_option(name: str, value: object) -> Any:
    """The meter that NetDiag's argument ``name`` (one of :data:`METERS`) asks for: a new one for True, the one
    given, or None (None, False: left out)."""
    return chosen_part(name, value, METERS[name], METERS[name])


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


#: Wrappers of a model whose ``module`` is the model itself: DDP's, Lightning Fabric's.
_MODEL_WRAPPERS = ("DistributedDataParallel", "_FabricModule")


def _wrappers_scaler(optimizer: object) -> Any:
    """The GradScaler an optimizer wrapper steps through, if any: accelerate's ``scaler``, Lightning Fabric's
    precision plugin's (the loss it backpropagates is scaled by it)."""
    precision = getattr(getattr(optimizer, "_strategy", None), "precision", None)
    found = getattr(optimizer, "scaler", None) or getattr(precision, "scaler", None)
    return found if callable(getattr(found, "unscale_", None)) else None


def _loss_of(output: object) -> Tensor | None:
    """The loss a model computed itself (Hugging Face models given labels: ``output.loss``), or None."""
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    return loss if isinstance(loss, Tensor) and loss.numel() == 1 else None
