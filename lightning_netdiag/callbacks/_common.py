"""What the Lightning callbacks share: when to measure, the Trainer as a meter's :class:`~lightning_netdiag.meters.Run`,
hooks removed at the end of fit or on a crash, checkpoint state."""

from __future__ import annotations

import itertools
from collections.abc import Container, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lightning_netdiag import stats
from lightning_netdiag.meters import Meter, records_by_kind
from lightning_netdiag.meters.base import MOMENTS, listening, requested_by
from lightning_netdiag.run import check_positive_int, scaler_scale
from lightning_netdiag.sinks import LoggerSink, flush_loggers

__all__ = [
    "BATCH_HOOKS", "STEP_HOOKS", "DiagnosticCallback", "LightningRun", "ParameterCallback", "dispatch_again",
    "flat_sharding", "logging_step", "loss_scale", "quiet_unused_hooks", "records", "unscaled_loss",
]  # fmt: skip

#: The hooks Lightning calls at every batch. Each call costs about 2 µs of Lightning's dispatch per callback (a
#: profiler's context and its label), whether or not the callback does anything: 48 calls a step for
#: `netdiag_callbacks()`, about 0.1 ms. Lightning skips a hook that is not callable.
BATCH_HOOKS = (
    "on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
    "on_before_zero_grad", "on_train_batch_end", "on_validation_batch_start", "on_validation_batch_end",
    "on_test_batch_start", "on_test_batch_end", "on_predict_batch_start", "on_predict_batch_end",
)  # fmt: skip
#: The batch hooks the meters act at: one meter callback calls them for those next to it (`DiagnosticCallback`).
STEP_HOOKS = (
    "on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
    "on_train_batch_end",
)  # fmt: skip


def quiet_unused_hooks(callback: Callback) -> None:
    """Set the batch hooks that ``callback``'s class leaves as Lightning's no-ops to None on the instance, so that
    Lightning does not dispatch them (a subclass's own hook is kept)."""
    for hook in BATCH_HOOKS:
        if getattr(type(callback), hook) is getattr(Callback, hook):
            setattr(callback, hook, None)


def dispatch_again(callback: Callback, hooks: tuple[str, ...] = BATCH_HOOKS) -> None:
    """The inverse of :func:`quiet_unused_hooks` and of a band's taking: those of ``hooks`` set to None on
    ``callback`` removed, so that Lightning dispatches its class's again."""
    for hook in hooks:
        if callback.__dict__.get(hook, True) is None:
            del callback.__dict__[hook]


def logging_step(step: int, every_n_steps: int, requested: Container[int] = ()) -> int | None:
    """``step``, the optimizer step that the current training batch leads to (``trainer.global_step``), if it is
    measured.

    One logging step is one optimizer step: ``trainer.global_step`` counts them, so every micro-batch of
    an accumulation window shares its step. Steps 0, n, 2n, ... are measured: step 0 shows the network
    at initialisation, as the lecture does; so are the steps ``requested`` (a flight recorder's: the one after an
    event, so that the state after a spike is on record). It is asked at ``on_train_batch_start`` only, which
    Lightning calls for training batches only: sanity checking, validation, test and predict never count (and
    asking the Trainer so at every step cost each callback 4 µs, a fifth of its hooks' time on a 2 ms step).
    """
    return step if step % every_n_steps == 0 or step in requested else None


def loss_scale(trainer: pl.Trainer) -> Tensor | float | None:
    """The GradScaler's current scale, or None when gradients are not scaled (fp32, bf16)."""
    return scaler_scale(getattr(trainer.precision_plugin, "scaler", None))


def unscaled_loss(trainer: pl.Trainer, loss: Tensor) -> Tensor:
    """A micro-batch's loss as Lightning hands it to ``on_before_backward`` (scaled by the GradScaler, divided for
    accumulation), as the step computed it: no kernel where nothing changed it."""
    scale, accumulate = loss_scale(trainer), trainer.accumulate_grad_batches
    if scale is None and accumulate == 1:
        return loss
    return loss * accumulate / (1.0 if scale is None else scale)


