"""The flight recorder under Lightning: every step into the ring, the window out when the run spikes or dies."""

from __future__ import annotations

from collections.abc import Sequence

from lightning_netdiag.callbacks._common import ParameterCallback
from lightning_netdiag.meters import FlightMeter
from lightning_netdiag.meters.flight import KEEP_BATCH
from lightning_netdiag.select import WEIGHT_NDIMS

__all__ = ["FlightRecorder"]


class FlightRecorder(FlightMeter, ParameterCallback):
    r"""Every step, cheaply: the loss, each selected weight's gradient, update and weight norms (and their totals),
    in a ring of the last ``window`` steps on the device. When the loss or the total gradient norm spikes out of its
    band, or turns non-finite, or a weight's update or norm jumps out of its own, or an exception ends training, the
    window is written to the logs (TensorBoard, and a JSON file beside them that ``netdiag report`` reads), the
    health report names the step and the weights whose norms left their band first, and the other netdiag
    callbacks measure the step after it in full.

    A series' band is its median and spread (median absolute deviation) over its last 64 steps, in decades; a
    spike is a value more than 7 spreads above the median (12 for a weight's update or norm, far steadier series),
    once the band holds 50 steps (the first steps of training are a transient). The gradient norms are read just
    before the optimizer step (complete over accumulation, unscaled under a GradScaler, reduced across ranks); the
    update is the weights' change across the step, measured on a fixed sample of 1 % of each weight's elements (the
    copy kept across the step costs 1 % of the selected weights' bytes; ``update_norms="exact"`` keeps them all); a
    step that changed no weight is recorded as skipped. On a GPU
    nothing is copied to the host on a step without an event: each step's verdict is read one step later. Where the
    verdict is read at once (a CPU; not sharded, not compiled, no loss scaler), a step whose gradients turn
    non-finite has its forward replayed before the optimizer steps, to name the module that made them
    (:mod:`lightning_netdiag.origin`).

    Args:
        window: the steps kept (more than 50).
        params: parameter name globs and module types owning the parameter; None selects every
            parameter (filtered by ``ndims``); a frozen one is watched once it trains.
        exclude: name globs and module types never selected.
        ndims: the numbers of dimensions selected (default: every weight of rank 2 to 5).
        update_norms: how each weight's update norm is measured: ``"sampled"`` from every 101st element (a prime
            stride; a weight too small to give 256 elements so, more densely), its norm scaled by ``sqrt(numel /
            sampled)``: 1 % of the weights' bytes kept across the step, the norm within a few per cent (measured in
            ``docs/flight-recorder.md``); ``"exact"`` from a copy of every element (100 % of their bytes);
            ``"off"``: not measured.
        replay: run the forward of a step again, on the same batch, before the optimizer steps: where its gradients
            turn non-finite, to name the module that made them; where its loss or gradient norm spikes, to tell
            whether the spike reproduces (a different output from the same inputs, weights and random state:
            non-determinism or a fault of the hardware). None: where it costs nothing (the verdict is read at once:
            not on a GPU; each step keeps its forward's output sum and random state for it); True: on a GPU too, at
            one host synchronisation a step; False: never.
        prefix: the first part of every tag.
        history_size: the number of points kept in ``history`` per tag.
        save_interval: the least seconds between two saves of the window (the record with the ring's steps) to its
            JSON file while training runs, each at a logging step (``log_every_n_steps``, where the other callbacks
            copy to the host anyway), so that a run killed without an exception (SIGKILL, the out-of-memory killer,
            an abort) leaves its steps up to the last save; each save is one copy from the device. 0: at every
            logging step; None: only at events and the end.
        keep_batch: at an event, the bytes of the step's batch (its inputs as the model received them; under
            Lightning the batch as ``training_step`` gets it) copied to the host and saved beside the logs
            (``{prefix}_flight_batch_{step}.pt``; ``netdiag batch`` prints it), each tensor cut to its first rows
            beyond it; 0 keeps none. Until a step's verdict is read (at once on a CPU, a step later on a GPU) its
            inputs stay referenced: no copy is made, but their memory is freed a step later.

        guard: the most steps in a row not to apply (0, the default: off). A step whose loss or total gradient
            norm is an event (over its spike line, or not finite) is skipped: its gradients are dropped before the
            optimizer steps, so that the weights *and* the optimizer's state stay as they were (torch's optimizers
            leave a parameter without a gradient untouched); the learning-rate scheduler still steps. Decided at one
            host read a step. Skipped steps are logged (``flight_guarded``) and said with their event; one more in a
            row than ``guard`` raises :class:`~lightning_netdiag.meters.flight.GuardStopped`, which ends the run
            with a fatal verdict. Put it after the other netdiag callbacks (``netdiag_callbacks`` does), so that
            they measure the step's gradients before it drops them.

    Raises:
        ValueError: if an argument is out of range or a selection holds something other than module
            types and strings.

    Example::

        from lightning import Trainer
        from lightning_netdiag import FlightRecorder

        trainer = Trainer(callbacks=[FlightRecorder(window=256)])

    **Logged metrics**, for each step of a window written out (at an event, an exception, the end of training):

    - ``{prefix}/flight_loss``: the step's loss (the mean of its micro-batches'); ``flight_loss_nonfinite``: 1 where
      it was NaN or infinite;
    - ``{prefix}/flight_grad_total``, ``{prefix}/flight_update_total``: the norms over every selected weight;
    - ``{prefix}/flight_grad_norm/{name}``, ``flight_update_norm/{name}``, ``flight_weight_norm/{name}``: each
      selected weight's; ``flight_grad_nonfinite/{name}``: 1 where its gradient norm was not finite;
    - ``{prefix}/flight_skipped``: 1 for a step that changed no weight (a GradScaler skipped it);
    - ``{prefix}/flight_batch``: a fingerprint of the step's batch (equal batches, equal numbers);
    - ``{prefix}/flight_guarded``: 1 for a step the guard skipped;
    - ``{prefix}/flight_joined``: the parameters that began training at the step (unfrozen: more of the optimizer's
      parameters with a gradient than ever before); a spike in the 16 steps after it is the change's, no event.

    At a logging step at least ``save_interval`` seconds after the last save, the record with the ring's steps so
    far also goes to its JSON file beside the logs (not to the loggers, which are flushed then).
    """

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
        FlightMeter.__init__(
            self, window, params, exclude, ndims, update_norms, replay, prefix, history_size, save_interval,
            keep_batch, guard,
        )  # fmt: skip
        self._cadence(1)
