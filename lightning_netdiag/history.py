"""Bounded series in memory: the store inside every record. Pure Python: no torch, no Lightning."""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from lightning_netdiag.stats import Histogram

__all__ = ["History", "finite_only"]

K = TypeVar("K", bound=Hashable)


class History(Mapping[K, list[tuple[int, float]]], Generic[K]):
    """Series of ``(step, value)`` by key, the latest ``max_points`` of each, and histograms by key,
    ``[(step, Histogram), ...]``, the latest ``max_histograms`` of each; keys in the order first added.

    A record keys it by ``(metric, name)``; used on its own, any hashable key will do.
    """

    def __init__(self, max_points: int, max_histograms: int = 256) -> None:
        self.max_points, self.max_histograms = max_points, max_histograms
        self._scalars: dict[K, deque[tuple[int, float]]] = {}
        self._histograms: dict[K, deque[tuple[int, Histogram]]] = {}
        self._steps: deque[int] = deque(maxlen=max_points)
        self.last_step: int | None = None  # the latest step anything was recorded at

    @property
    def steps(self) -> list[int]:
        """The steps recorded, oldest first (the latest ``max_points``)."""
        return list(self._steps)

    def steps_back(self) -> Iterator[int]:
        """The steps recorded, from the newest back, copying nothing."""
        return reversed(self._steps)

    @property
    def full(self) -> bool:
        """Whether ``max_points`` steps are held: from here on each new step may push out the oldest points."""
        return len(self._steps) == self.max_points

    def add(self, step: int, scalars: Mapping[K, float], histograms: Mapping[K, Histogram]) -> None:
        if step != self.last_step:
            self._steps.append(step)
        self.last_step = step
        for key, value in scalars.items():
            points = self._scalars.get(key)
            if points is None:
                points = self._scalars[key] = deque(maxlen=self.max_points)
            points.append((step, value))
        for key, hist in histograms.items():
            kept = self._histograms.get(key)
            if kept is None:
                kept = self._histograms[key] = deque(maxlen=self.max_histograms)
            kept.append((step, hist))

    @property
    def histograms(self) -> dict[K, list[tuple[int, Histogram]]]:
        return {key: list(points) for key, points in self._histograms.items()}

    def histogram_tags(self) -> list[K]:
        """The keys that have histograms, in the order first logged, without copying any."""
        return list(self._histograms)

    def histograms_of(self, key: K) -> list[tuple[int, Histogram]]:
        """One key's histograms, ``[(step, Histogram), ...]`` (empty if none), copying only those."""
        return list(self._histograms.get(key, ()))

    def __getitem__(self, key: K) -> list[tuple[int, float]]:
        return list(self._scalars[key])

    def tail(self, key: K, n: int) -> list[tuple[int, float]]:
        """The latest ``n`` points of ``key``, oldest first, without copying the whole series."""
        return list(itertools.islice(reversed(self._scalars[key]), n))[::-1]

    def head(self, key: K, n: int) -> list[tuple[int, float]]:
        """The first ``n`` points of ``key`` still held, without copying the whole series."""
        return list(itertools.islice(self._scalars[key], n))

    def latest(self, key: K) -> Iterator[tuple[int, float]]:
        """The points of ``key`` from the newest back, copying nothing."""
        return reversed(self._scalars[key])

    def __iter__(self) -> Iterator[K]:
        return iter(self._scalars)

    def __contains__(self, key: object) -> bool:
        return key in self._scalars

    def __len__(self) -> int:
        return len(self._scalars)

    def state_dict(self, name: Callable[[K], str] = str) -> dict[str, Any]:
        """Plain lists, dicts, ints, floats and strings, each key written as ``name(key)``: loadable with
        ``torch.load(weights_only=True)``."""
        return {
            "scalars": {name(key): [list(p) for p in points] for key, points in self._scalars.items()},
            "histograms": {
                name(key): [[step, list(h.edges), list(h.counts)] for step, h in points]
                for key, points in self._histograms.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any], key: Callable[[str], K] = lambda k: k) -> None:  # type: ignore[assignment,return-value]
        """The inverse of :meth:`state_dict`, each key read back as ``key(written)``."""
        self.restore(
            ((key(k), ((int(s), float(v)) for s, v in points)) for k, points in state["scalars"].items()),
            (
                (key(k), ((int(s), Histogram(tuple(e), tuple(c))) for s, e, c in points))
                for k, points in state["histograms"].items()
            ),
        )

    def restore(
        self,
        scalars: Iterable[tuple[K, Iterable[tuple[int, float]]]],
        histograms: Iterable[tuple[K, Iterable[tuple[int, Histogram]]]],
        steps: Iterable[int] | None = None,
    ) -> None:
        """Replace everything held; ``steps`` None: the steps of the scalars."""
        self._scalars = {key: deque(points, maxlen=self.max_points) for key, points in scalars}
        self._histograms = {key: deque(points, maxlen=self.max_histograms) for key, points in histograms}
        if steps is None:
            steps = sorted({s for points in self._scalars.values() for s, _ in points})
        self._steps = deque(steps, maxlen=self.max_points)
        self.last_step = self._steps[-1] if self._steps else None


def finite_only(scalars: Mapping[K, float]) -> dict[K, float]:
    """Undefined values (a std of one element, a ratio over zero) are left out, never logged as NaN."""
    return {key: value for key, value in scalars.items() if math.isfinite(value)}
