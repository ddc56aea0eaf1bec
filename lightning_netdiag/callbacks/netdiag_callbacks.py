"""Every netdiag callback under one name, as ``NetDiag`` and the Hugging Face callback run every meter by default."""

from __future__ import annotations

import functools
from typing import Any

from lightning.pytorch.callbacks import Callback

from lightning_netdiag.callbacks.diagnostic_plots import DiagnosticPlots
from lightning_netdiag.callbacks.flight_recorder import FlightRecorder
from lightning_netdiag.callbacks.grad_data import GradDataRatio
from lightning_netdiag.callbacks.health_report import HealthReport
from lightning_netdiag.callbacks.logit_monitor import LogitMonitor
from lightning_netdiag.callbacks.optimizer_state import OptimizerState
from lightning_netdiag.callbacks.saturation import SaturationMonitor
from lightning_netdiag.callbacks.update_ratio import UpdateRatio
from lightning_netdiag.run import check_positive_int, chosen_part

__all__ = ["CALLBACKS", "netdiag_callbacks"]

#: The callbacks :func:`netdiag_callbacks` gives, by the argument that configures each (NetDiag's names for the
#: meters), in the order they run.
CALLBACKS: dict[str, type[Callback]] = {
    "saturation": SaturationMonitor, "grad_data": GradDataRatio, "update": UpdateRatio, "logits": LogitMonitor,
    "optimizer_state": OptimizerState, "flight": FlightRecorder, "plots": DiagnosticPlots, "report": HealthReport,
}  # fmt: skip
# the shared options each takes (the flight recorder records every step: no cadence)
_MONITOR, _FLIGHT = ("every_n_steps", "prefix"), ("prefix",)
_OPTIONS = {**dict.fromkeys(("saturation", "grad_data", "update", "logits", "optimizer_state"), _MONITOR),
            "flight": _FLIGHT}  # fmt: skip


def netdiag_callbacks(every_n_steps: int | None = None, prefix: str = "netdiag", **chosen: Any) -> list[Callback]:
    """Every netdiag callback, with shared options: the five monitors, the flight recorder, the plots and the health
    report, each at its defaults.

    Args:
        every_n_steps: the monitors' cadence (None: ``trainer.log_every_n_steps``).
        prefix: the first part of every tag.
        **chosen: per callback (``saturation``, ``grad_data``, ``update``, ``logits``, ``optimizer_state``,
            ``flight``, ``plots``, ``report``): True (the default), a configured callback of that class to use
            instead, or None (or False) to leave it out.

    Raises:
        ValueError: if an argument names no callback here, or is not True, None or a callback of its class.

    Example::

        from lightning import Trainer
        from lightning_netdiag import netdiag_callbacks

        trainer = Trainer(callbacks=netdiag_callbacks())  # every diagnostic, the plots and the report
        trainer = Trainer(callbacks=netdiag_callbacks(every_n_steps=10, flight=None))
    """
    check_positive_int("every_n_steps", every_n_steps, allow_none=True)
    unknown = sorted(set(chosen) - set(CALLBACKS))
    if unknown:
        raise ValueError(f"Expected the callbacks to be among {sorted(CALLBACKS)}, got {unknown}")
    shared = {"every_n_steps": every_n_steps, "prefix": prefix}
    out: list[Callback] = []
    for name, cls in CALLBACKS.items():
        kind: Any = cls
        made = functools.partial(kind, **{option: shared[option] for option in _OPTIONS.get(name, ())})
        callback = chosen_part(name, chosen.get(name, True), cls, made)
        if callback is not None:
            out.append(callback)
    return out
