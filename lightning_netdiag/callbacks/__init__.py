"""The Lightning callbacks: each is one meter and the one adapter from Lightning's hooks to the meters' lifecycle
(``_common.DiagnosticCallback``); :func:`netdiag_callbacks` gives them all."""

from lightning_netdiag.callbacks.diagnostic_plots import DiagnosticPlots
from lightning_netdiag.callbacks.flight_recorder import FlightRecorder
from lightning_netdiag.callbacks.grad_data import GradDataRatio
from lightning_netdiag.callbacks.health_report import HealthReport
from lightning_netdiag.callbacks.logit_monitor import LogitMonitor
from lightning_netdiag.callbacks.netdiag_callbacks import netdiag_callbacks
from lightning_netdiag.callbacks.optimizer_state import OptimizerState
from lightning_netdiag.callbacks.saturation import SaturationMonitor
from lightning_netdiag.callbacks.update_ratio import UpdateRatio

__all__ = [
    "DiagnosticPlots", "FlightRecorder", "GradDataRatio", "HealthReport", "LogitMonitor", "OptimizerState",
    "SaturationMonitor", "UpdateRatio", "netdiag_callbacks",
]  # fmt: skip
