"""The health report: the lecture's rules of thumb, evaluated on what the callbacks recorded.

Each rule reads the latest recorded step (the update:data rules, the median of the latest points) and
returns a :class:`Verdict` per layer that breaks it. The thresholds are the lecture's where it gives
one (saturation below 5 %, updates near 1e-3) and stated plainly where it does not.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

SATURATED_PCT = 5.0  # the lecture: a few percent of saturated tanh units is fine
DEAD_STD = 0.05  # a layer whose outputs barely move from 0 passes almost no signal
GRAD_SPREAD = 10.0  # first vs last layer activation-gradient std, and a layer's grad:data vs the median
UPDATE_BAND = 1.0  # decades around the update:data target
UPDATE_DRIFT = 1.5  # decades between the highest and lowest layer's update:data
UPDATE_WINDOW = 10  # latest points whose median is judged


@dataclass(frozen=True)
class Verdict:
    """One broken rule. ``severity`` is ``"fatal"`` (training cannot recover) or ``"warning"``."""

    severity: str
    check: str
    layer: str
    value: float
    healthy: str
    cause: str
    advice: str


def _latest(callback: Any, metric: str) -> dict[str, float]:
    """name -> value at the callback's latest step, for every name of ``metric``."""
    if callback is None or callback.history.last_step is None:
        return {}
    history, head = callback.history, f"{callback.prefix}/{metric}/"
    out = {}
    for tag in history:  # keys only: a check runs at every logging step, it must not copy whole series
        if tag.startswith(head):
            (step, value), *_ = history.tail(tag, 1)
            if step == history.last_step:
                out[tag[len(head) :]] = value
    return out


def _nonfinite(callbacks: Iterable[Any]) -> list[Verdict]:
    out = []
    for cb in callbacks:
        for metric in ("act_nonfinite", "act_grad_nonfinite", "grad_nonfinite"):
            for name, count in _latest(cb, metric).items():
                if count > 0:
                    out.append(
                        Verdict(
                            "fatal",
                            f"non-finite ({metric.removesuffix('_nonfinite')})",
                            name,
                            count,
                            "0",
                            "NaN/Inf values: the loss or the weights have diverged, or a log(0) / 0 upstream",
                            "lower the learning rate, clip gradients, check the loss for log(0); "
                            "under fp16 use a GradScaler",
                        )
                    )
    return out


def _activations(saturation: Any) -> list[Verdict]:
    out = []
    for name, pct in _latest(saturation, "act_saturated_pct").items():
        if pct > SATURATED_PCT:
            out.append(
                Verdict(
                    "warning",
                    "saturation",
                    name,
                    pct,
                    f"< {SATURATED_PCT:g} %",
                    "pre-activations too large: the init scale is too big, or no normalization",
                    "init the weights before it with gain/sqrt(fan_in) (5/3 for tanh), "
                    "or add BatchNorm/LayerNorm before the nonlinearity",
                )
            )
    for name, std in _latest(saturation, "act_std").items():
        if std < DEAD_STD:
            out.append(
                Verdict(
                    "warning",
                    "dead layer",
                    name,
                    std,
                    f"std > {DEAD_STD:g}",
                    "activations all near 0: the weights before it are too small, or the gain is 0",
                    "use a larger init scale (gain/sqrt(fan_in))",
                )
            )
    for name, pct in _latest(saturation, "act_dead_pct").items():
        if pct > 0:
            out.append(
                Verdict(
                    "warning",
                    "dead units",
                    name,
                    pct,
                    "0 %",
                    "units saturated for every example: no gradient reaches their weights",
                    "reduce the init scale or add normalization; for ReLU, try a leaky variant",
                )
            )
    stds = _latest(saturation, "act_grad_std")
    if len(stds) >= 2:
        names = list(stds)
        first, last = stds[names[0]], stds[names[-1]]
        if last > 0 and first >= 0:
            ratio = first / last
            span = f"{names[0]} / {names[-1]}"
            if ratio < 1 / GRAD_SPREAD:
                out.append(
                    Verdict(
                        "warning",
                        "vanishing gradient",
                        span,
                        ratio,
                        f"{1 / GRAD_SPREAD:g} .. {GRAD_SPREAD:g}",
                        "the gradient shrinks toward the input: saturated or badly scaled layers",
                        "use gain/sqrt(fan_in) init, normalization, or residual connections",
                    )
                )
            elif ratio > GRAD_SPREAD:
                out.append(
                    Verdict(
                        "warning",
                        "exploding gradient",
                        span,
                        ratio,
                        f"{1 / GRAD_SPREAD:g} .. {GRAD_SPREAD:g}",
                        "the gradient grows toward the input: the weights are scaled too large",
                        "use gain/sqrt(fan_in) init, normalization, or gradient clipping",
                    )
                )
    return out


