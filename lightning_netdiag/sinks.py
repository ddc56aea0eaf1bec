"""Where measurements go: the in-memory history, and every logger attached to the Trainer."""

from __future__ import annotations

import itertools
import math
import re
import weakref
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from lightning_netdiag.stats import Histogram

#: Quantiles logged in place of a histogram for loggers that have none (CSV, MLflow, ...).
FALLBACK_QUANTILES = (0.05, 0.5, 0.95)


class History(Mapping[str, list[tuple[int, float]]]):
    """What a callback logged, kept in memory so that plots and reports need no logger.

    A mapping ``tag -> [(step, value), ...]`` holding the latest ``max_points`` points of each tag; the
    histograms are in :attr:`histograms`, ``tag -> [(step, Histogram), ...]``, the latest
    ``max_histograms`` of each.
    """

    def __init__(self, max_points: int, max_histograms: int = 256) -> None:
        self.max_points, self.max_histograms = max_points, max_histograms
        self._scalars: dict[str, deque[tuple[int, float]]] = {}
        self._histograms: dict[str, deque[tuple[int, Histogram]]] = {}
        self.last_step: int | None = None  # the latest step anything was recorded at

    def add(self, step: int, scalars: Mapping[str, float], histograms: Mapping[str, Histogram]) -> None:
        self.last_step = step
        for tag, value in scalars.items():
            self._scalars.setdefault(tag, deque(maxlen=self.max_points)).append((step, value))
        for tag, hist in histograms.items():
            self._histograms.setdefault(tag, deque(maxlen=self.max_histograms)).append((step, hist))

    @property
    def histograms(self) -> dict[str, list[tuple[int, Histogram]]]:
        return {tag: list(points) for tag, points in self._histograms.items()}

    def __getitem__(self, tag: str) -> list[tuple[int, float]]:
        return list(self._scalars[tag])

    def tail(self, tag: str, n: int) -> list[tuple[int, float]]:
        """The latest ``n`` points of ``tag``, oldest first, without copying the whole series."""
        points = self._scalars[tag]
        return list(itertools.islice(reversed(points), n))[::-1]

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
        steps = [p[0] for points in state["scalars"].values() for p in points]
        self.last_step = max(steps) if steps else None
        self._scalars = {
            tag: deque(((int(s), float(v)) for s, v in points), maxlen=self.max_points)
            for tag, points in state["scalars"].items()
        }
        self._histograms = {
            tag: deque(((int(s), Histogram(tuple(e), tuple(c))) for s, e, c in points), maxlen=self.max_histograms)
            for tag, points in state["histograms"].items()
        }


def histogram_writer(logger: object) -> Any | None:
    """The logger's TensorBoard ``SummaryWriter``-like experiment, or None if it has no raw histograms.

    Judged by what the experiment can do, not by class, so that the TensorBoard loggers of both
    ``lightning.pytorch`` and ``pytorch_lightning`` (different classes) are recognised alike.
    """
    experiment = getattr(logger, "experiment", None)
    return experiment if callable(getattr(experiment, "add_histogram_raw", None)) else None


class LoggerSink:
    """Sends one callback's measurements of one step to every logger, once each.

    Args:
        source: the callback's name, for warnings.
        prefix: the tag prefix, for the TensorBoard chart layout.
    """

    def __init__(self, source: str, prefix: str) -> None:
        self.source, self.prefix = source, prefix
        self._warned: set[str] = set()

    def emit(
        self,
        loggers: list[Any],
        step: int,
        scalars: Mapping[str, float],
        histograms: Mapping[str, Histogram],
        is_global_zero: bool,
    ) -> None:
        for logger in loggers:
            writer = histogram_writer(logger)
            metrics = dict(scalars)
            if writer is None and histograms:
                self._warn_no_histograms(logger)
                metrics.update(quantile_scalars(histograms))
            logger.log_metrics(metrics, step=step)
            if writer is not None and is_global_zero:
                write_tensorboard_layout(writer, self.prefix)
                for tag, hist in histograms.items():
                    write_histogram(writer, tag, hist, step)

    def _warn_no_histograms(self, logger: object) -> None:
        kind = type(logger).__name__
        if kind not in self._warned:
            self._warned.add(kind)
            rank_zero_warn(
                f"{self.source}: {kind} cannot hold histograms; logging the quantiles "
                f"{', '.join(_quantile_name(q) for q in FALLBACK_QUANTILES)} of each instead."
            )


