"""What a diagnostic measured, kept in memory: the record the plots, the report and checkpoints read.

Pure Python: no torch, no Lightning. Every front end (Lightning callbacks, the plain loop, the Hugging Face
callback, the ``netdiag`` command reading finished runs' logs) fills one ``History`` per diagnostic.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any

from lightning_netdiag.stats import Histogram


class History(Mapping[str, list[tuple[int, float]]]):
    """What a meter measured, kept in memory so that plots and reports need no logger.

    A mapping ``tag -> [(step, value), ...]`` holding the latest ``max_points`` points of each tag; the
    histograms are in :attr:`histograms`, ``tag -> [(step, Histogram), ...]``, the latest
    ``max_histograms`` of each.
    """

    def __init__(self, max_points: int, max_histograms: int = 256) -> None:
        self.max_points, self.max_histograms = max_points, max_histograms
        self._scalars: dict[str, deque[tuple[int, float]]] = {}
        self._histograms: dict[str, deque[tuple[int, Histogram]]] = {}
        self._steps: deque[int] = deque(maxlen=max_points)
        self.last_step: int | None = None  # the latest step anything was recorded at

    @property
    def steps(self) -> list[int]:
        """The steps recorded, oldest first (the latest ``max_points``)."""
        return list(self._steps)

    def add(self, step: int, scalars: Mapping[str, float], histograms: Mapping[str, Histogram]) -> None:
        if step != self.last_step:
            self._steps.append(step)
        self.last_step = step
        for tag, value in scalars.items():
            self._scalars.setdefault(tag, deque(maxlen=self.max_points)).append((step, value))
        for tag, hist in histograms.items():
            self._histograms.setdefault(tag, deque(maxlen=self.max_histograms)).append((step, hist))

    @property
    def histograms(self) -> dict[str, list[tuple[int, Histogram]]]:
        return {tag: list(points) for tag, points in self._histograms.items()}

    def histogram_tags(self) -> list[str]:
        """The tags that have histograms, in the order first logged, without copying any."""
        return list(self._histograms)

    def histograms_of(self, tag: str) -> list[tuple[int, Histogram]]:
        """One tag's histograms, ``[(step, Histogram), ...]`` (empty if none), copying only those."""
        return list(self._histograms.get(tag, ()))

    def __getitem__(self, tag: str) -> list[tuple[int, float]]:
        return list(self._scalars[tag])

    def tail(self, tag: str, n: int) -> list[tuple[int, float]]:
        """The latest ``n`` points of ``tag``, oldest first, without copying the whole series."""
        points = self._scalars[tag]
        return list(itertools.islice(reversed(points), n))[::-1]

    def head(self, tag: str, n: int) -> list[tuple[int, float]]:
        """The first ``n`` points of ``tag`` still held, without copying the whole series."""
        return list(itertools.islice(self._scalars[tag], n))

    def __iter__(self) -> Iterator[str]:
        return iter(self._scalars)

    def __len__(self) -> int:
        return len(self._scalars)

    def state_dict(self) -> dict[str, Any]:
        """Plain lists, dicts, ints, floats and strings: loadable with ``torch.load(weights_only=True)``."""
        return {
            "scalars": {tag: [list(p) for p in points] for tag, points in self._scalars.items()},
            "histograms": {
                tag: [[step, list(h.edges), list(h.counts)] for step, h in points]
                for tag, points in self._histograms.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        steps = sorted({int(p[0]) for points in state["scalars"].values() for p in points})
        self._steps = deque(steps, maxlen=self.max_points)
        self.last_step = steps[-1] if steps else None
        self._scalars = {
            tag: deque(((int(s), float(v)) for s, v in points), maxlen=self.max_points)
            for tag, points in state["scalars"].items()
        }
        self._histograms = {
            tag: deque(((int(s), Histogram(tuple(e), tuple(c))) for s, e, c in points), maxlen=self.max_histograms)
            for tag, points in state["histograms"].items()
        }


def finite_only(scalars: Mapping[str, float]) -> dict[str, float]:
    """Undefined values (a std of one element, a ratio over zero) are left out, never logged as NaN."""
    return {tag: value for tag, value in scalars.items() if math.isfinite(value)}
