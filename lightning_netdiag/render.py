"""The health report as text: a plain table (the console), markdown (TensorBoard's text tab) and rows (W&B's
table). They take verdicts, never records or rules."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from lightning_netdiag.rules.base import Verdict

__all__ = ["COLUMNS", "as_table", "checks", "format_markdown", "format_table"]

COLUMNS = ["severity", "check", "layers", "worst", "value", "healthy", "steps", "likely cause", "try"]


def _value(v: Verdict) -> str:
    return f"{v.value:.4g}" if math.isfinite(v.value) else str(v.value)


def _layers(v: Verdict) -> str:
    # "-": no layer named (a run that ended by an exception with every series in its band)
    return "-" if not v.hits else v.layer if v.hits == 1 else f"{v.hits} layers: {v.layer}"


def format_table(verdicts: list[Verdict], step: int | None = None, notes: Iterable[str] = ()) -> str:
    """A plain-text table: one row per verdict, its cause and advice on the lines below; ``notes`` after it."""
    title = "netdiag health report" + (f" at step {step}" if step is not None else "")
    after = "".join(f"\n{note}" for note in notes)
    if not verdicts:
        return f"{title}: every check within its healthy range{after}"
    rows = [("", "check", "layer", "value", "healthy", "steps")]
    rows += [(v.severity.upper(), v.check, _layers(v), _value(v), v.healthy, v.steps) for v in verdicts]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [title]
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i:
            v = verdicts[i - 1]
            lines += [f"{'':{widths[0]}}  cause: {v.cause}", f"{'':{widths[0]}}  try:   {v.advice}"]
    return "\n".join(lines) + after


def as_table(verdicts: list[Verdict]) -> tuple[list[str], list[list[Any]]]:
    """Column names and one row per verdict (W&B's table)."""
    return COLUMNS, [
        [v.severity, v.check, v.hits, v.layer, v.value, v.healthy, v.steps, v.cause, v.advice] for v in verdicts
    ]


def format_markdown(verdicts: list[Verdict], step: int | None = None, notes: Iterable[str] = ()) -> str:
    """The same report as a markdown table (TensorBoard's text tab renders it)."""
    after = "".join(f"\n\n{note}" for note in notes)
    if not verdicts:
        return format_table(verdicts, step) + after
    head = f"| {' | '.join(COLUMNS)} |\n|{'---|' * len(COLUMNS)}\n"
    body = ""
    for v, row in zip(verdicts, as_table(verdicts)[1], strict=True):
        row[COLUMNS.index("value")] = _value(v)  # rounded for reading
        body += f"| {' | '.join(map(str, row))} |\n"
    return f"**netdiag health report{f' at step {step}' if step is not None else ''}**\n\n{head}{body}{after}"


def checks(verdicts: Iterable[Verdict]) -> list[str]:
    """The checks of ``verdicts``, each once, in order; ``(cleared)`` after one that held only during training."""
    return list(dict.fromkeys(v.check + (" (cleared)" if v.cleared else "") for v in verdicts))
