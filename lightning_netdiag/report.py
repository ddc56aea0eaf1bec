"""The health report: the lecture's rules of thumb, evaluated on what the callbacks recorded.

Each rule reads the latest recorded step (the update:data rules, the median of the latest points) and
returns one :class:`Verdict` naming how many layers break it and the worst few, not one line per layer: a
model of hundreds of layers gets a report that fits on a screen. The activation rules are calibrated per
family (``activations.FAMILIES``): half of a ReLU's outputs are 0 by design, a gate's Sigmoid sits near
0.5 by design, and neither is a saturated or dead tanh. The thresholds are the lecture's where it gives one
(tanh saturation below 5 %, updates near 1e-3) and stated plainly where it does not.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

#: % of values in the flat region above which a layer is flagged, per family. tanh: the lecture's; gates
#: (sigmoid): most of the gate stuck open or shut; ReLU-like: a mostly dead layer (half is normal); GELU-like,
#: judged on the input: for unit-variance inputs 0.1 % lie below -3.
SATURATED_PCT = {"tanh": 5.0, "sigmoid": 25.0, "relu": 90.0, "gelu": 10.0}
#: % of units saturated for every example of a step above which a layer is flagged (gates: none).
DEAD_UNITS_PCT = {"tanh": 0.0, "relu": 1.0, "gelu": 1.0}
DEAD_STD = 0.05  # a tanh-like layer whose outputs barely move from 0 passes almost no signal
GRAD_SPREAD = 10.0  # first vs last layer activation-gradient std, and a weight's grad:data vs its class's median
UPDATE_BAND = 1.0  # decades around the update:data target
UPDATE_DRIFT = 1.5  # decades between the highest and lowest layer's update:data
UPDATE_WINDOW = 10  # latest points whose median is judged
WORST = 3  # layers named per verdict

_FAMILY_NAMES = {"tanh": "tanh-like", "sigmoid": "gates (sigmoid-like)", "relu": "ReLU-like", "gelu": "GELU-like"}


@dataclass(frozen=True)
class Verdict:
    """One broken rule. ``severity`` is ``"fatal"`` (training cannot recover) or ``"warning"``.

    ``layer`` names the worst few layers that break it (and how many more), ``value`` is the worst layer's,
    ``hits`` the number of layers, ``worst`` the worst few as (name, value) pairs, worst first.
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


def _verdict(
    severity: str, check: str, hits: dict[str, float], badness: Callable[[float], float], healthy: str, cause: str,
    advice: str,
) -> list[Verdict]:  # fmt: skip
    """One verdict over the layers that break a rule (none if none does), the worst first."""
    if not hits:
        return []
    ranked = sorted(hits.items(), key=lambda item: -badness(item[1]))
    worst = tuple(ranked[:WORST])
    names = ", ".join(name for name, _ in worst) + (f" and {len(hits) - WORST} more" if len(hits) > WORST else "")
    return [Verdict(severity, check, names, worst[0][1], healthy, cause, advice, len(hits), worst)]


def _latest(callback: Any, metric: str) -> dict[str, float]:
    """name -> value at the callback's latest step, for every name of ``metric``, in the order logged."""
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


def _family(saturation: Any, name: str) -> str | None:
    """A layer's family; the lecture's (tanh) for a history without it (e.g. read back from elsewhere)."""
    families = getattr(saturation, "layer_families", {})
    return families[name] if name in families else "tanh"


def _nonfinite(callbacks: Iterable[Any]) -> list[Verdict]:
    out = []
    for cb in callbacks:
        for metric in ("act_nonfinite", "act_grad_nonfinite", "grad_nonfinite"):
            # In depth order, not by count: the first layer that goes non-finite is where to look.
            hits = {name: count for name, count in _latest(cb, metric).items() if count > 0}
            out += _verdict(
                "fatal",
                f"non-finite ({metric.removesuffix('_nonfinite')})",
                hits,
                lambda count: 0.0,  # all equal: the sort is stable, the depth order stays
                "0",
                "NaN/Inf values: the loss or the weights have diverged, or a log(0) / 0 upstream; the first "
                "layer named is the earliest affected",
                "lower the learning rate, clip gradients, check the loss for log(0); under fp16 use a GradScaler",
            )
    return out


