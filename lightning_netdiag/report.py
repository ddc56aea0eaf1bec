"""The health report of a run: the rules (:mod:`lightning_netdiag.rules`) replayed at every logged step of its
records, so that a warning that held during training and cleared is kept, with the steps where it held. It reads
records only, so the report of a live run and of its logs is one and the same.

:func:`evaluate` judges the latest step; :func:`summarize` is the report of a whole run, the one that every front end
and ``netdiag report`` print. The text forms are in :mod:`lightning_netdiag.render`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from lightning_netdiag.record import (
    ActivationRecord,
    FlightRecord,
    GradDataRecord,
    Key,
    LogitRecord,
    OptimizerRecord,
    Record,
    UpdateRecord,
)
from lightning_netdiag.render import COLUMNS, as_table, checks, format_markdown, format_table
from lightning_netdiag.rules import PERSIST, Verdict, evaluate, event_verdicts, flight_notes
from lightning_netdiag.rules.flight import after_instability
from lightning_netdiag.rules.instability import logit_notes
from lightning_netdiag.rules.learning_rate import learning_rate_note

__all__ = [
    "COLUMNS", "PERSIST", "Report", "Verdict", "as_table", "checks", "evaluate", "format_markdown", "format_table",
    "replay", "summarize",
]  # fmt: skip


@dataclass(frozen=True)
class Report:
    """A run's health report: every rule that broke (those that hold at the end first, fatal ones first, then
    those that held during training and cleared), what the report read where it found nothing (``notes``), and
    the latest step recorded."""

    verdicts: list[Verdict]
    notes: list[str]
    step: int | None

    def table(self) -> str:
        return format_table(self.verdicts, self.step, self.notes)

    def markdown(self) -> str:
        return format_markdown(self.verdicts, self.step, self.notes)


def replay(**records: Record | None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Every step recorded, in order, with the records as they were at it (what had been recorded up to it):
    ``(step, {kind: record or None})``, to judge each step as while training ran. Live or read from logs, the
    same records replay alike. The records given are not changed; the ones yielded grow as it goes (the rules
    read the latest points of each series, so each step is judged in time independent of the run's length)."""
    full = records
    partial = {kind: None if record is None else record.empty() for kind, record in full.items()}
    by_step: dict[int, dict[str, dict[Key, float]]] = {}
    for kind, record in full.items():
        if record is not None:
            for key, points in record.series.items():
                for step, value in points:
                    by_step.setdefault(step, {}).setdefault(kind, {})[key] = value
    for step in sorted(by_step):
        for kind, scalars in by_step[step].items():
            partial[kind].add(step, scalars, {})  # type: ignore[union-attr]
        yield step, partial


def summarize(
    saturation: ActivationRecord | None = None,
    grad_data: GradDataRecord | None = None,
    update: UpdateRecord | None = None,
    logits: LogitRecord | None = None,
    optimizer: OptimizerRecord | None = None,
    flight: FlightRecord | None = None,
    notes: Iterable[str] = (),
) -> Report:
    """The report of a run, from its records: the one summary that every front end and ``netdiag report``
    print. Each verdict says since when it holds; a rule that broke during training and holds no longer
    stays in it, marked cleared, with the steps where it held (its last verdict then). ``notes``: what the
    caller knows besides the records (what a run's logs did not say), printed after the report's own."""
    # rule id -> (the first and the last step of its latest run of steps, its verdict at the last)
    spans: dict[str, tuple[int, int, Verdict]] = {}
    previous: int | None = None
    records: dict[str, Any] = {"saturation": saturation, "grad_data": grad_data, "update": update,
                               "logits": logits, "optimizer": optimizer}  # fmt: skip
    held: dict[str, Verdict] = {}  # rule id -> its first verdict, since the first step it held
    for step, partial in replay(**records):  # the flight recorder's events are facts: they are not replayed
        for v in evaluate(**partial):
            first, last, _ = spans.get(v.rule, (step, None, v))
            spans[v.rule] = (first if last == previous else step, step, v)
            held.setdefault(v.rule, replace(v, since=step))
        previous = step
    final = evaluate(**records)
    now = {v.rule for v in final}
    events = after_instability(event_verdicts(flight), held)  # an instability before a spike is its cause
    verdicts = [*events, *(replace(v, since=spans.get(v.rule, (v.step,))[0]) for v in final)]
    verdicts.sort(key=lambda v: v.severity != "fatal")
    verdicts += [
        replace(v, step=last, since=first, cleared=True) for rule, (first, last, v) in spans.items() if rule not in now
    ]
    present = [r for r in (*records.values(), flight) if r is not None]
    last = max((r.last_step for r in present if r.last_step is not None), default=None)
    return Report(verdicts, [*_notes(records, verdicts), *flight_notes(flight), *notes], last)


def _notes(records: Mapping[str, Any], verdicts: list[Verdict]) -> list[str]:
    """What the report read where it found nothing, and what it could not read."""
    present = [r for r in records.values() if r is not None]
    note = learning_rate_note(records)
    notes = [*([] if note is None else [note]), *logit_notes(records)]
    if any(v.step not in (0, None) for v in verdicts):
        every = next((r.every_n_steps for r in present if r.every_n_steps), None)
        window = f" (measured every {every} steps: over {every * (PERSIST - 1)} steps)" if every else ""
        notes.append(
            f"a rule during training counts once it holds at {PERSIST} logging steps in a row{window}, or at once "
            "where its signal is far past its line"
        )
    undescribed = [r.kind for r in present if not r.described]
    if undescribed:
        notes.append(
            f"note: these logs hold no description of {', '.join(undescribed)} (written by netdiag >= 0.1.0), so "
            "the rules that depend on a layer's activation kind or on the optimizer stay silent."
        )
    return notes
