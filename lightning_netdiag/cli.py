"""``netdiag``: the health report, the plots and a side-by-side comparison from finished runs' logs.

Reads TensorBoard event files (scalars, histograms, and each meter's description, which the front ends log
once as JSON text) or Lightning's CSV logs (``metrics.csv``: scalars, and the description in a JSON file
beside it). A run is a directory holding event files or a ``metrics.csv``; a directory above several runs
(``lightning_logs/``) stands for all of them.

    netdiag report lightning_logs/version_0
    netdiag plots lightning_logs/version_0 --out plots/
    netdiag compare sweep/lr_*
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import struct
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_netdiag import report
from lightning_netdiag.history import History
from lightning_netdiag.stats import Histogram
from lightning_netdiag.tags import KIND_OF

QUANTILE = re.compile(r"/q\d\d$")  # the quantiles that loggers without histograms get instead
LOSS = re.compile(r"(^|[/_])(train[/_])?loss($|_step$)")


class LogError(ValueError):
    """A log that cannot be read as a netdiag run; the message says which file and why."""


@dataclass
class LoggedMeter:
    """A meter rebuilt from a run's logs: what the views (report, plots) read from a live one."""

    kind: str
    prefix: str
    history: History = field(default_factory=lambda: History(10**9))
    layer_types: dict[str, str] = field(default_factory=dict)
    layer_kinds: dict[str, str] = field(default_factory=dict)
    layer_families: dict[str, str | None] = field(default_factory=dict)
    layers_in_loop: set[str] = field(default_factory=set)
    param_classes: dict[str, str] = field(default_factory=dict)
    param_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    optimizer_family: str | None = None
    target: float = -3.0
    threshold: float = 0.97
    described: bool = False

    def describe_from(self, meta: dict[str, Any]) -> None:
        for key in ("layer_types", "layer_kinds", "layer_families", "param_classes", "optimizer_family"):
            if key in meta:
                setattr(self, key, meta[key])
        self.layers_in_loop = set(meta.get("layers_in_loop", ()))
        self.param_shapes = {k: tuple(v) for k, v in meta.get("param_shapes", {}).items()}
        self.target, self.threshold = meta.get("target", self.target), meta.get("threshold", self.threshold)
        self.described = True


@dataclass
class Run:
    """One finished run: its meters, and the other scalars it logged (the loss)."""

    path: Path
    meters: dict[str, LoggedMeter]
    others: dict[str, dict[int, float]]

    @property
    def name(self) -> str:
        return str(self.path)

    def meter(self, kind: str) -> LoggedMeter | None:
        return self.meters.get(kind)

    def final_loss(self) -> tuple[str, float] | None:
        """The training loss's tag and the mean of its last 5 logged values, if a loss was logged."""
        tags = sorted(t for t in self.others if LOSS.search(t) and not re.search(r"val|eval|test", t))
        if not tags:
            return None
        points = sorted(self.others[tags[0]].items())
        return tags[0], statistics.fmean(v for _, v in points[-5:])

    def layers(self) -> set[str]:
        """Every watched layer and weight, by name."""
        return {
            name
            for meter in self.meters.values()
            for tag in meter.history
            for metric, name in [_split(tag, meter.prefix)]
            if metric in ("act_std", "grad_std") and name
        }


def _split(tag: str, prefix: str) -> tuple[str, str]:
    """``{prefix}/{metric}/{name}`` -> (metric, name); name is empty for a step-level metric."""
    rest = tag[len(prefix) + 1 :]
    metric, _, name = rest.partition("/")
    return metric, name


def _prefix_and_metric(tag: str) -> tuple[str, str] | None:
    """The prefix and metric of a netdiag tag (the first path part that is a known metric), else None."""
    parts = tag.split("/")
    for i in range(1, len(parts)):
        if parts[i] in KIND_OF:
            return "/".join(parts[:i]), parts[i]
    return None


