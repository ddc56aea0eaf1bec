"""Finished runs' logs read back into records: the inverse of :mod:`lightning_netdiag.sinks`.

Reads TensorBoard event files (scalars, histograms, and each record's description, logged once as JSON text)
or Lightning's CSV logs (``metrics.csv``: scalars, the histograms' quantiles, and the descriptions in JSON files
beside it), and the records written whole beside either (the flight recorder's window), with the conventions of
:mod:`lightning_netdiag.tags`. A run is a directory holding event files or a
``metrics.csv``; a directory above several runs (``lightning_logs/``) stands for all of them.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import statistics
import struct
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_netdiag import tags
from lightning_netdiag.record import KINDS, Key, Record, RecordVersionError
from lightning_netdiag.stats import Histogram

__all__ = [
    "LogError", "NoNetdiagTags", "RunLogs", "find_runs", "load_run", "load_runs", "read_csv_log", "read_records",
    "read_tensorboard",
]  # fmt: skip

LOSS = re.compile(r"(^|[/_])(train[/_])?loss($|_step$)")


class LogError(ValueError):
    """A log that cannot be read as a netdiag run; the message says which file and why."""


class NoNetdiagTags(LogError):
    """Logs that hold nothing netdiag wrote (another tool's run beside a netdiag one: the Hugging Face Trainer's
    own TensorBoard run)."""


@dataclass
class RunLogs:
    """One finished run: its records by kind, the other scalars it logged (the loss), and what its logs lack."""

    path: Path
    records: dict[str, Record]
    others: dict[str, dict[int, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.path)

    def record(self, kind: str) -> Any:
        """The record of ``kind`` (``"saturation"``, ``"grad_data"``, ``"update"``, ...), or None."""
        return self.records.get(kind)

    def by_kind(self) -> dict[str, Any]:
        """Every kind's record (None where the logs hold none): what the report and the plots take."""
        return {kind: self.records.get(kind) for kind in KINDS}

    def final_loss(self) -> tuple[str, float] | None:
        """The training loss's tag and the mean of its last 5 logged values, if a loss was logged; else the flight
        recorder's loss of the last 5 steps it kept (``flight_loss``: a plain loop's logs hold no loss of their own)."""
        found = sorted(t for t in self.others if LOSS.search(t) and not re.search(r"val|eval|test", t))
        if found:
            points = sorted(self.others[found[0]].items())
            return found[0], statistics.fmean(v for _, v in points[-5:])
        flight = self.records.get("flight")
        losses = [v for _, v in flight.points("flight_loss")[-5:] if math.isfinite(v)] if flight is not None else []
        return ("flight_loss", statistics.fmean(losses)) if losses else None

    def layers(self) -> set[str]:
        """Every watched layer and weight, by name."""
        watched = {"saturation": "act_std", "grad_data": "grad_std"}
        return {
            name
            for kind, metric in watched.items()
            if kind in self.records
            for name in self.records[kind].names(metric)
        }


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """The run directories at or under ``paths``, in order; a LogError for a path with none."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise LogError(f"{p}: no such file or directory")
        base = p if p.is_dir() else p.parent
        patterns = ("events.out.tfevents.*", "metrics.csv", tags.RECORD_FILES)
        found = sorted({f.parent for pattern in patterns for f in base.rglob(pattern)})
        if not found:
            raise LogError(f"{p}: no TensorBoard event file, metrics.csv or netdiag record under it: not a run's logs")
        runs += [r for r in found if r not in runs]
    return runs


def load_runs(paths: Iterable[str | Path]) -> tuple[list[RunLogs], list[Path]]:
    """The netdiag runs at or under ``paths`` (see :func:`find_runs`), and the runs found under a path that hold
    no netdiag tags, skipped (the Hugging Face Trainer writes its own run beside netdiag's). A path that is itself
    a run is read whole or fails; a LogError for a path with no netdiag run under it."""
    runs: list[RunLogs] = []
    skipped: list[Path] = []
    for p in map(Path, paths):
        found = find_runs([p])
        mine: list[RunLogs] = []
        for run in found:
            try:
                mine.append(load_run(run))
            except NoNetdiagTags:
                if run == p or len(found) == 1:
                    raise
                skipped.append(run)
        if not mine:
            raise NoNetdiagTags(f"{p}: none of the {len(found)} runs under it holds netdiag tags")
        seen = {r.path for r in runs}
        runs += [r for r in mine if r.path not in seen]
    return runs, skipped


def _tfrecords(path: Path) -> Iterable[bytes]:
    """The records of a TFRecord file (TensorBoard's event file): length, its CRC, data, the data's CRC."""
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
        if pos + 12 > len(data):
            raise LogError(f"{path}: truncated at byte {pos} of {len(data)} (a record's header is cut off)")
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        end = pos + 12 + length + 4
        if end > len(data):
            raise LogError(
                f"{path}: truncated at byte {len(data)}: a record of {length} bytes starting at byte {pos} is "
                "cut off (was the run killed while writing?). Remove the file, or copy it whole again."
            )
        yield data[pos + 12 : pos + 12 + length]
        pos = end


Scalars = dict[str, dict[int, float]]
Histograms = dict[str, dict[int, tuple[list[float], list[float]]]]


def read_tensorboard(run: Path) -> tuple[Scalars, Histograms, dict[str, dict]]:
    """(scalars ``tag -> {step: value}``, histograms ``tag -> {step: (bounds, counts)}`` of the non-empty range the
    sinks wrote, descriptions ``where -> dict``)."""
    from tensorboard.compat.proto.event_pb2 import Event  # type: ignore[import-untyped]

    scalars: Scalars = defaultdict(dict)
    hists: Histograms = defaultdict(dict)
    meta: dict[str, dict] = {}
    for path in sorted(run.glob("events.out.tfevents.*")):
        for data in _tfrecords(path):
            event = Event.FromString(data)
            for value in event.summary.value:
                kind = value.WhichOneof("value")
                if kind == "simple_value":
                    scalars[value.tag][event.step] = value.simple_value
                elif kind == "histo":  # the sinks write ``min`` then each bin's upper limit
                    hists[value.tag][event.step] = (
                        [value.histo.min, *value.histo.bucket_limit],
                        list(value.histo.bucket),
                    )
                elif kind == "tensor" and tags.parse_meta(value.tag) and value.tensor.string_val:
                    meta[f"{path.name}: {value.tag}"] = json.loads(value.tensor.string_val[0])
                elif kind == "tensor" and value.tensor.float_val:  # add_scalar(new_style=True)
                    scalars[value.tag][event.step] = value.tensor.float_val[0]
    return scalars, hists, meta


def read_csv_log(run: Path) -> tuple[Scalars, Histograms, dict[str, dict]]:
    """A Lightning CSV log: its scalars, no histograms, and the descriptions written beside it."""
    scalars: Scalars = defaultdict(dict)
    with open(run / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row["step"]))
            for tag, value in row.items():
                if tag != "step" and value not in ("", None):
                    scalars[tag][step] = float(value)
    meta = {str(p): json.loads(p.read_text()) for p in sorted(run.glob(tags.META_FILES))}
    return scalars, {}, meta


def load_run(run: str | os.PathLike[str]) -> RunLogs:
    """A run's records rebuilt from its logs (a directory), as the meters held them; a LogError if it is no
    directory, holds no netdiag tag or a description written by a newer netdiag. ``notes`` says what the logs did
    not say (the cadence)."""
    run = Path(run)
    if not run.is_dir():
        raise LogError(f"{run}: no such directory of logs")
    has_events = any(run.glob("events.out.tfevents.*"))
    if has_events:
        scalars, hists, meta = read_tensorboard(run)
    elif (run / "metrics.csv").exists():
        scalars, hists, meta = read_csv_log(run)
    else:
        scalars, hists, meta = {}, {}, {}
    records: dict[str, Record] = {}
    others: dict[str, dict[int, float]] = {}
    points: dict[str, dict[int, tuple[dict[Key, float], dict[Key, Histogram]]]] = defaultdict(dict)

    def record_of(tag: str) -> tuple[Record, Key] | None:
        found = tags.parse(tag)
        if found is None:
            return None
        prefix, metric, name = found
        kind = tags.KIND_OF[metric]
        if kind not in records:
            records[kind] = KINDS[kind](prefix, history_size=10**9)
        record = records[kind]
        return (record, (metric, name)) if record.prefix == prefix else None  # a second prefix: not read

    for tag, series in scalars.items():
        found = record_of(tag)
        if found is None:
            if tags.parse(tag) is None and not tags.is_quantile(tag):
                others[tag] = series
            continue
        record, key = found
        for step, value in series.items():
            points[record.kind].setdefault(step, ({}, {}))[0][key] = value
    whole = read_records(run)
    if not records and not whole:
        where = "event files" if has_events else "metrics.csv"
        raise NoNetdiagTags(
            f"{run}: its {where} hold no netdiag tags (no SaturationMonitor, GradDataRatio or UpdateRatio?)"
        )
    _describe(records, meta, run)
    for record, key, step, hist in _regridded(hists, record_of):
        points[record.kind].setdefault(step, ({}, {}))[1][key] = hist
    for kind, by_step in points.items():
        for step in sorted(by_step):
            records[kind].add(step, *by_step[step])
    records.update(whole)  # a record written whole is exact (float64) and complete: it wins over its tags
    return RunLogs(run, records, others, _cadence(records))


def read_records(run: Path) -> dict[str, Record]:
    """The records written whole beside a run's logs (``tags.record_file``: the flight recorder's window), by
    kind; a LogError for one that cannot be read."""
    out: dict[str, Record] = {}
    for path in sorted(run.glob(tags.RECORD_FILES)):
        kind = tags.parse_record_file(path.name)
        if kind not in KINDS:
            continue
        try:
            out[kind] = Record.from_json(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as e:  # RecordVersionError is a ValueError
            raise LogError(f"{path}: not a netdiag record ({e})") from None
    return out


def _describe(records: dict[str, Record], meta: dict[str, dict], run: Path) -> None:
    """Give each record its description from the logs (``described`` stays False for one that has none)."""
    described = set()
    for where, m in meta.items():
        record = records.get(str(m.get("kind")))
        if record is not None and m.get("prefix", record.prefix) == record.prefix:
            try:
                record.load_description(m)
            except RecordVersionError as e:
                raise LogError(f"{run}: {where}: {e}") from None
            described.add(record.kind)
    for record in records.values():
        record.described = record.kind in described


def _cadence(records: dict[str, Record]) -> list[str]:
    """Logs from before the cadence was recorded: it is the largest step that divides every logged step."""
    inferred: dict[int, list[str]] = defaultdict(list)
    for record in records.values():
        if record.every_n_steps is None and len(record.steps) > 1:
            record.every_n_steps = math.gcd(*record.steps)
            inferred[record.every_n_steps].append(record.kind)
    return [
        f"these logs do not say how often {', '.join(kinds)} measured (written before netdiag 0.2.0): every {n} "
        "steps, read from the logged steps"
        for n, kinds in inferred.items()
    ]


def _regridded(
    hists: Histograms, record_of: Callable[[str], tuple[Record, Key] | None]
) -> Iterable[tuple[Record, Key, int, Histogram]]:
    """The histograms as the meters held them: every histogram of one metric and activation family was counted
    over the same edges, but the logs keep only the non-empty range of each; put back on one grid (the union of
    the ranges seen), so that layers and steps line up in the plots."""
    groups: dict[tuple[str, str, str | None], list[tuple[Record, Key, str]]] = defaultdict(list)
    for tag in hists:
        found = record_of(tag)
        if found is not None:
            record, (metric, name) = found
            families = getattr(record, "layer_families", {})
            groups[(record.kind, metric, families.get(name))].append((record, (metric, name), tag))
    for members in groups.values():
        grid = sorted({b for _, _, tag in members for bounds, _ in hists[tag].values() for b in bounds})
        index = {b: i for i, b in enumerate(grid)}
        for record, key, tag in members:
            for step, (bounds, counts) in hists[tag].items():
                full = [0.0] * (len(grid) - 1)
                for lo, c in zip(bounds, counts, strict=False):
                    full[index[lo]] = c
                yield record, key, step, Histogram(tuple(grid[1:-1]), tuple(full))
