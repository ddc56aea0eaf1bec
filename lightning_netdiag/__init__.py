"""lightning_netdiag: layer-by-layer training-health diagnostics as PyTorch Lightning callbacks.

Four layers, each importing only the ones before it:
``stats`` (pure torch maths) -> ``capture`` (selection, hooks) -> ``callbacks`` (when to measure)
-> ``sinks`` (history and loggers) and the views ``plots`` (matplotlib) and ``report`` (rules in words).
"""

from lightning_netdiag.callbacks import DiagnosticPlots, GradDataRatio, HealthReport, SaturationMonitor, UpdateRatio
from lightning_netdiag.sinks import fast_tensorboard_checksums

__version__ = "0.1.0"

__all__ = [
    "DiagnosticPlots",
    "GradDataRatio",
    "HealthReport",
    "SaturationMonitor",
    "UpdateRatio",
    "__version__",
    "fast_tensorboard_checksums",
]