# --- reading ------------------------------------------------------------------------------------------


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """The run directories at or under ``paths``, in order; a LogError for a path with none."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise LogError(f"{p}: no such file or directory")
        base = p if p.is_dir() else p.parent
        found = sorted({f.parent for pattern in ("events.out.tfevents.*", "metrics.csv") for f in base.rglob(pattern)})
        if not found:
            raise LogError(f"{p}: no TensorBoard event file and no metrics.csv under it: not a run's logs")
        runs += [r for r in found if r not in runs]
    return runs


def _records(path: Path) -> Iterable[bytes]:
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


def _histogram(proto: Any) -> tuple[list[float], list[float]]:
    """The bounds and counts of the non-empty range that the sinks wrote (``min``, then each bin's upper limit)."""
    return [proto.min, *proto.bucket_limit], list(proto.bucket)


def read_tensorboard(run: Path) -> tuple[dict, dict, dict]:
    """(scalars ``tag -> {step: value}``, histograms ``tag -> {step: (bounds, counts)}``, meta ``tag -> dict``)."""
    from tensorboard.compat.proto.event_pb2 import Event  # type: ignore[import-untyped]

    scalars: dict[str, dict[int, float]] = defaultdict(dict)
    hists: dict[str, dict[int, tuple[list[float], list[float]]]] = defaultdict(dict)
    meta: dict[str, dict] = {}
    for path in sorted(run.glob("events.out.tfevents.*")):
        for record in _records(path):
            event = Event.FromString(record)
            for value in event.summary.value:
                kind = value.WhichOneof("value")
                if kind == "simple_value":
                    scalars[value.tag][event.step] = value.simple_value
                elif kind == "histo":
                    hists[value.tag][event.step] = _histogram(value.histo)
                elif kind == "tensor" and "/meta/" in value.tag and value.tensor.string_val:
                    meta[value.tag] = json.loads(value.tensor.string_val[0])
                elif kind == "tensor" and value.tensor.float_val:  # add_scalar(new_style=True)
                    scalars[value.tag][event.step] = value.tensor.float_val[0]
    return scalars, hists, meta


def read_csv_log(run: Path) -> tuple[dict, dict, dict]:
    """A Lightning CSV log: its scalars, no histograms, and the descriptions written beside it."""
    scalars: dict[str, dict[int, float]] = defaultdict(dict)
    with open(run / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row["step"]))
            for tag, value in row.items():
                if tag != "step" and value not in ("", None):
                    scalars[tag][step] = float(value)
    meta = {p.stem: json.loads(p.read_text()) for p in run.glob("*_meta_*.json")}
    return scalars, {}, meta


