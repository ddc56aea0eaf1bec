"""The health report in words: the lecture's rules, checked on the diagnostic callbacks' records."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_netdiag import report
from lightning_netdiag.callbacks._common import monitors
from lightning_netdiag.sinks import log_report


class HealthReport(Callback):
    r"""Says what is wrong with the network and why, from what the diagnostic callbacks recorded.

    The rules (see ``lightning_netdiag.report``), calibrated per activation family: saturation (tanh-like
    above 5 %, gates above 25 %, ReLU-like above 90 %, GELU-like above 10 %), dead tanh-like layers and dead
    units, activation gradients vanishing or exploding from the last watched layer to the first, a weight's
    grad:data far from comparable weights', update:data far from its target (with the learning-rate factor
    that would bring those layers to it) or layers drifting apart, and non-finite values (fatal). Each rule
    gives one verdict: how many layers break it and the worst few.

    At the end of fit the report is printed as a table (rank zero), sent to the loggers that take a report
    (TensorBoard, W&B, MLflow), and kept in ``verdicts``. During training the rules are checked at each
    step that recorded something.

    Args:
        warn: warn the first time each rule trips during training (once per rule, naming the layers).
        stop_on_fatal: stop training (``trainer.should_stop``) on a fatal verdict.
        print_table: print the report at the end of fit.

    Example::

        trainer = Trainer(callbacks=[SaturationMonitor(), GradDataRatio(), UpdateRatio(), HealthReport()])
        trainer.fit(model)
        for verdict in trainer.callbacks[-1].verdicts: ...

    **Logged report**: ``{prefix}/health_report``: a markdown table in TensorBoard's text tab, a table in
    W&B, a markdown artifact ``{prefix}/health_report_step{N}.md`` in MLflow.
    """

    def __init__(self, warn: bool = True, stop_on_fatal: bool = False, print_table: bool = True) -> None:
        self.warn, self.stop_on_fatal, self.print_table = bool(warn), bool(stop_on_fatal), bool(print_table)
        self.verdicts: list[report.Verdict] = []
        self._warned: set[tuple[str, str]] = set()
        self._checked: tuple[int | None, ...] = ()
        self._monitors: dict[str, Any] = {}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._monitors = monitors(trainer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._check(trainer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer)

    def _check(self, trainer: pl.Trainer) -> None:
        if not (self.warn or self.stop_on_fatal):
            return
        latest = tuple(cb.history.last_step if cb is not None else None for cb in self._monitors.values())
        if latest == self._checked:  # nothing new was recorded: nothing to check
            return
        self._checked = latest
        for v in report.evaluate(**self._monitors):
            if self.warn and (v.check, v.healthy) not in self._warned:  # once per rule (and family)
                self._warned.add((v.check, v.healthy))
                where = v.layer if v.hits == 1 else f"{v.hits} layers, worst {v.layer}"
                rank_zero_warn(f"netdiag: {v.check} in {where} ({v.value:.4g}; healthy {v.healthy}): {v.cause}")
            if v.severity == "fatal" and self.stop_on_fatal:
                trainer.should_stop = True

    def _finish(self, trainer: pl.Trainer) -> None:
        self.verdicts = report.evaluate(**self._monitors)
        present = [cb for cb in self._monitors.values() if cb is not None]
        if not present:
            return
        step = max((cb.history.last_step for cb in present if cb.history.last_step is not None), default=None)
        if self.print_table:
            rank_zero_info(report.format_table(self.verdicts, step))
        if trainer.is_global_zero:
            log_report(
                trainer.loggers,
                f"{present[0].prefix}/health_report",
                report.format_markdown(self.verdicts, step),
                report.as_table(self.verdicts),
                trainer.global_step,
            )