class LightningRun:
    """The Trainer as a meter sees it: its ranks (through the strategy), its loss scale, its loggers."""

    def __init__(self, trainer: pl.Trainer, sink: LoggerSink) -> None:
        self.trainer, self.sink = trainer, sink

    @property
    def world_size(self) -> int:
        return self.trainer.world_size

    @property
    def device(self) -> torch.device:
        return self.trainer.strategy.root_device

    def reduce(self, t: Tensor, op: str) -> Tensor:
        return self.trainer.strategy.reduce(t, reduce_op=op)

    def loss_scale(self) -> Tensor | float | None:
        return loss_scale(self.trainer)

    def emit(
        self,
        step: int,
        scalars: Mapping[str, float],
        histograms: Mapping[str, stats.Histogram],
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        self.sink.emit(self.trainer.loggers, step, scalars, histograms, self.trainer.is_global_zero, meta)

    def flush(self) -> None:
        if self.trainer.is_global_zero:
            flush_loggers(self.trainer.loggers)

    @property
    def log_dir(self) -> str | None:
        return self.trainer.log_dir if self.trainer.loggers else None


class DiagnosticCallback(Callback):
    """The one adapter from Lightning's hooks to the meters' lifecycle (:class:`~lightning_netdiag.meters.Meter`),
    mixed into a meter (first in the bases). Not for use on its own.

    The meter measures; this class decides when (every ``every_n_steps``-th optimizer step, from
    ``trainer.log_every_n_steps`` when None), attaches the meter when fit starts and detaches it when fit ends or
    fails. Lightning's hooks, as the meter hears them: ``on_train_batch_start``: the step starts (at its first
    micro-batch), a forward starts, the batch as ``training_step`` gets it (with its epoch and batch index);
    ``on_before_backward``/``on_after_backward``: its backward starts and ends; ``on_before_optimizer_step``: before
    the step; ``on_train_batch_end``: the micro-batch's loss, after the step of each optimizer that stepped, and
    nothing recorded until the next batch (validation).

    One of them calls several meters' step hooks: at fit start, the first of each run of meter callbacks next to
    each other in the Trainer's list takes the others' (theirs set to None on the instance, put back at teardown),
    so that Lightning dispatches a step's hooks to one callback, not to each (about 2 µs a hook and callback). A
    subclass that overrides a step hook keeps its own dispatch.
    """

    prefix: str
    record: Any  # the meter's, of its own kind

    def _cadence(self, every_n_steps: int | None) -> None:
        check_positive_int("every_n_steps", every_n_steps, allow_none=True)
        self.every_n_steps = every_n_steps
        self._every = every_n_steps or 1
        self._requested: Container[int] = ()  # a flight recorder's steps, found at setup
        self._began: int | None = None  # the step begun last
        self._logging = False  # the step under way is a logging step of the run
        self._stepping: list[Any] = []  # the optimizers that step in the batch under way
        # the moments this meter acts at: only those are passed on (a step makes no call for nothing)
        self._moments = frozenset(m for m in MOMENTS if listening([self], m))  # type: ignore[list-item]
        self.record.every_n_steps = every_n_steps
        self._sink = LoggerSink(type(self).__name__, self.prefix)
        # Lightning asks it at every hook call (for its profiler's label): made once
        self._state_key = self._generate_state_key(prefix=self.record.prefix)
        self._band: tuple[DiagnosticCallback, ...] = (self,)  # whose step hooks this one's calls
        quiet_unused_hooks(self)

    def _take_band(self, trainer: pl.Trainer) -> None:
        """The first of each run of meter callbacks next to each other in ``trainer``'s list calls the step hooks of
        the run: each hook then runs, as before, between the same other callbacks (one may change a weight)."""
        callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's connector
        at = callbacks.index(self)
        if not _in_band(self) or (at > 0 and _in_band(callbacks[at - 1])):
            return  # its own hooks, or in the band of the one before it
        band = list(itertools.takewhile(_in_band, callbacks[at:]))
        self._band = tuple(band)  # type: ignore[arg-type]
        for cb in band[1:]:
            cb._band = ()  # type: ignore[attr-defined]
            for hook in STEP_HOOKS:
                setattr(cb, hook, None)

    def _give_back_band(self) -> None:
        """Lightning dispatches its step hooks again (the Trainer may be another at the next fit)."""
        dispatch_again(self, STEP_HOOKS)
        self._band = (self,)

    @property
    @override
    def state_key(self) -> str:
        return self._state_key

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        log_every: int = trainer.log_every_n_steps  # type: ignore[attr-defined]  # set by Lightning's connector
        self._every = self.every_n_steps or log_every
        if self._every < 1:
            raise ValueError(
                f"{type(self).__name__}: `trainer.log_every_n_steps` is {log_every}; "
                "pass `every_n_steps` to measure with logging turned off"
            )
        self._log_every = log_every  # the run's logging steps (a meter that records every step saves there)
        self.record.every_n_steps = 1 if self.every_step else self._every  # type: ignore[attr-defined]

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not in `setup`: `configure_model` runs after it and may create or shard (FSDP2) the modules and
        # parameters; here they are final, and no forward has run yet (nor been compiled).
        meters = [cb for cb in trainer.callbacks if isinstance(cb, Meter)]  # type: ignore[attr-defined]
        self._requested = requested_by(meters)  # a flight recorder's events ask for a full measurement
        self._began = None
        self.attach(pl_module, LightningRun(trainer, self._sink), trainer.optimizers)  # type: ignore[attr-defined]
        self.meet(meters)  # type: ignore[attr-defined]
        self._take_band(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        for cb in self._band:
            cb._batch_starts(trainer, pl_module, batch, batch_idx)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        step_loss: Tensor | None = None  # made once for the band (a kernel or two under a scaler or accumulation)
        for cb in self._band:
            needs = "backward_starts" in cb._moments and cb.needs_loss  # type: ignore[attr-defined]
            if step_loss is None and (needs or "add_loss" in cb._moments):
                step_loss = unscaled_loss(trainer, loss)
            if "add_loss" in cb._moments:  # the micro-batch's loss, before the optimizer steps (the guard reads it)
                cb.add_loss(step_loss)  # type: ignore[attr-defined]
            if "backward_starts" in cb._moments:
                cb.backward_starts(step_loss if needs else None)  # type: ignore[attr-defined]

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for cb in self._band:
            if "backward_ends" in cb._moments:
                cb.backward_ends()  # type: ignore[attr-defined]

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        optimizer = getattr(optimizer, "optimizer", optimizer)  # Lightning's wrapper holds the torch one
        for cb in self._band:
            cb._stepping.append(optimizer)
            if "before_step" in cb._moments:
                cb.before_step(optimizer)  # type: ignore[attr-defined]

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for cb in self._band:
            cb._batch_ends()

    def _batch_starts(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        measured = logging_step(step, self._every, self._requested)
        if step != self._began:  # the first micro-batch of a step
            self._began = step
            if self.every_step:  # type: ignore[attr-defined]  # it saves its window at the run's logging steps
                self._logging = self._log_every > 0 and logging_step(step, self._log_every) is not None
            if "step_starts" in self._moments:
                self.step_starts(step, measured)  # type: ignore[attr-defined]
        if "forward_starts" in self._moments:
            self.forward_starts(measured, None if measured is None else pl_module.device)  # type: ignore[attr-defined]
        if "batch_seen" in self._moments:
            self.batch_seen(batch, {"epoch": trainer.current_epoch, "batch_idx": batch_idx})  # type: ignore[attr-defined]

    def _batch_ends(self) -> None:
        stepped, self._stepping = self._stepping, []
        if "after_step" in self._moments:
            for optimizer in stepped:  # none where the optimizer did not step (accumulation)
                self.after_step(optimizer, self._logging)  # type: ignore[attr-defined]
        if "pause" in self._moments:
            self.pause()  # type: ignore[attr-defined]

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.finish()  # type: ignore[attr-defined]

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.detach()  # type: ignore[attr-defined]
        self._give_back_band()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.crashed(exception)  # type: ignore[attr-defined]
        self.detach()  # type: ignore[attr-defined]
        self._give_back_band()


def _in_band(callback: object) -> bool:
    """Whether ``callback`` is a meter callback whose step hooks are the adapter's: one callback may call them."""
    return isinstance(callback, DiagnosticCallback) and all(
        getattr(type(callback), hook) is getattr(DiagnosticCallback, hook) for hook in STEP_HOOKS
    )


class ParameterCallback(DiagnosticCallback):
    """Base of the callbacks that watch parameters (D3, D4, Adam's state, the flight recorder): flat sharding
    refused."""

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        flat = flat_sharding(trainer.strategy)
        if flat is not None:
            raise ValueError(
                f"{type(self).__name__}: {flat} splits each parameter into flat fragments across ranks, so "
                "per-parameter statistics would be one rank's fragment. Use ModelParallelStrategy with "
                "`fully_shard` (FSDP2): its DTensor shards are reduced across ranks here."
            )


def flat_sharding(strategy: object) -> str | None:
    """The name of ``strategy`` if it flattens parameters into per-rank fragments (FSDP1, DeepSpeed ZeRO).

    By class name, so that the standalone ``pytorch_lightning`` package's strategies are recognised too.
    """
    names = {cls.__name__ for cls in type(strategy).__mro__}
    return next((n for n in ("FSDPStrategy", "DeepSpeedStrategy") if n in names), None)


def first_meter(trainer: pl.Trainer, kind: type[Meter]) -> Any:
    """The first of the Trainer's callbacks that is a ``kind`` meter, or None."""
    callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's connector
    return next((cb for cb in callbacks if isinstance(cb, kind)), None)


def records(trainer: pl.Trainer) -> dict[str, Any]:
    """The records of the first SaturationMonitor, GradDataRatio and UpdateRatio among the Trainer's callbacks
    (None for one that is missing), by kind: what the report and the plots read."""
    return records_by_kind(trainer.callbacks)  # type: ignore[attr-defined]  # set by Lightning's connector
