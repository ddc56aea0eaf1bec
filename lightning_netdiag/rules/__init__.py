"""The health report's rules, declared (:class:`~lightning_netdiag.rules.base.Rule`), one module per family:
``init`` (the network at step 0), ``training`` (non-finite values, dead units, a weight not learning, fp16
underflow, a diverged loss), ``learning_rate``, ``instability`` (attention logits and entropy, Adam's eps) and
``flight`` (the flight recorder's events, said as they were). :data:`RULES` is the one registry: :func:`evaluate`
walks it, the report's summary replays it, the diagnosis suite's scorer reads each rule's signal and line from it.

Each rule was calibrated on runs with a known outcome (``benchmarks/diagnosis``): precision first, a rule speaks
only where the suite shows that its signal separates healthy runs from faulty ones; each rule's ``section`` points
to where ``docs/diagnosis.md`` tells the values on both sides of its line.

To add a rule: declare it in its family's module (its id, the records it reads, its signal and line, when it
applies, its texts), add it to that module's ``RULES`` and give it a healthy and a faulty case in
``tests/test_rules.py`` (the suite fails without them).
"""

from __future__ import annotations

from lightning_netdiag.record import (
    ActivationRecord,
    FlightRecord,
    GradDataRecord,
    LogitRecord,
    OptimizerRecord,
    UpdateRecord,
)
from lightning_netdiag.rules import init, instability, learning_rate, training
from lightning_netdiag.rules.base import AT_INIT, PERSIST, WORST, Found, Records, Rule, Verdict
from lightning_netdiag.rules.flight import event_verdicts, flight_notes

__all__ = [
    "AT_INIT", "BY_ID", "PERSIST", "RULES", "WORST", "Found", "Records", "Rule", "Verdict", "evaluate",
    "event_verdicts", "flight_notes",
]  # fmt: skip

#: Every rule, in the order a report lists the verdicts of one severity.
RULES: tuple[Rule, ...] = (
    *training.NONFINITE, *init.RULES, *training.RULES, *instability.RULES, *learning_rate.RULES
)  # fmt: skip
BY_ID = {rule.id: rule for rule in RULES}
if len(BY_ID) != len(RULES):
    raise ValueError(f"Expected every rule to have an id of its own, got {[r.id for r in RULES]}")


def evaluate(
    saturation: ActivationRecord | None = None,
    grad_data: GradDataRecord | None = None,
    update: UpdateRecord | None = None,
    logits: LogitRecord | None = None,
    optimizer: OptimizerRecord | None = None,
    flight: FlightRecord | None = None,
    rules: tuple[Rule, ...] = RULES,
) -> list[Verdict]:
    """Every broken rule at the latest step recorded, fatal ones first (None for a record not made); the flight
    recorder's events so far. ``rules``: the registry walked (a test may pass another)."""
    records: Records = {"saturation": saturation, "grad_data": grad_data, "update": update, "logits": logits,
                        "optimizer": optimizer}  # fmt: skip
    verdicts = event_verdicts(flight)
    spoke: set[str] = set()
    for rule in rules:
        if AT_INIT in rule.yields_to and any(v.step == 0 for v in verdicts) or spoke & set(rule.yields_to):
            continue
        found = rule.judge(records)
        if found:
            spoke.add(rule.id)
        verdicts += found
    return sorted(verdicts, key=lambda v: v.severity != "fatal")
