"""The four diagnostics as meters: each owns its hooks, fills its record (:mod:`lightning_netdiag.record`)
and sends each measurement on through its :class:`~lightning_netdiag.run.Run`.

Pure torch, no Lightning. A meter knows *what* to measure; a front end (the Lightning callbacks, the plain loop
of :mod:`lightning_netdiag.loop`, the Hugging Face callback) decides *when*, by calling its methods at the right
moments of a training step. Every formula is here, once: ``activation`` (D1, D2), ``parameters`` (D3, D4),
``logits`` (attention and output logits), ``optimizer`` (the Adam family's state),
``flight`` (the flight recorder: every step, and its spikes).
"""

from lightning_netdiag.meters.activation import ActivationMeter
from lightning_netdiag.meters.base import InRecord, Meter, records_by_kind
from lightning_netdiag.meters.flight import FlightMeter
from lightning_netdiag.meters.logits import LogitMeter
from lightning_netdiag.meters.optimizer import OptimizerMeter, adam_records
from lightning_netdiag.meters.parameters import (
    DEFAULT_TARGET,
    GradDataMeter,
    ParameterMeter,
    UpdateMeter,
    optimizer_family,
)

__all__ = [
    "DEFAULT_TARGET", "ActivationMeter", "FlightMeter", "GradDataMeter", "InRecord", "LogitMeter", "Meter",
    "OptimizerMeter", "ParameterMeter", "UpdateMeter", "adam_records", "optimizer_family", "records_by_kind",
]  # fmt: skip
