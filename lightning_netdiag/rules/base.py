"""The shape of a rule: one declared object holding what it reads, the signal it compares with its line, when it
applies, how long the condition must hold and the texts of its verdict. :meth:`Rule.judge` is the one way a rule
turns records into a verdict; the rules themselves are data (:mod:`lightning_netdiag.rules`).

A rule applies

- ``"init"``: on step 0 (the first optimizer step, before any update), the lecture's rules of thumb;
- ``"training"``: once its condition holds at :data:`PERSIST` consecutive *logging* steps (measured steps,
  ``every_n_steps`` apart), or at once where its signal is past its ``at_once`` line (a value so far past the line
  that one batch cannot have pushed it there);
- ``"now"``: at the latest logging step alone (non-finite values), or held as in training where the rule says so
  (``held_under_scaler``: a loss scaler skips the steps whose gradients overflowed).

A verdict's identity is its rule's :attr:`Rule.id`: rewording a text changes no verdict.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from lightning_netdiag.record import Record

__all__ = [
    "AT_INIT", "PERSIST", "WHEN", "WORST", "Found", "Records", "Rule", "Verdict", "at", "at_init", "median",
    "nearest_step", "persistent", "positive", "steps_of",
]  # fmt: skip

#: Logging steps in a row (not optimizer steps) at which a during-training condition must hold before it counts:
#: at every_n_steps=n, a window of (PERSIST - 1) * n optimizer steps.
PERSIST = 3
WORST = 3  # layers named per verdict
#: In :attr:`Rule.yields_to`: the rule is silent where any verdict was judged at step 0 (a fault at init explains
#: what the rule reads better than the rule's own cause).
AT_INIT = "at init"
WHEN = ("init", "training", "now")

#: kind -> record (None for a kind not recorded): what every rule reads.
Records = Mapping[str, Any]


@dataclass(frozen=True)
class Verdict:
    """One broken rule. ``severity`` is ``"fatal"`` (training cannot recover) or ``"warning"``.

    ``layer`` names the worst few layers that break it (and how many more), ``value`` is the worst layer's,
    ``hits`` the number of layers, ``worst`` the worst few as (name, value) pairs, worst first; ``step`` the
    logging step it was judged at (0 for the rules about the network at initialisation). In a run's summary
    (:func:`lightning_netdiag.report.summarize`): ``since``, the first logging step of the run of steps at which
    it held up to ``step``; ``cleared``, whether it no longer held at the end (then ``step`` is the last step it
    held). ``rule``: the id of the rule that made it (its identity), ``"flight.<kind>"`` for the flight
    recorder's events; ``why``: for a spike, the cause its evidence names (``rules.flight.SPIKE_CAUSES``' ids, or
    ``"instability"``); for non-finite values, ``"overflow"`` where the replay found float16's range overflowed.
    """

    severity: str
    check: str
    layer: str
    value: float
    healthy: str
    cause: str
    advice: str
    hits: int = 1
    worst: tuple[tuple[str, float], ...] = ()
    step: int | None = None
    since: int | None = None
    cleared: bool = False
    rule: str = ""
    why: str = ""

    @property
    def steps(self) -> str:
        """Where it held, in words: ``at init``, ``since 150``, ``150-600, cleared since``."""
        if self.step is None:
            return "-"
        span = f"{self.since}-{self.step}" if self.since is not None and self.since != self.step else f"{self.step}"
        if self.cleared:
            return f"{span}, cleared since"
        if self.step == 0:
            return "at init"
        return f"since {self.since}" if self.since is not None else f"{self.step}"


@dataclass(frozen=True)
class Found:
    """What a rule found: the records it read, the step it judged and the layers it names (name -> value)."""

    records: Records
    step: int
    hits: dict[str, float]


Text = str | Callable[[Found], str]
Flag = Callable[[Records, int, float], dict[str, float]]


def steps_of(record: Record | None, n: int = PERSIST) -> list[int]:
    """The latest ``n`` steps of ``record`` (the rules look no further back)."""
    return [] if record is None else record.recent_steps(n)


def persistent(
    record: Record | None,
    flag: Callable[[int], dict[str, float]],
    hold: int = PERSIST,
    at_once: Callable[[int], dict[str, float]] | None = None,
) -> tuple[int | None, dict[str, float]]:
    """The latest step and the layers ``flag`` flags at each of the last ``hold`` logged steps, or those
    ``at_once`` flags at the latest step alone (a signal so far past its line that one logging step is enough)."""
    steps = steps_of(record, hold)
    if at_once is not None and steps and (now := at_once(steps[-1])):
        return steps[-1], now
    if len(steps) < hold:
        return None, {}
    flagged = [flag(step) for step in steps]
    common = set.intersection(*(set(f) for f in flagged))
    return steps[-1], {name: flagged[-1][name] for name in flagged[-1] if name in common}


@dataclass(frozen=True)
class Rule:
    """One rule of the health report, declared.

    Args:
        id: its stable identity, the identity of its verdicts (``"lr.adam_shrink"``); never reworded.
        check: the verdict's name as users read it (several rules may share one: "learning rate too high").
        reads: the record kinds it reads; it judges the logged steps of the first.
        when: ``"init"``, ``"training"`` or ``"now"`` (the module's docstring).
        line: the value its signal is compared with; ``above``: whether values above it are the bad ones.
        healthy, cause, advice: the verdict's texts, each a string or a function of what was :class:`Found`.
        signal: the one number per step the line is compared with (a median over the weights, the largest
            attention logit, ...), None where it cannot be read; the diagnosis suite's scorer reads it.
        signal_name: the signal's name in the scorer's evidence table.
        flag: name -> value of what is past ``line`` at a step (given the line: the ``at_once`` line uses it
            too); by default ``{over: signal}`` where the signal is past the line.
        over: the name a verdict from the signal alone gives (``"median of the weights"``).
        at_once: the line past which one logging step is enough (``"training"`` rules).
        named: the layers a verdict names, from what was flagged (default: those flagged).
        badness: orders the layers named, worst first (default: by the line's direction).
        severity: ``"warning"`` or ``"fatal"``.
        held_under_scaler: a ``"now"`` rule held over :data:`PERSIST` steps while a loss scale is logged.
        yields_to: silent where one of these rules spoke before it (ids, or :data:`AT_INIT`).
        constant, at_once_constant: the names of its lines in the code (the evidence table's rows).
        section: where its calibration is told, ``docs/diagnosis.md#<section>``.
    """

    id: str
    check: str
    reads: tuple[str, ...]
    when: Literal["init", "training", "now"]
    line: float
    above: bool
    healthy: Text
    cause: Text
    advice: Text
    signal: Callable[[Records, int], float | None] | None = None
    signal_name: str = ""
    flag: Flag | None = None
    over: str = "median of the weights"
    at_once: float | None = None
    named: Callable[[Found], dict[str, float]] | None = None
    badness: Callable[[float], float] | None = None
    severity: Literal["warning", "fatal"] = "warning"
    held_under_scaler: bool = False
    yields_to: tuple[str, ...] = ()
    constant: str = ""
    at_once_constant: str = ""
    section: str = ""

    def __post_init__(self) -> None:
        if self.when not in WHEN:
            raise ValueError(f"Expected `when` to be one of {WHEN}, got {self.when!r}")
        if self.severity not in ("warning", "fatal"):
            raise ValueError(f"Expected `severity` to be 'warning' or 'fatal', got {self.severity!r}")
        if self.flag is None and self.signal is None:
            raise ValueError(f"Expected rule {self.id!r} to have a `signal` or a `flag`, got neither")
        if not self.reads:
            raise ValueError(f"Expected rule {self.id!r} to read at least one record kind, got none")

    def past(self, value: float, line: float) -> bool:
        """Whether ``value`` is on the bad side of ``line``."""
        return value > line if self.above else value < line

    def flagged(self, records: Records, step: int, line: float) -> dict[str, float]:
        """What is past ``line`` at ``step``."""
        if self.flag is not None:
            return self.flag(records, step, line)
        value = self.signal(records, step)  # type: ignore[misc]
        return {self.over: value} if value is not None and self.past(value, line) else {}

    def judge(self, records: Records) -> list[Verdict]:
        """One verdict over the layers that break the rule (none if none does), the worst first."""
        record = records.get(self.reads[0])
        if self.when == "init":
            step, hits = 0, self.flagged(records, 0, self.line)
        else:
            hold = PERSIST if self.when == "training" or (self.held_under_scaler and _scaled(records)) else 1
            at_once = self.at_once

            def once(s: int) -> dict[str, float]:
                return self.flagged(records, s, at_once)  # type: ignore[arg-type]

            found_at, hits = persistent(
                record, lambda s: self.flagged(records, s, self.line), hold, None if at_once is None else once
            )
            step = -1 if found_at is None else found_at
        if hits and self.named is not None:
            hits = self.named(Found(records, step, hits))
        if not hits:
            return []
        badness = self.badness or ((lambda v: v) if self.above else (lambda v: -v))
        ranked = sorted(hits.items(), key=lambda item: -badness(item[1]))
        worst = tuple(ranked[:WORST])
        more = f" and {len(hits) - WORST} more" if len(hits) > WORST else ""
        found = Found(records, step, hits)
        return [Verdict(
            self.severity, self.check, ", ".join(name for name, _ in worst) + more, worst[0][1], _text(self.healthy,
            found), _text(self.cause, found), _text(self.advice, found), len(hits), worst, step, rule=self.id,
        )]  # fmt: skip


def _text(text: Text, found: Found) -> str:
    return text if isinstance(text, str) else text(found)


def _scaled(records: Records) -> bool:
    """Whether a loss scaler ran (its scale is logged at the gradients' latest step)."""
    grad_data = records.get("grad_data")
    steps = steps_of(grad_data)
    return grad_data is not None and bool(steps) and grad_data.value("loss_scale", steps[-1]) is not None


def positive(values: Mapping[str, float]) -> dict[str, float]:
    return {name: v for name, v in values.items() if v > 0}


def at(record: Record | None, metric: str, step: int) -> dict[str, float]:
    """name -> value of every layer's ``metric`` at ``step``."""
    return {} if record is None else record.at(metric, step)


def at_init(record: Record | None, metric: str) -> dict[str, float]:
    """name -> value of every layer's ``metric`` at step 0 (the network at initialisation), if recorded."""
    return {} if record is None else record.at_init(metric)


def nearest_step(record: Record | None, step: int) -> int:
    """``record``'s latest logged step up to ``step`` (the meters log the same steps, at moments apart)."""
    return max((s for s in steps_of(record) if s <= step), default=-1)


def median(values: Mapping[str, float]) -> float | None:
    """The median of ``values``, None where there are none."""
    return statistics.median(values.values()) if values else None
