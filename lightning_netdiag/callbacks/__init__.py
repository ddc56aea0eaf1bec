"""The callbacks: when to measure. Each ties capture, stats and sinks together for one diagnostic."""

from lightning_netdiag.callbacks.diagnostic_plots import DiagnosticPlots
from lightning_netdiag.callbacks.flight_recorder import FlightRecorder
from lightning_netdiag.callbacks.grad_data import GradDataRatio
from lightning_netdiag.callbacks.health_report import HealthReport
from lightning_netdiag.callbacks.logit_monitor import LogitMonitor
from lightning_netdiag.callbacks.optimizer_state import OptimizerState
from lightning_netdiag.callbacks.saturation import SaturationMonitor
from lightning_netdiag.callbacks.update_ratio import UpdateRatio

__all__ = [
    "DiagnosticPlots", "FlightRecorder", "GradDataRatio", "HealthReport", "LogitMonitor", "OptimizerState",
    "SaturationMonitor", "UpdateRatio",
]  # fmt: skip