def _by_family(saturation: Any, metric: str) -> dict[str | None, dict[str, float]]:
    out: dict[str | None, dict[str, float]] = {}
    for name, v in _latest(saturation, metric).items():
        out.setdefault(_family(saturation, name), {})[name] = v
    return out


_SATURATION_TEXT = {
    "tanh": (
        "pre-activations too large: the init scale is too big, or no normalization",
        "init the weights before it with gain/sqrt(fan_in) (5/3 for tanh), or add BatchNorm/LayerNorm before the "
        "nonlinearity",
    ),
    "sigmoid": (
        "the gate is stuck open or shut for most values: its input is too large",
        "scale down the weights that feed the gate, or normalize its input",
    ),
    "relu": (
        "almost every output is 0: the layer is mostly dead, often after too large a learning-rate step",
        "lower the learning rate; use a leaky variant; check the init and the bias before it",
    ),
    "gelu": (
        "many inputs lie in the flat negative tail: the pre-activations drifted negative or grew too large",
        "normalize before the nonlinearity (LayerNorm/BatchNorm) or lower the learning rate",
    ),
}


def _activations(saturation: Any) -> list[Verdict]:
    out = []
    out += _above_limit(
        saturation, "act_saturated_pct", SATURATED_PCT, "saturation", "< {limit:g} %", _SATURATION_TEXT.__getitem__
    )
    tanh_stds = _by_family(saturation, "act_std").get("tanh", {})
    out += _verdict(
        "warning",
        "dead layer",
        {n: v for n, v in tanh_stds.items() if v < DEAD_STD},
        lambda v: -v,
        f"tanh-like: std > {DEAD_STD:g}",
        "activations all near 0: the weights before it are too small, or the gain is 0",
        "use a larger init scale (gain/sqrt(fan_in))",
    )
    out += _above_limit(
        saturation, "act_dead_pct", DEAD_UNITS_PCT, "dead units", "<= {limit:g} %",
        lambda family: (
            "units saturated for every example: no gradient reaches their weights",
            "reduce the init scale or add normalization; for ReLU, lower the learning rate or try a leaky variant",
        ),
    )  # fmt: skip
    out += _gradient_flow(saturation)
    return out


def _above_limit(
    saturation: Any, metric: str, limits: dict[str, float], check: str, healthy: str,
    texts: Callable[[str], tuple[str, str]],
) -> list[Verdict]:  # fmt: skip
    """Per family with a limit, one verdict over the layers above it (``healthy`` formats the limit)."""
    out = []
    for family, values in _by_family(saturation, metric).items():
        if family in limits:
            limit = limits[family]
            out += _verdict(
                "warning", check, {n: v for n, v in values.items() if v > limit}, lambda v: v,
                f"{_FAMILY_NAMES[family]}: {healthy.format(limit=limit)}", *texts(family),
            )  # fmt: skip
    return out


def _gradient_flow(saturation: Any) -> list[Verdict]:
    """First vs last layer's activation-gradient std, within the family with the most layers: a gate's
    gradient is not comparable with a tanh's."""
    families = _by_family(saturation, "act_grad_std")
    if not families:
        return []
    stds = max(families.values(), key=len)
    if len(stds) < 2:
        return []
    names = list(stds)  # depth order: the order the layers were first logged in
    first, last = stds[names[0]], stds[names[-1]]
    if not (last > 0 and first >= 0):
        return []
    ratio, span = first / last, f"{names[0]} / {names[-1]}"
    healthy = f"{1 / GRAD_SPREAD:g} .. {GRAD_SPREAD:g}"
    if ratio < 1 / GRAD_SPREAD:
        return _verdict(
            "warning", "vanishing gradient", {span: ratio}, lambda v: v, healthy,
            "the gradient shrinks toward the input: saturated or badly scaled layers",
            "use gain/sqrt(fan_in) init, normalization, or residual connections",
        )  # fmt: skip
    if ratio > GRAD_SPREAD:
        return _verdict(
            "warning", "exploding gradient", {span: ratio}, lambda v: v, healthy,
            "the gradient grows toward the input: the weights are scaled too large",
            "use gain/sqrt(fan_in) init, normalization, or gradient clipping",
        )  # fmt: skip
    return []


