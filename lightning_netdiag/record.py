"""What one diagnostic measured: the record that the meters fill and every sink, reader and view takes.

A record is of one ``kind`` (one diagnostic): series of ``(step, value)`` keyed by metric and layer (or weight)
name, histograms likewise, and a description of what was watched (each layer's activation kind and family,
each weight's class and shape, the optimizer's family, D4's target, the cadence). The meters fill it while
training runs; :mod:`lightning_netdiag.logs` rebuilds the same record from a finished run's logs, and
:meth:`Record.from_json` from its JSON form; the report, the plots and ``netdiag compare`` read nothing else.

A new kind of measurement is a new subclass here, registered in :data:`KINDS`, with its metrics in
:data:`lightning_netdiag.tags.METRICS`. Pure Python: no torch, no Lightning.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lightning_netdiag import tags
from lightning_netdiag.flight.events import Event
from lightning_netdiag.history import History
from lightning_netdiag.stats import DEFAULT_THRESHOLD, HIST_SAMPLE, Histogram

__all__ = [
    "DEFAULT_TARGET", "KINDS", "RECORD_VERSION", "ActivationRecord", "FlightRecord", "GradDataRecord", "Key",
    "LogitRecord", "OptimizerRecord", "ParameterRecord", "Record", "RecordVersionError", "Tagged", "UpdateRecord",
]  # fmt: skip

#: The version of a record's description and JSON form. 1: netdiag 0.1.0's logs (no version, no cadence).
RECORD_VERSION = 2
#: The lecture's rule of thumb for D4: updates about 1/1000 of the data.
DEFAULT_TARGET = -3.0

Key = tuple[str, str]  # (metric, name); name "" for a value per step


class RecordVersionError(ValueError):
    """A record written by a newer netdiag than this one: reading it could give a wrong report."""


@dataclass(eq=False)
class Record:
    """Base of the records: the series, the tag prefix and the cadence. Not for use on its own.

    Args:
        prefix: the first part of every logged tag (never part of a key here).
        every_n_steps: the cadence: steps ``0, n, 2n, ...`` are measured (None: not known yet).
        history_size: the points kept per series (histograms: at most 256 per series).
        described: False where the record was read from logs that hold no description of it.
    """

    prefix: str = "netdiag"
    every_n_steps: int | None = None
    history_size: int = field(default=10_000, repr=False)
    described: bool = field(default=True, repr=False)

    kind: ClassVar[str] = ""
    #: the description's fields, JSON-able (sets as sorted lists, tuples as lists), besides kind and version
    _described: ClassVar[tuple[str, ...]] = ("prefix", "every_n_steps")
    #: what a field described later than the first logs means where a description lacks it
    _absent: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        self.series: History[Key] = History(self.history_size)
        self.tagged = Tagged(self)
        # what the report asks at every step, kept until the series change (the report replays every step)
        self._names: dict[str, list[str]] | None = None  # metric -> its layers, in the order first recorded
        self._init: dict[str, dict[str, float]] = {}  # metric -> at_init(metric)

    def changed(self) -> None:
        """The series were replaced or got new keys: what is derived from them is derived again."""
        self._names, self._init = None, {}

    # --- filling ----------------------------------------------------------------------------------------

    def add(self, step: int, scalars: Mapping[Key, float], histograms: Mapping[Key, Histogram]) -> None:
        """One step's measurements (steps in increasing order; a step may be added to again)."""
        new = [k for k in scalars if k not in self.series]
        for metric, _ in (*new, *histograms):
            self._known(metric)
        if new or self.series.full:  # new layers; or the oldest points may go
            self.changed()
        self.series.add(step, scalars, histograms)

    def empty(self) -> Record:
        """A record with this one's description and no measurements (the report replays steps into it)."""
        return dataclasses.replace(self)

    # --- reading ----------------------------------------------------------------------------------------

    @property
    def steps(self) -> list[int]:
        """The steps recorded, oldest first."""
        return self.series.steps

    @property
    def last_step(self) -> int | None:
        return self.series.last_step

    def recent_steps(self, n: int) -> list[int]:
        """The latest ``n`` steps recorded, oldest first (the rules read a few at every step: no full copy)."""
        return list(itertools.islice(self.series.steps_back(), n))[::-1]

    def _known(self, metric: str) -> str:
        """``metric``, if it is one of this kind's (``tags.METRICS``): a misspelt name fails, never reads as empty."""
        if tags.KIND_OF.get(metric) != self.kind:
            raise ValueError(f"Expected a metric of {self.kind!r} (tags.METRICS), got {metric!r}")
        return metric

    def names(self, metric: str) -> list[str]:
        """The layers (weights) with a ``metric`` series, in the order first recorded (depth order); not
        D4's target line."""
        self._known(metric)
        if self._names is None:
            self._names = {}
            for m, n in self.series:
                if n != tags.TARGET:
                    self._names.setdefault(m, []).append(n)
        return self._names.get(metric, [])

    def points(self, metric: str, name: str = "") -> list[tuple[int, float]]:
        """The series of ``metric`` for ``name`` (empty if none)."""
        key = (self._known(metric), name)
        return self.series[key] if key in self.series else []

    def value(self, metric: str, step: int, name: str = "") -> float | None:
        """The value of ``metric`` for ``name`` at ``step``, if recorded."""
        key = (self._known(metric), name)
        if key not in self.series:
            return None
        for s, v in self.series.latest(key):
            if s <= step:
                return v if s == step else None
        return None

    def at(self, metric: str, step: int) -> dict[str, float]:
        """name -> value of every layer's ``metric`` at ``step`` (those recorded there)."""
        out = {}
        for name in self.names(metric):
            for s, v in self.series.latest((metric, name)):
                if s <= step:
                    if s == step:
                        out[name] = v
                    break
        return out

    def first(self, metric: str, n: int) -> dict[str, list[tuple[int, float]]]:
        """name -> the first ``n`` points of every layer's ``metric`` still held."""
        return {name: self.series.head((metric, name), n) for name in self.names(metric)}

    def at_init(self, metric: str) -> dict[str, float]:
        """name -> value of every layer's ``metric`` at step 0 (the network at initialisation), if recorded."""
        if metric not in self._init:
            self._init[metric] = {n: points[0][1] for n, points in self.first(metric, 1).items() if points[0][0] == 0}
        return dict(self._init[metric])

    def init_value(self, metric: str) -> float | None:
        """The step-level ``metric`` at step 0, if recorded."""
        return self.value(metric, 0)

    def histogram_names(self, metric: str) -> list[str]:
        """The layers with ``metric`` histograms, in the order first recorded."""
        self._known(metric)
        return [n for m, n in self.series.histogram_tags() if m == metric]

    def histograms_of(self, metric: str, name: str) -> list[tuple[int, Histogram]]:
        return self.series.histograms_of((self._known(metric), name))

    def has_histograms(self) -> bool:
        return bool(self.series.histogram_tags())

    # --- the description, and the JSON form ----------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """What views need besides the numbers, as JSON-able values: logged beside the numbers, so that a
        finished run's logs carry it (``tags.meta_tag``, ``tags.meta_file``)."""
        out: dict[str, Any] = {"kind": self.kind, "version": RECORD_VERSION}
        for name in self._described:
            value = getattr(self, name)
            if isinstance(value, set):
                value = sorted(value)
            elif isinstance(value, dict):
                value = {k: list(v) if isinstance(v, tuple) else v for k, v in value.items()}
            elif isinstance(value, list):  # a copy: the record's own list may grow after this description is sent
                value = copy.deepcopy(value)
            out[name] = value
        return out

    def load_description(self, meta: Mapping[str, Any]) -> None:
        """Take a description written by :meth:`describe`, of this or an earlier version.

        Raises:
            RecordVersionError: if it was written by a newer version of netdiag.
        """
        version = int(meta.get("version", 1))
        if version > RECORD_VERSION:
            raise RecordVersionError(
                f"a {self.kind} record of version {version}, written by a newer lightning-netdiag; this one reads "
                f"up to version {RECORD_VERSION}: upgrade lightning-netdiag (pip install -U lightning-netdiag)"
            )
        meta = {**self._absent, **meta}
        for name in self._described:
            if name in meta:
                current = getattr(self, name)
                value = meta[name]
                if isinstance(current, set):
                    value = set(value)
                setattr(self, name, value)
        self.described = True

    def to_json(self, later: Iterable[tuple[int, Mapping[Key, float]]] = ()) -> dict[str, Any]:
        """The whole record as JSON-able values; :meth:`from_json` gives it back unchanged. ``later``: the scalars
        of steps after the last, written as if added (the record itself stays as it is)."""
        later = list(later)
        more: dict[Key, list[list[Any]]] = {}
        for step, scalars in later:
            for key, value in scalars.items():
                more.setdefault(key, []).append([step, value])
        keys = [*self.series, *(key for key in more if key not in self.series)]
        return {
            **self.describe(),
            "described": self.described,
            "history_size": self.history_size,
            "steps": [*self.steps, *(step for step, _ in later)],
            "scalars": [
                [m, n, [list(p) for p in (self.series[m, n] if (m, n) in self.series else ())] + more.get((m, n), [])]
                for m, n in keys
            ],
            "histograms": [
                [m, n, [[s, list(h.edges), list(h.counts)] for s, h in self.series.histograms_of((m, n))]]
                for m, n in self.series.histogram_tags()
            ],
        }

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Record:
        """The record :meth:`to_json` wrote.

        Raises:
            RecordVersionError: if it was written by a newer version of netdiag.
            ValueError: if its kind is unknown.
        """
        if data.get("kind") not in KINDS:
            raise ValueError(f"Expected a record of a kind in {sorted(KINDS)}, got {data.get('kind')!r}")
        record = KINDS[data["kind"]](history_size=data["history_size"])
        record.load_description(data)
        record.described = data["described"]
        record.changed()
        record.series.restore(
            (((m, n), (tuple(p) for p in points)) for m, n, points in data["scalars"]),
            (
                ((m, n), ((s, Histogram(tuple(e), tuple(c))) for s, e, c in points))
                for m, n, points in data["histograms"]
            ),
            data["steps"],
        )
        return record


