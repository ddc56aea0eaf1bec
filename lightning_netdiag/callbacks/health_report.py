"""The health report in words: the lecture's rules, checked on the diagnostic callbacks' records."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_netdiag import report
from lightning_netdiag.callbacks._common import quiet_unused_hooks, records
from lightning_netdiag.sinks import log_report

__all__ = ["HealthReport"]


class HealthReport(Callback):
    r"""Says what is wrong with the network and why, from what the diagnostic callbacks recorded.

    The rules (``lightning_netdiag.rules``; each line was set on the diagnosis suite, healthy and faulty
    training runs, and docs/diagnosis.md gives the evidence) come in two phases. At initialisation (step 0):
    saturation (tanh-like above 40 %, gates above 25 %, ReLU-like above 90 %, GELU-like above 10 %), dead
    tanh-like layers, activation gradients vanishing or exploding from the last layer to the first, and an
    over-confident output (the loss at init far above ln(classes)). During training, each holding at three
    logging steps in a row: dead ReLU/GELU units, a weight that does not move while the others do (left out of
    the optimizer, or a rate of 0), fp16 gradients below fp16's range, a loss that diverged (the median of the last
    ``every_n_steps`` steps' losses 10x its value at step 0; 100x: at once), and the learning rate (too high under
    Adam, too low under SGD, or a network killed by too large SGD steps), attention logits growing and Adam's
    epsilon dominating; an attention logit or Adam's normalised step far past its line counts at once. Non-finite
    values are fatal. Each rule gives one verdict: how many layers break it and the worst few.

    At the end of fit the report (:func:`lightning_netdiag.report.summarize`, the same as the plain loop's, the
    Hugging Face callback's and ``netdiag report``'s on the run's logs) is printed as a table, with a note on what
    the learning-rate check read (rank zero), sent to the loggers that take a report (TensorBoard, W&B, MLflow),
    and kept in ``report``, ``verdicts`` and ``notes``. Each verdict says since which step it holds; a rule that
    broke during training and no longer holds stays in it, marked cleared, with the steps where it held. During
    training the rules are checked at each step that recorded something; each rule's first verdict is kept in
    ``warnings`` (with the step it was judged at) and, with ``warn``, warned once.

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
        self.report: report.Report | None = None  # the report at the end of fit
        self.verdicts: list[report.Verdict] = []
        self.warnings: list[report.Verdict] = []  # each rule's first verdict during training, with its step
        self.notes: list[str] = []  # what the report read where it found nothing (the learning rate)
        self._warned: set[str] = set()
        self._checked: tuple[int | None, ...] = ()
        self._records: dict[str, Any] = {}
        quiet_unused_hooks(self)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._records = records(trainer)

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
        latest = tuple(r.last_step if r is not None else None for r in self._records.values())
        if latest == self._checked:  # nothing new was recorded: nothing to check
            return
        self._checked = latest
        for v in report.evaluate(**self._records):
            if self.warn and v.rule not in self._warned:  # once per rule
                self._warned.add(v.rule)
                self.warnings.append(v)
                where = (
                    "" if not v.hits else f" in {v.layer}" if v.hits == 1 else f" in {v.hits} layers, worst {v.layer}"
                )
                at = f"at step {v.step}, " if v.step is not None else ""
                rank_zero_warn(f"netdiag: {v.check}{where} ({at}{v.value:.4g}; healthy {v.healthy}): {v.cause}")
            if v.severity == "fatal" and self.stop_on_fatal:
                trainer.should_stop = True

    def _finish(self, trainer: pl.Trainer) -> None:
        present = [r for r in self._records.values() if r is not None]
        if not present:
            self.verdicts = []
            return
        self.report = report.summarize(**self._records)
        self.verdicts, self.notes = self.report.verdicts, self.report.notes
        if self.print_table:
            rank_zero_info(self.report.table())
        if trainer.is_global_zero:
            log_report(
                trainer.loggers,
                f"{present[0].prefix}/health_report",
                self.report.markdown(),
                report.as_table(self.verdicts),
                trainer.global_step,
            )