def _grad_data(grad_data: Any) -> list[Verdict]:
    """A weight far from the median of comparable weights (matrices, conv kernels, embeddings apart)."""
    classes: dict[str, dict[str, float]] = {}
    for name, r in _latest(grad_data, "grad_data_ratio").items():
        if r > 0:
            classes.setdefault(getattr(grad_data, "param_classes", {}).get(name, "matrix"), {})[name] = r
    factors: dict[str, float] = {}
    for ratios in classes.values():
        if len(ratios) >= 3:
            median = statistics.median(ratios.values())
            factors.update(
                {n: r / median for n, r in ratios.items() if not 1 / GRAD_SPREAD <= r / median <= GRAD_SPREAD}
            )
    return _verdict(
        "warning",
        "grad:data outlier",
        factors,
        lambda f: abs(math.log10(f)),
        f"within {GRAD_SPREAD:g}x of the median of its kind (matrices, conv kernels, embeddings)",
        "these weights' gradients are far larger or smaller than comparable weights' relative to their size "
        "(value: the factor over the median), so they train at another speed, often from an init scaled down or up",
        "check these layers' init scale; an optimizer like Adam evens this out",
    )


def _lr_advice(medians: Iterable[float], target: float) -> str:
    """The learning-rate factor that brings these layers' median update:data to the target (updates scale
    with the learning rate): below 1 when they are too high, above 1 when too low."""
    median = statistics.median(medians)
    factor = 10 ** (target - median)
    verb = f"divide the learning rate by about {1 / factor:.2g}" if factor < 1 else f"multiply it by about {factor:.2g}"
    return f"{verb} to bring these layers' median ({median:.2f}) to {target:g}"


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
    healthy = f"{target - UPDATE_BAND:g} .. {target + UPDATE_BAND:g}"
    high = {n: m for n, m in medians.items() if m > target + UPDATE_BAND}
    low = {n: m for n, m in medians.items() if m < target - UPDATE_BAND}
    out = []
    if high:
        out += _verdict(
            "warning", "update:data too high", high, lambda m: m, healthy,
            "updates far larger than 1/1000 of the weights: the learning rate is too high, training may be unstable "
            "or diverge",
            _lr_advice(high.values(), target),
        )  # fmt: skip
    if low:
        out += _verdict(
            "warning", "update:data too low", low, lambda m: -m, healthy,
            "updates far smaller than 1/1000 of the weights: the learning rate is too low, these layers barely learn",
            _lr_advice(low.values(), target),
        )  # fmt: skip
    spread = max(medians.values()) - min(medians.values())
    if len(medians) > 1 and spread > UPDATE_DRIFT:
        out += _verdict(
            "warning", "update:data drift", {"all": spread}, lambda s: s, f"< {UPDATE_DRIFT:g} decades apart",
            "layers learn at very different speeds", "use a better init or add normalization",
        )  # fmt: skip
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


def _layers(v: Verdict) -> str:
    return v.layer if v.hits == 1 else f"{v.hits} layers: {v.layer}"


def format_table(verdicts: list[Verdict], step: int | None = None) -> str:
    """A plain-text table: one row per verdict, its cause and advice on the lines below."""
    title = "netdiag health report" + (f" at step {step}" if step is not None else "")
    if not verdicts:
        return f"{title}: every check within its healthy range"
    rows = [("", "check", "layer", "value", "healthy")]
    rows += [(v.severity.upper(), v.check, _layers(v), _value(v), v.healthy) for v in verdicts]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [title]
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i:
            v = verdicts[i - 1]
            lines += [f"{'':{widths[0]}}  cause: {v.cause}", f"{'':{widths[0]}}  try:   {v.advice}"]
    return "\n".join(lines)


COLUMNS = ["severity", "check", "layers", "worst", "value", "healthy", "likely cause", "try"]


def as_table(verdicts: list[Verdict]) -> tuple[list[str], list[list[Any]]]:
    """Column names and one row per verdict (W&B's table)."""
    return COLUMNS, [[v.severity, v.check, v.hits, v.layer, v.value, v.healthy, v.cause, v.advice] for v in verdicts]


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