def load_run(run: Path) -> Run:
    """A run's meters rebuilt from its logs; a LogError if it holds no netdiag tag."""
    has_events = any(run.glob("events.out.tfevents.*"))
    scalars, hists, meta = read_tensorboard(run) if has_events else read_csv_log(run)
    meters: dict[str, LoggedMeter] = {}
    others: dict[str, dict[int, float]] = {}
    by_step: dict[str, dict[int, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for tag, points in scalars.items():
        found = _prefix_and_metric(tag)
        if found is None or QUANTILE.search(tag):
            if found is None:
                others[tag] = points
            continue
        prefix, metric = found
        kind = KIND_OF[metric]
        meters.setdefault(kind, LoggedMeter(kind, prefix))
        for step, value in points.items():
            by_step[kind][step][tag] = value
    if not meters:
        where = "event files" if has_events else "metrics.csv"
        raise LogError(f"{run}: its {where} hold no netdiag tags (no SaturationMonitor, GradDataRatio or UpdateRatio?)")
    histograms = _histograms(hists, meters, meta)
    for kind, meter in meters.items():
        for step in sorted(set(by_step[kind]) | {s for t in histograms.get(kind, {}) for s in histograms[kind][t]}):
            meter.history.add(
                step,
                by_step[kind].get(step, {}),
                {t: h[step] for t, h in histograms.get(kind, {}).items() if step in h},
            )
        described = next((m for m in meta.values() if m.get("kind") == kind), None)
        if described is not None:
            meter.describe_from(described)
    return Run(run, meters, others)


def _histograms(hists: dict, meters: dict[str, LoggedMeter], meta: dict) -> dict[str, dict[str, dict[int, Histogram]]]:
    """The histograms as the meters held them: every histogram of one metric and activation family was
    counted over the same edges, but the logs keep only the non-empty range of each; put back on one grid
    (the union of the ranges seen), so that layers and steps line up in the plots."""
    families: dict[str, str | None] = {}
    for m in meta.values():
        families.update(m.get("layer_families", {}))
    groups: dict[tuple[str, str, str | None], list[str]] = defaultdict(list)
    for tag in hists:
        found = _prefix_and_metric(tag)
        if found is None:
            continue
        prefix, metric = found
        kind = KIND_OF[metric]
        if kind not in meters:
            meters[kind] = LoggedMeter(kind, prefix)
        name = _split(tag, prefix)[1]
        groups[(kind, metric, families.get(name) if metric.startswith("act") else None)].append(tag)
    out: dict[str, dict[str, dict[int, Histogram]]] = defaultdict(dict)
    for (kind, _, _), tags in groups.items():
        grid = sorted({b for tag in tags for bounds, _ in hists[tag].values() for b in bounds})
        index = {b: i for i, b in enumerate(grid)}
        for tag in tags:
            out[kind][tag] = {}
            for step, (bounds, counts) in hists[tag].items():
                full = [0.0] * (len(grid) - 1)
                for lo, c in zip(bounds, counts, strict=False):
                    full[index[lo]] = c
                out[kind][tag][step] = Histogram(tuple(grid[1:-1]), tuple(full))
    return out


# --- views ----------------------------------------------------------------------------------------------


def health(run: Run) -> tuple[list[report.Verdict], list[str], int | None]:
    sat, gd, upd = run.meter("saturation"), run.meter("grad_data"), run.meter("update")
    verdicts = report.evaluate(sat, gd, upd)
    note = report.learning_rate_note(upd, gd)
    notes = [note] if note else []
    if sat is not None and not sat.described:
        notes.append(
            "note: these logs hold no description of the activation layers (written by netdiag >= 0.1.0), "
            "so the rules that depend on a layer's activation kind stay silent."
        )
    last = max((m.history.last_step for m in run.meters.values() if m.history.last_step is not None), default=None)
    return verdicts, notes, last


def _median_at_last(meter: LoggedMeter | None, metric: str, groups: dict[str, Any]) -> dict[str, float]:
    """Per group of layers, the median of ``metric`` over its layers at the latest step logged."""
    if meter is None:
        return {}
    values: dict[str, list[float]] = defaultdict(list)
    for tag in meter.history:
        m, name = _split(tag, meter.prefix)
        if m == metric and name and not name.startswith("_"):
            values[str(groups.get(name) or "all")].append(meter.history.tail(tag, 1)[0][1])
    return {g: statistics.median(v) for g, v in sorted(values.items())}


def _cell(values: dict[str, float], fmt: str) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return format(next(iter(values.values())), fmt)
    return ", ".join(f"{g} {format(v, fmt)}" for g, v in values.items())


def compare(runs: Sequence[Run]) -> str:
    """A markdown table, one row per run: the final loss, each diagnostic's median per layer group at the
    latest step, and the report's verdicts."""
    first = runs[0].layers()
    for run in runs[1:]:
        layers = run.layers()
        if layers != first:
            only, missing = sorted(layers - first), sorted(first - layers)
            raise LogError(
                f"{run.name} and {runs[0].name} watched different layers (only in the former: {only[:5]}; only in "
                f"the latter: {missing[:5]}): their diagnostics cannot be compared layer group by layer group."
            )
    rows = [
        "| run | final loss | saturated % | act. grad std | grad:data | update:data log10 | verdicts |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        sat, gd, upd = run.meter("saturation"), run.meter("grad_data"), run.meter("update")
        families = sat.layer_families if sat is not None else {}
        classes = (gd or upd).param_classes if (gd or upd) is not None else {}  # type: ignore[union-attr]
        loss = run.final_loss()
        verdicts, _, _ = health(run)
        rows.append(
            f"| {run.name} | {'-' if loss is None else f'{loss[1]:.4f}'} "
            f"| {_cell(_median_at_last(sat, 'act_saturated_pct', families), '.1f')} "
            f"| {_cell(_median_at_last(sat, 'act_grad_std', families), '.2e')} "
            f"| {_cell(_median_at_last(gd, 'grad_data_ratio', classes), '.2e')} "
            f"| {_cell(_median_at_last(upd, 'update_data_log10', classes), '.2f')} "
            f"| {', '.join(report.checks(verdicts)) or 'none'} |"
        )
    return "\n".join(rows)


def draw(run: Run, out: Path) -> list[Path]:
    """The plots of one run as PNG files under ``out``; their paths."""
    from lightning_netdiag import plots

    figures = plots.draw_all(run.meter("saturation"), run.meter("grad_data"), run.meter("update"))
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figures.items():
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        written.append(path)
    return written


# --- the command --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="netdiag", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("report", help="print each run's health report")
    p.add_argument("runs", nargs="+", help="run directories (or directories above them)")
    p = sub.add_parser("plots", help="draw each run's plots as PNG files")
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default="netdiag_plots", help="where the PNG files go (one folder per run)")
    p = sub.add_parser("compare", help="the runs side by side (an LR sweep): loss, diagnostics, verdicts")
    p.add_argument("runs", nargs="+")
    args = parser.parse_args(argv)
    try:
        runs = [load_run(path) for path in find_runs(args.runs)]
        if args.command == "report":
            for run in runs:
                verdicts, notes, step = health(run)
                print(f"== {run.name}")
                print(report.format_table(verdicts, step, notes))
        elif args.command == "plots":
            unique = len({r.path.name for r in runs}) == len(runs)
            for i, run in enumerate(runs):
                folder = Path(args.out) / (run.path.name if unique else str(i)) if len(runs) > 1 else Path(args.out)
                for path in draw(run, folder):
                    print(path)
                if not any(m.history.histogram_tags() for m in run.meters.values()):
                    print(f"netdiag: {run.name} holds no histograms (a CSV log keeps quantiles): "
                          "only the plots of scalars are drawn", file=sys.stderr)  # fmt: skip
        else:
            print(compare(runs))
    except LogError as e:
        print(f"netdiag: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