def _grad_data(grad_data: Any) -> list[Verdict]:
    ratios = {n: r for n, r in _latest(grad_data, "grad_data_ratio").items() if r > 0}
    if len(ratios) < 3:
        return []
    median = statistics.median(ratios.values())
    out = []
    for name, r in ratios.items():
        if not 1 / GRAD_SPREAD <= r / median <= GRAD_SPREAD:
            out.append(
                Verdict(
                    "warning",
                    "grad:data outlier",
                    name,
                    r,
                    f"within {GRAD_SPREAD:g}x of the median {median:.2e}",
                    f"this layer's gradient is {r / median:.3g}x the others' relative to its weights, "
                    "so it trains at another speed (often a layer scaled down or up at init)",
                    "check this layer's init scale; an optimizer like Adam evens this out",
                )
            )
    return out


def _updates(update: Any) -> list[Verdict]:
    if update is None:
        return []
    head, target = f"{update.prefix}/update_data_log10/", update.target
    medians = {
        tag[len(head) :]: statistics.median(v for _, v in update.history.tail(tag, UPDATE_WINDOW))
        for tag in update.history
        if tag.startswith(head) and not tag.endswith("/_target")
    }
    if not medians:
        return []
    overall = statistics.median(medians.values())
    factor = 10 ** (target - overall)  # update size is proportional to the learning rate
    advice = f"multiply the learning rate by about {factor:.2g} to bring the median ({overall:.2f}) to {target:g}"
    healthy = f"{target - UPDATE_BAND:g} .. {target + UPDATE_BAND:g}"
    out = []
    for name, m in medians.items():
        if m > target + UPDATE_BAND:
            out.append(
                Verdict(
                    "warning",
                    "update:data too high",
                    name,
                    m,
                    healthy,
                    "updates far larger than 1/1000 of the weights: the learning rate is too high, "
                    "training may be unstable or diverge",
                    advice,
                )
            )
        elif m < target - UPDATE_BAND:
            out.append(
                Verdict(
                    "warning",
                    "update:data too low",
                    name,
                    m,
                    healthy,
                    "updates far smaller than 1/1000 of the weights: the learning rate is too low, "
                    "this layer barely learns",
                    advice,
                )
            )
    spread = max(medians.values()) - min(medians.values())
    if len(medians) > 1 and spread > UPDATE_DRIFT:
        out.append(
            Verdict(
                "warning",
                "update:data drift",
                "all",
                spread,
                f"< {UPDATE_DRIFT:g} decades apart",
                "layers learn at very different speeds",
                "use a better init or add normalization",
            )
        )
    return out


def evaluate(saturation: Any = None, grad_data: Any = None, update: Any = None) -> list[Verdict]:
    """Every broken rule, fatal ones first. Takes the callbacks (or None for those not used)."""
    verdicts = [
        *_nonfinite(cb for cb in (saturation, grad_data) if cb is not None),
        *_activations(saturation),
        *_grad_data(grad_data),
        *_updates(update),
    ]
    return sorted(verdicts, key=lambda v: v.severity != "fatal")


def _value(v: Verdict) -> str:
    return f"{v.value:.4g}" if math.isfinite(v.value) else str(v.value)


def format_table(verdicts: list[Verdict], step: int | None = None) -> str:
    """A plain-text table: one row per verdict, its cause and advice on the lines below."""
    title = "netdiag health report" + (f" at step {step}" if step is not None else "")
    if not verdicts:
        return f"{title}: every check within its healthy range"
    rows = [("", "check", "layer", "value", "healthy")]
    rows += [(v.severity.upper(), v.check, v.layer, _value(v), v.healthy) for v in verdicts]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [title]
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i:
            v = verdicts[i - 1]
            lines += [f"{'':{widths[0]}}  cause: {v.cause}", f"{'':{widths[0]}}  try:   {v.advice}"]
    return "\n".join(lines)


COLUMNS = ["severity", "check", "layer", "value", "healthy", "likely cause", "try"]


def as_table(verdicts: list[Verdict]) -> tuple[list[str], list[list[Any]]]:
    """Column names and one row per verdict (W&B's table)."""
    return COLUMNS, [[v.severity, v.check, v.layer, v.value, v.healthy, v.cause, v.advice] for v in verdicts]


def format_markdown(verdicts: list[Verdict], step: int | None = None) -> str:
    """The same report as a markdown table (TensorBoard's text tab renders it)."""
    if not verdicts:
        return format_table(verdicts, step)
    head = f"| {' | '.join(COLUMNS)} |\n|{'---|' * len(COLUMNS)}\n"
    body = ""
    for v, row in zip(verdicts, as_table(verdicts)[1], strict=True):
        row[COLUMNS.index("value")] = _value(v)  # rounded for reading
        body += f"| {' | '.join(map(str, row))} |\n"
    return f"**netdiag health report{f' at step {step}' if step is not None else ''}**\n\n{head}{body}"
