"""The lecture's plots, drawn from the diagnostic callbacks' records and saved or logged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_netdiag import plots
from lightning_netdiag.callbacks._common import quiet_unused_hooks, records
from lightning_netdiag.run import check_positive_int
from lightning_netdiag.sinks import log_figure

__all__ = ["DiagnosticPlots"]


class DiagnosticPlots(Callback):
    r"""Draws the lecture's four plots, and each layer's activation distribution over time.

    Reads what ``SaturationMonitor``, ``GradDataRatio`` and ``UpdateRatio`` (the first of each in the
    Trainer's callbacks) recorded; needs no raw tensor. At the end of fit, and optionally every
    ``every_n_steps`` optimizer steps, each figure is saved as a PNG file and sent as an image to every
    logger that takes figures (TensorBoard).

    Args:
        every_n_steps: also draw during training, every n-th optimizer step; None draws at the end only.
        save_dir: where the PNG files go; None: ``{trainer.log_dir}/netdiag_plots`` (the logger's
            directory, or the Trainer's root directory without a logger).
        dpi: resolution of the PNG files.

    Raises:
        ValueError: if ``every_n_steps`` or ``dpi`` is not a positive integer.

    Example::

        trainer = Trainer(callbacks=[SaturationMonitor(), GradDataRatio(), UpdateRatio(), DiagnosticPlots()])

    Up to ``plots.MANY_LAYERS`` (10) layers these are the lecture's overlaid lines; with more, heatmaps with
    the layers in depth order (one panel per activation family or kind of weight) and a depth profile.

    **Logged images**: ``{prefix}/plots/{name}`` for ``name`` in ``activations``, ``activation_gradients``,
    ``activations_over_time``, ``weight_gradients``, ``update_ratio`` and, above 10 layers,
    ``depth_profile``; the same names as PNG files (``{name}.png`` at the end, ``{name}_step{N}.png``
    during training). ``saved`` lists the files written.
    """

    def __init__(self, every_n_steps: int | None = None, save_dir: str | None = None, dpi: int = 80) -> None:
        check_positive_int("every_n_steps", every_n_steps, allow_none=True)
        check_positive_int("dpi", dpi)
        self.every_n_steps, self.save_dir, self.dpi = every_n_steps, save_dir, dpi
        self.saved: list[Path] = []
        quiet_unused_hooks(self)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        n = self.every_n_steps
        if n is not None and trainer.global_step % n == 0 and trainer.global_step > 0:
            self._draw(trainer, f"_step{trainer.global_step}")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._draw(trainer, "")

    def _draw(self, trainer: pl.Trainer, suffix: str) -> None:
        if not trainer.is_global_zero:
            return
        found = records(trainer)
        figures = plots.draw_all(**found)
        if not figures:
            return
        prefix = next(record.prefix for record in found.values() if record is not None)
        directory = Path(self.save_dir or Path(trainer.log_dir or trainer.default_root_dir) / "netdiag_plots")
        directory.mkdir(parents=True, exist_ok=True)
        for name, figure in figures.items():
            path = directory / f"{name}{suffix}.png"
            figure.savefig(path, dpi=self.dpi)
            self.saved.append(path)
            log_figure(trainer.loggers, f"{prefix}/plots/{name}", figure, trainer.global_step)
