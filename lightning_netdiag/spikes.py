"""The flight recorder's formulas, pure torch: a series' band (its recent median and spread), a value's spike score
against it, and where a blow-up began (the series that left their band first).

Every series the recorder scores is a positive quantity (the loss, norms) and is scored in decades (log10), so
that a band means the same for a gradient norm of 1e-3 and one of 10. The constants were set on the flight suite
(``benchmarks/diagnosis``, ``FLIGHT``): the score of every healthy run stays below :data:`SPIKE` after the first
:data:`MIN_BAND` steps, and every injected blow-up passes it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_netdiag.origin import INPUTS

__all__ = [
    "BAND", "FLOOR", "LEFT", "LOOKBACK", "MIN_BAND", "REFRESH", "SPIKE", "STOPS", "WEIGHT_SPIKE", "band",
    "band_scores", "began", "decades", "over", "event_text", "named", "named_first", "stopped",
]  # fmt: skip

BAND = 64  # the steps before a value that make its band: a median that follows a drifting series
MIN_BAND = 50  # finite steps a band needs before it scores: training's first steps (and a warm-up) are a transient
REFRESH = 8  # steps between two computations of the bands while training runs (medians are the costly part)
_MAD_TO_STD = 1.4826  # the median absolute deviation of a normal, times this, is its standard deviation
FLOOR = 0.05  # decades (12 %): the least spread a band is given, so that a series that barely moves is not "spiking"
SPIKE = 7.0  # a loss or total-gradient score above this is an event (healthy runs: 6.0 at most)
WEIGHT_SPIKE = 12.0  # a weight's update or norm score above this is an event (healthy runs: 8 at most)
LEFT = 4.0  # a weight's series with a score above this has left its band (naming where an event began)
LOOKBACK = 16  # the steps before an event searched for where it began
# How a run stopped from outside ends (Ctrl-C; a scheduler's or launcher's SIGTERM, which Lightning raises as
# SIGTERMException): stopped, not broken.
STOPS = ("KeyboardInterrupt", "SIGTERM", "SIGTERMException")


def decades(values: Tensor) -> Tensor:
    """log10 of positive finite values; NaN elsewhere (0, negative, NaN, inf: not scored, never a band's part)."""
    return torch.log10(values).nan_to_num_(nan=math.nan, posinf=math.nan, neginf=math.nan)


def band(history: Tensor) -> tuple[Tensor, Tensor]:
    """Each column's band over ``history`` (rows: steps, in decades, NaN for no value): its median and its spread
    ``max(1.4826 * MAD, FLOOR)``; the spread NaN where the column has fewer than :data:`MIN_BAND` values (no score)."""
    median = history.nanmedian(dim=0).values
    spread = (history - median).abs().nanmedian(dim=0).values.mul(_MAD_TO_STD).clamp_min(FLOOR)
    enough = (~history.isnan()).sum(dim=0) >= MIN_BAND
    return median, torch.where(enough, spread, math.nan)


def band_scores(history: Tensor, row: Tensor) -> Tensor:
    """Each column's spike score of ``row`` against its band in ``history`` (:func:`band`): ``(row - median) /
    spread``; NaN where the band is too short, or ``row`` has no value."""
    if history.shape[0] == 0:
        return torch.full_like(row, math.nan)
    median, spread = band(history)
    return (row - median) / spread


def over(history: Tensor, levels: Tensor) -> Tensor:
    """Each column's raw value above which its score against ``history`` (raw values, rows: steps) passes its
    level in ``levels``: the inverse of :func:`band_scores`, ``10 ** (median + level * spread)``, NaN where the band
    is too short. While training runs one comparison a step against it tells what the score would (a positive
    infinite value is over; a NaN never is)."""
    median, spread = band(decades(history))
    return torch.pow(10.0, median + levels * spread)


def began(values: Tensor, event: int, priority: Sequence[int] | None = None) -> list[tuple[int, int, float]]:
    """Where the blow-up at row ``event`` of ``values`` (rows: steps in order, columns: series; raw values, not
    decades) began: ``(column, row, score)`` of each column that is out of its band at ``event`` (or at the row
    before it, where the event made it non-finite), with the first row of that stretch out of its band (at most
    :data:`LOOKBACK` rows back) and its score there; the earliest first, then (among those that left at the same
    row) the lowest ``priority`` of its column (a cause before its effects: a weight's change before the gradients
    it makes), then the highest score. A value that turns non-finite counts as out, with an infinite score."""
    logs = decades(values)
    nonfinite = ~torch.isfinite(values)
    first = max(event - LOOKBACK, 0)
    out = torch.zeros(event + 1 - first, values.shape[1], dtype=torch.bool)
    scores = torch.full(out.shape, math.nan, dtype=values.dtype)
    for i, t in enumerate(range(first, event + 1)):
        z = band_scores(logs[max(t - BAND, 0) : t], logs[t])
        scores[i] = torch.where(nonfinite[t], math.inf, z)
        out[i] = (z > LEFT) | nonfinite[t]
    found = []
    for column in range(values.shape[1]):
        ends = [i for i in (len(out) - 1, len(out) - 2) if i >= 0 and out[i, column]]
        if not ends:
            continue
        start = ends[0]
        while start > 0 and out[start - 1, column]:
            start -= 1
        found.append((column, first + start, float(scores[start, column])))
    rank = priority if priority is not None else [0] * values.shape[1]
    return sorted(found, key=lambda f: (f[1], rank[f[0]], -f[2]))


def named(event: dict) -> list[str]:
    """What an event names, first things first, each once: the module whose forward made its non-finite values
    (where the step was replayed, :mod:`lightning_netdiag.origin`), then the weights whose series left their band,
    the first to leave first."""
    made = (event.get("made") or {}).get("module")
    return list(dict.fromkeys([*([made] if made else []), *(b["name"] for b in event.get("began") or [])]))


def named_first(event: dict) -> str | None:
    """The first of :func:`named`; None if the event names nothing."""
    return next(iter(named(event)), None)


def _made_text(made: dict) -> str:
    if made.get("module"):
        return f"made in the forward of {made['module']} (the first module whose output was not finite)"
    if made.get("in") == INPUTS:
        return "the inputs of the step's forward were not finite"
    return "the step's forward, replayed, stayed finite: they were made in the backward"


def stopped(event: dict) -> bool:
    """Whether an event is the end of a run stopped from outside (:data:`STOPS`), as ``FlightMeter.crashed`` says it."""
    return event["cause"] == "exception" and event.get("error", "").split(":")[0] in STOPS


def event_text(event: dict) -> str:
    """A flight recorder's event (``FlightRecord.events``) in words: what happened at which step and, where known,
    the series that left their band first and by how many steps they led."""
    ended = event["cause"] == "exception"
    causes = " and ".join([event["cause"], *event.get("also", [])])
    step = event["step"]
    # an exception is recorded at the last step completed: it may have been raised in the next one
    how = "stopped" if stopped(event) else "ended"
    text = f"training {how} after step {step} ({event.get('error', '')})" if ended else f"{causes} at step {step}"
    if event.get("unread"):  # the device could not be read after the error: no window, no band
        return f"{text}: the device could not be read after it ({event['unread']}); the steps kept end at the last save"
    if event.get("made"):
        return f"{text}: {_made_text(event['made'])}"
    began = event.get("began") or []
    if began:
        first = began[0]
        lead = event["step"] - first["step"]
        since = f"step {first['step']}" + (" or before" if lead >= LOOKBACK else "")
        if ended:
            return f"{text}: out of its band at the end, first: {first['name']} (its {first['series']}, since {since})"
        what = "loss" if "loss" in causes else "total gradient norm" if "gradient" in causes else "event"
        led = f"{lead} step{'s' if lead != 1 else ''} before the {what}" if lead else "at that step"
        text += f": began in {first['name']} (its {first['series']} left its band at {since}, {led})"
    elif ended and "began" in event:  # the window was searched and nothing had left its band
        text += ": every watched series was within its band"
    return text