def _quantile_name(q: float) -> str:
    return f"q{round(q * 100):02d}"


def quantile_scalars(histograms: Mapping[str, Histogram]) -> dict[str, float]:
    out = {}
    for tag, hist in histograms.items():
        for q, value in zip(FALLBACK_QUANTILES, hist.quantiles(FALLBACK_QUANTILES), strict=True):
            out[f"{tag}/{_quantile_name(q)}"] = value
    return out


def write_histogram(writer: Any, tag: str, hist: Histogram, step: int) -> None:
    """One small raw histogram record: only the bins from the first to the last non-empty one.

    Only finite values are ever counted, so TensorBoard never sees a NaN. ``min`` and ``max`` are the
    outer bounds of the non-empty bins (the exact ones are not kept).
    """
    used = [i for i, c in enumerate(hist.counts) if c > 0]
    if not used:
        return
    first, last = used[0], used[-1]
    bounds = hist.bounds
    counts = list(hist.counts[first : last + 1])
    mids = [(bounds[i] + bounds[i + 1]) / 2 for i in range(first, last + 1)]
    writer.add_histogram_raw(
        tag,
        min=bounds[first],
        max=bounds[last + 1],
        num=int(sum(counts)),
        sum=sum(c * m for c, m in zip(counts, mids, strict=True)),
        sum_squares=sum(c * m * m for c, m in zip(counts, mids, strict=True)),
        bucket_limits=bounds[first + 1 : last + 2],
        bucket_counts=counts,
        global_step=step,
    )


#: The charts of the TensorBoard "Custom Scalars" tab: one per diagnostic, one line per layer.
CHARTS = {
    "D1 activation saturated %": "act_saturated_pct",
    "D1 activation std": "act_std",
    "D1 dead units %": "act_dead_pct",
    "D2 activation-gradient std": "act_grad_std",
    "D3 grad:data ratio": "grad_data_ratio",
    "D4 update:data, log10 (line _target: the target)": "update_data_log10",
}

_layouts: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


def write_tensorboard_layout(writer: Any, prefix: str) -> None:
    """Write the custom-scalars layout once per writer (again only when a new prefix joins it)."""
    prefixes = _layouts.setdefault(writer, set())
    if prefix in prefixes:
        return
    prefixes.add(prefix)
    layout = {
        p: {title: ["Multiline", [f"{re.escape(p)}/{metric}/.*"]] for title, metric in CHARTS.items()}
        for p in sorted(prefixes)
    }
    writer.add_custom_scalars(layout)


def finite_only(scalars: Mapping[str, float]) -> dict[str, float]:
    """Undefined values (a std of one element, a ratio over zero) are left out, never logged as NaN."""
    return {tag: value for tag, value in scalars.items() if math.isfinite(value)}


def log_figure(loggers: list[Any], tag: str, figure: Any, step: int) -> None:
    """A matplotlib figure as an image, to every logger whose experiment takes figures (TensorBoard)."""
    for logger in loggers:
        add_figure = getattr(getattr(logger, "experiment", None), "add_figure", None)
        if callable(add_figure):
            add_figure(tag, figure, global_step=step, close=False)


def log_text(loggers: list[Any], tag: str, text: str, step: int) -> None:
    """Text (markdown), to every logger whose experiment takes text (TensorBoard)."""
    for logger in loggers:
        add_text = getattr(getattr(logger, "experiment", None), "add_text", None)
        if callable(add_text):
            add_text(tag, text, global_step=step)
