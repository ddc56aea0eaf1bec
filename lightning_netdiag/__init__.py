"""lightning_netdiag: layer-by-layer training-health diagnostics for Lightning, plain PyTorch and Hugging Face.

Layers, each importing only the ones before it:

- core, pure torch: ``stats`` (the formulas' additive records) -> ``activations`` (what counts as one) ->
  ``capture`` (selection, hooks) -> ``meters`` (one per diagnostic: records in, measurements out);
- front ends, deciding *when* to measure: ``callbacks`` (Lightning), ``loop`` (a plain loop or notebook),
  ``hf`` (the Hugging Face Trainer), ``cli`` (the ``netdiag`` command, from finished runs' logs);
- sinks and views, taking measurements: ``history``, ``sinks`` (loggers), ``plots``, ``report``.

Nothing here imports Lightning until a callback is asked for, so the plain loop runs without it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_HOMES = {
    "DiagnosticPlots": "lightning_netdiag.callbacks",
    "GradDataRatio": "lightning_netdiag.callbacks",
    "HealthReport": "lightning_netdiag.callbacks",
    "SaturationMonitor": "lightning_netdiag.callbacks",
    "UpdateRatio": "lightning_netdiag.callbacks",
    "NetDiag": "lightning_netdiag.loop",
    "NetDiagCallback": "lightning_netdiag.hf",
    "fast_tensorboard_checksums": "lightning_netdiag.sinks",
}

__all__ = [*sorted(_HOMES), "__version__"]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'lightning_netdiag' has no attribute {name!r}")