@dataclass(eq=False)
class ActivationRecord(Record):
    """D1 and D2: per watched activation layer (a module's call, or a functional call)."""

    threshold: float = DEFAULT_THRESHOLD  # of the smoothly bounded kinds' flat region
    layer_types: dict[str, str] = field(default_factory=dict)  # its class name ("function" for a call)
    layer_kinds: dict[str, str] = field(default_factory=dict)  # its activation kind ("tanh", "gelu", ...)
    layer_families: dict[str, str | None] = field(default_factory=dict)  # its family, for the report's rules
    layer_regions: dict[str, str] = field(default_factory=dict)  # where it is flat, in words ("" if unknown)
    layers_in_loop: set[str] = field(default_factory=set)  # made in a module run several times per forward
    # the values it made at the first step measured (every layer saw the same batches): its size, for comparisons
    layer_sizes: dict[str, float] = field(default_factory=dict)
    histogram_sample: int | None = HIST_SAMPLE  # see GradDataRecord

    kind: ClassVar[str] = "saturation"
    _described = (*Record._described, "threshold", "layer_types", "layer_kinds", "layer_families", "layer_regions",
                  "layers_in_loop", "layer_sizes", "histogram_sample")  # fmt: skip
    _absent = {"histogram_sample": None}  # written before histograms were sampled: every value counted

    def family(self, name: str) -> str | None:
        """A layer's activation family (``activations.FAMILIES``), None where unknown."""
        return self.layer_families.get(name)


