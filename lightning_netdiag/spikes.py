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

__all__ = [
    "BAND", "FLOOR", "LEFT", "LOOKBACK", "MIN_BAND", "REFRESH", "SPIKE", "WEIGHT_SPIKE", "band", "band_scores",
    "began", "decades", "over",
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
