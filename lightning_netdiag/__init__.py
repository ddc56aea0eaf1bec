"""lightning_netdiag: layer-by-layer training-health diagnostics for Lightning, plain PyTorch and Hugging Face.

Layers, each importing only the ones before it:

- core, pure torch: ``stats`` (the formulas' additive records), ``spikes`` (the flight recorder's bands and
  scores) -> ``activations`` (what counts as one) ->
  ``select`` (what is watched), ``capture`` (the activation hooks), ``attention`` (the attention calls and the
  output's logits), ``dist`` (ranks and shards), ``tags`` (names and on-disk conventions), ``record`` (what was
  measured: the one thing every view reads) -> ``run``
  (what a meter needs from the loop) -> ``meters`` (one per diagnostic, each filling its record);
- front ends, deciding *when* to measure: ``callbacks`` (Lightning), ``loop`` (a plain loop or notebook),
  ``hf`` (the Hugging Face Trainer), ``cli`` (the ``netdiag`` command, on finished runs' logs);
- sinks, readers and views, taking records: ``sinks`` (loggers), ``logs`` (the logs read back into records),
  ``plots``, ``rules`` (the health report's rules, declared, one registry), ``report`` (the rules replayed over
  a run: its summary), ``render`` (the report as text).

Nothing here imports Lightning until a callback is asked for, so the plain loop runs without it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_HOMES = {
    "DiagnosticPlots": "lightning_netdiag.callbacks",
    "FlightRecorder": "lightning_netdiag.callbacks",
    "GradDataRatio": "lightning_netdiag.callbacks",
    "GuardStopped": "lightning_netdiag.meters.flight",
    "HealthReport": "lightning_netdiag.callbacks",
    "LogitMonitor": "lightning_netdiag.callbacks",
    "OptimizerState": "lightning_netdiag.callbacks",
    "SaturationMonitor": "lightning_netdiag.callbacks",
    "UpdateRatio": "lightning_netdiag.callbacks",
    "NetDiag": "lightning_netdiag.loop",
    "NetDiagCallback": "lightning_netdiag.hf",
    "fast_tensorboard_checksums": "lightning_netdiag.sinks",
    "netdiag_callbacks": "lightning_netdiag.callbacks",
}

__all__ = [*sorted(_HOMES), "__version__"]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'lightning_netdiag' has no attribute {name!r}")