@dataclass(eq=False)
class ParameterRecord(Record):
    """Base of the records of weights (D3, D4)."""

    param_classes: dict[str, str] = field(default_factory=dict)  # "matrix", "conv kernel", "embedding", ...
    param_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    _described = (*Record._described, "param_classes", "param_shapes")

    def load_description(self, meta: Mapping[str, Any]) -> None:
        super().load_description(meta)
        self.param_shapes = {name: tuple(shape) for name, shape in self.param_shapes.items()}


@dataclass(eq=False)
class GradDataRecord(ParameterRecord):
    """D3: per watched weight, its gradient's statistics and grad:data."""

    #: a histogram counts every value of a tensor of up to this many, and a fixed sample of about this many of a
    #: larger one (``stats.sample_stride``); None: every value (logs written before histograms were sampled)
    histogram_sample: int | None = HIST_SAMPLE

    kind: ClassVar[str] = "grad_data"
    _described = (*ParameterRecord._described, "histogram_sample")
    _absent = {"histogram_sample": None}  # written before histograms were sampled: every value counted

    def init_std(self) -> dict[str, float]:
        """name -> the weight's std at step 0 (its init scale): its gradient's std over grad:data."""
        ratios = self.at_init("grad_data_ratio")
        return {n: g / ratios[n] for n, g in self.at_init("grad_std").items() if ratios.get(n, 0) > 0}


@dataclass(eq=False)
class UpdateRecord(ParameterRecord):
    """D4: per watched weight, update:data; the learning rate and the optimizer's family."""

    target: float = DEFAULT_TARGET  # the reference line, log10
    optimizer_family: str | None = None  # "sgd", "adam" or None (see meters.optimizer_family)

    kind: ClassVar[str] = "update"
    _described = (*ParameterRecord._described, "target", "optimizer_family")


