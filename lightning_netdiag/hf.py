"""The four diagnostics under the Hugging Face ``Trainer``: one ``TrainerCallback`` (transformers stays optional).

The callback attaches a :class:`~lightning_netdiag.loop.NetDiag` to the Trainer's model and optimizer when
training begins: the same hooks, meters and numbers as the plain loop and the Lightning callbacks.
"""

from __future__ import annotations

import os
import socket
import sys
from datetime import datetime
from typing import Any

from transformers import TrainerCallback

from lightning_netdiag import report
from lightning_netdiag.flight.lifeline import at_exit
from lightning_netdiag.loop import METERS, NetDiag, meter_option
from lightning_netdiag.run import check_positive_int

__all__ = ["NetDiagCallback"]


class NetDiagCallback(TrainerCallback):  # type: ignore[misc]
    """The diagnostics for ``transformers.Trainer``: ``Trainer(..., callbacks=[NetDiagCallback()])``.

    Measures every ``every_n_steps``-th optimizer step (None: the Trainer's ``logging_steps``), as the plain
    loop does: activations and their gradients over every micro-batch of the step, the gradients unscaled
    (fp16: the Trainer's GradScaler) and complete (accumulated, and all-reduced under DDP), the update
    across the optimizer's step. The Trainer clips the gradients (``max_grad_norm``, 1.0 by default) before
    its optimizer steps and offers no callback between the last backward and the clipping, so D3 reads the
    clipped gradient: the one the optimizer applies. The loss at init is the model's own ``loss`` output,
    read only without accumulation (with it, a model may divide each micro-batch's loss by the window's
    token count).

    Where ``report_to`` holds ``"tensorboard"`` (or ``"all"``), the measurements go to a ``SummaryWriter``
    in ``log_dir``: by default the Trainer's TensorBoard directory where ``TENSORBOARD_LOGGING_DIR`` sets it
    (one run beside the Trainer's loss and learning rate), else a directory of its own for each training,
    ``{output_dir}/runs/netdiag/{time}_{host}``, named as the Trainer names its own run (trainings that reuse an
    ``output_dir`` do not mix: their logs would read back as one run); ``run_dir`` says which. Otherwise they are
    kept in memory only (``diag``'s meters).
    At the end of training the health report is printed on rank 0 and kept in ``verdicts``. The Trainer
    tells callbacks of no exception: after one, call ``callback.diag.close()`` to remove the hooks. The flight
    recorder's window is written out all the same when the process ends during training (an exception nobody
    caught), from an ``atexit`` hook, and on SIGTERM (see :class:`~lightning_netdiag.loop.NetDiag`).

    Args:
        every_n_steps: measure every n-th optimizer step; None takes ``args.logging_steps``.
        print_report: print the health report when training ends.
        log_dir: where the TensorBoard events go (see above); None: the default.
        **meters: the meters to run, passed on to :class:`~lightning_netdiag.loop.NetDiag` (``saturation``,
            ``grad_data``, ``update``, ``logits``, ``optimizer_state``, ``flight``: each True by default, a
            configured meter, or None to leave out).

    Raises:
        ValueError: if an argument is out of range, or is not one of NetDiag's meters.

    Example::

        from transformers import Trainer
        from lightning_netdiag.hf import NetDiagCallback

        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[NetDiagCallback()])
    """

    def __init__(
        self, every_n_steps: int | None = None, print_report: bool = True, log_dir: str | None = None, **meters: Any
    ) -> None:
        check_positive_int("every_n_steps", every_n_steps, allow_none=True)
        unknown = sorted(set(meters) - set(METERS))
        if unknown:
            raise ValueError(f"Expected the meters to be among {sorted(METERS)}, got {unknown}")
        for name, value in meters.items():
            meter_option(name, value)  # refused now, not when training begins
        self.every_n_steps = every_n_steps
        self.meters = meters
        self.print_report = bool(print_report)
        self.log_dir = log_dir
        self.diag: NetDiag | None = None
        self.verdicts: list[report.Verdict] = []
        self.run_dir: str | None = None  # where this training's TensorBoard events and flight window go
        self._writer: Any = None
        self._unregister: Any = None  # the exit hook's, while training runs

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        optimizer = kwargs.get("optimizer")  # accelerate's wrapper: NetDiag takes the torch optimizer and its scaler
        report_to = [args.report_to] if isinstance(args.report_to, str) else list(args.report_to or [])
        if ("tensorboard" in report_to or "all" in report_to) and state.is_world_process_zero:
            from torch.utils.tensorboard import SummaryWriter

            self.run_dir = self.log_dir or _tensorboard_dir(args)
            self._writer = SummaryWriter(log_dir=self.run_dir)
        every = self.every_n_steps or int(args.logging_steps)
        self.diag = NetDiag(
            model, optimizer, writer=self._writer, every_n_steps=every,
            loss_from_output=args.gradient_accumulation_steps == 1, **self.meters,
        )  # fmt: skip
        self.diag.steps = state.global_step  # resumed runs go on counting
        self.diag.attach()
        self._unregister = at_exit(self._process_ends)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.diag is not None:  # kept with a batch the flight recorder saves
            self.diag.batch_index(epoch=state.epoch, step=state.global_step)

    def _process_ends(self) -> None:
        """The process ends during training: the exception that ended it (where Python kept it) and the flight
        recorder's window go into the logs."""
        if self.diag is not None:  # NetDiag.crashed does nothing without a flight recorder
            error = getattr(sys, "last_value", None)
            self.diag.crashed(error if error is not None else "the process ended during training")
        self._close()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._unregister is not None:
            self._unregister()
            self._unregister = None
        if self.diag is None:
            return
        self.diag.close()
        self.verdicts = self.diag.report(print_table=self.print_report and state.is_world_process_zero)
        self._close()

    def _close(self) -> None:
        if self.diag is not None:
            self.diag.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _tensorboard_dir(args: Any) -> str:
    """The Trainer's TensorBoard directory where set, else a new ``{output_dir}/runs/netdiag/{time}_{host}``."""
    shared = os.environ.get("TENSORBOARD_LOGGING_DIR")
    if shared:
        return os.path.expanduser(shared)
    base = os.path.join(args.output_dir, "runs", "netdiag", f"{datetime.now():%b%d_%H-%M-%S}_{socket.gethostname()}")
    path, n = base, 1
    while os.path.exists(path):  # two trainings within a second
        path, n = f"{base}_{n}", n + 1
    return path
