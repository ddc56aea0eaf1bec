"""The callbacks: when to measure. Each ties capture, stats and sinks together for one diagnostic."""

from lightning_netdiag.callbacks.grad_data import GradDataRatio
from lightning_netdiag.callbacks.saturation import SaturationMonitor
from lightning_netdiag.callbacks.update_ratio import UpdateRatio

__all__ = ["GradDataRatio", "SaturationMonitor", "UpdateRatio"]