@dataclass(eq=False)
class OptimizerRecord(ParameterRecord):
    """The Adam family's state, per watched weight: the normalised step ``m / (sqrt(v) + eps)`` (bias-corrected)
    and how much of the weight has ``sqrt(v)`` below eps (where eps, not the gradient, sets the step)."""

    optimizer_family: str | None = None  # as UpdateRecord's
    eps: float | None = None  # the main parameter group's

    kind: ClassVar[str] = "optimizer"
    _described = (*ParameterRecord._described, "optimizer_family", "eps")


@dataclass(eq=False)
class LogitRecord(Record):
    """The logits that softmaxes see: per attention call (named by the module that made it) its largest logit
    and the RMS of its q and k; the model's output (its classifier or LM head): its mean log Z and its largest
    logit. Besides the numbers: how each attention ran, which have q/k normalisation, which attention modules
    ran in a kernel that could not be watched."""

    attention_kinds: dict[str, str] = field(default_factory=dict)  # "eager" or "fused"
    qk_norm: set[str] = field(default_factory=set)  # the attention calls whose module normalises q and k
    unwatched: set[str] = field(default_factory=set)  # attention modules that made no call seen (a custom kernel)
    output: str | None = None  # the module that made the output

    kind: ClassVar[str] = "logits"
    _described = (*Record._described, "attention_kinds", "qk_norm", "unwatched", "output")


@dataclass(eq=False)
class FlightRecord(ParameterRecord):
    """The flight recorder: at every step the loss, each watched weight's gradient, update and weight norms (and
    their totals), kept for the last ``window`` steps and written out when the run spikes or dies; the events it
    saw (``events``: each one's step, its cause, the series that left their band first and by how many steps they
    led). Its series are every step's, not the cadence's."""

    window: int = 256
    events: list[Event] = field(default_factory=list)

    kind: ClassVar[str] = "flight"
    _described = (*ParameterRecord._described, "window", "events")


#: kind -> its record class
KINDS: dict[str, type[Record]] = {
    cls.kind: cls
    for cls in (ActivationRecord, GradDataRecord, UpdateRecord, LogitRecord, OptimizerRecord, FlightRecord)
}


class Tagged(Mapping[str, list[tuple[int, float]]]):
    """A record's series by the tags they are logged under: ``callback.history``, ``tag -> [(step, value)]``,
    and the form checkpoints keep."""

    def __init__(self, record: Record) -> None:
        self.record = record

    def _key(self, tag: str) -> Key:
        return tags.split(self.record.prefix, tag)

    def _tag(self, key: Key) -> str:
        return tags.tag(self.record.prefix, *key)

    def __getitem__(self, tag: str) -> list[tuple[int, float]]:
        return self.record.series[self._key(tag)]

    def __iter__(self) -> Iterator[str]:
        return map(self._tag, self.record.series)

    def __len__(self) -> int:
        return len(self.record.series)

    def __contains__(self, tag: object) -> bool:
        try:
            return self._key(str(tag)) in self.record.series
        except KeyError:
            return False

    @property
    def steps(self) -> list[int]:
        return self.record.steps

    @property
    def last_step(self) -> int | None:
        return self.record.last_step

    @property
    def histograms(self) -> dict[str, list[tuple[int, Histogram]]]:
        return {self._tag(key): points for key, points in self.record.series.histograms.items()}

    def histogram_tags(self) -> list[str]:
        return [self._tag(key) for key in self.record.series.histogram_tags()]

    def histograms_of(self, tag: str) -> list[tuple[int, Histogram]]:
        return self.record.series.histograms_of(self._key(tag))

    def tail(self, tag: str, n: int) -> list[tuple[int, float]]:
        return self.record.series.tail(self._key(tag), n)

    def head(self, tag: str, n: int) -> list[tuple[int, float]]:
        return self.record.series.head(self._key(tag), n)

    def add(self, step: int, scalars: Mapping[str, float], histograms: Mapping[str, Histogram]) -> None:
        """Measurements by tag, into the record."""
        self.record.add(
            step, {self._key(t): v for t, v in scalars.items()}, {self._key(t): h for t, h in histograms.items()}
        )

    def state_dict(self) -> dict[str, Any]:
        return self.record.series.state_dict(name=self._tag)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.record.series.load_state_dict(state, key=self._key)
        self.record.changed()
