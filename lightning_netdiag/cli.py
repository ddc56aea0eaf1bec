"""``netdiag``: the health report, the plots and a side-by-side comparison from finished runs' logs.

The logs are read into records by :mod:`lightning_netdiag.logs` (TensorBoard event files or Lightning's CSV
logs); a run is a directory holding event files or a ``metrics.csv``, and a directory above several runs
(``lightning_logs/``) stands for all of them. The views are the live ones: ``report.summarize``, ``plots``.

    netdiag report lightning_logs/version_0
    netdiag plots lightning_logs/version_0 --out plots/
    netdiag compare sweep/lr_*
    netdiag batch lightning_logs/version_0 --step 300   # the batch kept at a flight recorder's event
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_netdiag import report, tags
from lightning_netdiag.logs import LogError, RunLogs, load_runs
from lightning_netdiag.record import Record

__all__ = ["batches", "compare", "describe_batch", "draw", "health", "main"]


def health(run: RunLogs) -> report.Report:
    """The run's health report, from its logs (what the live one said, and what the logs did not say)."""
    return report.summarize(**run.by_kind(), notes=run.notes)


def _median_at_last(record: Record | None, metric: str, groups: dict[str, Any]) -> dict[str, float]:
    """Per group of layers, the median of ``metric`` over its layers at the latest step logged."""
    if record is None:
        return {}
    values: dict[str, list[float]] = defaultdict(list)
    for name in record.names(metric):
        values[str(groups.get(name) or "all")].append(record.points(metric, name)[-1][1])
    return {g: statistics.median(v) for g, v in sorted(values.items())}


def _largest_at_last(record: Record | None, metric: str) -> str:
    """The largest ``metric`` over the layers at the latest step logged, and its layer."""
    last = {} if record is None or record.last_step is None else record.at(metric, record.last_step)
    if not last:
        return "-"
    name = max(last, key=last.__getitem__)
    return f"{last[name]:.3g} ({name})"


def _cell(values: dict[str, float], fmt: str) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return format(next(iter(values.values())), fmt)
    return ", ".join(f"{g} {format(v, fmt)}" for g, v in values.items())


def compare(runs: Sequence[RunLogs]) -> str:
    """A markdown table, one row per run: the final loss, each diagnostic's median per layer group at the
    latest step, the largest attention logit there, and the report's verdicts."""
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
        "| run | final loss | saturated % | act. grad std | grad:data | update:data log10 | largest attention logit "
        "| verdicts |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        sat, gd, upd = run.record("saturation"), run.record("grad_data"), run.record("update")
        families = sat.layer_families if sat is not None else {}
        classes = (gd or upd).param_classes if (gd or upd) is not None else {}
        loss = run.final_loss()
        verdicts = health(run).verdicts
        rows.append(
            f"| {run.name} | {'-' if loss is None else f'{loss[1]:.4f}'} "
            f"| {_cell(_median_at_last(sat, 'act_saturated_pct', families), '.1f')} "
            f"| {_cell(_median_at_last(sat, 'act_grad_std', families), '.2e')} "
            f"| {_cell(_median_at_last(gd, 'grad_data_ratio', classes), '.2e')} "
            f"| {_cell(_median_at_last(upd, 'update_data_log10', classes), '.2f')} "
            f"| {_largest_at_last(run.record('logits'), 'attn_logit_max')} "
            f"| {', '.join(report.checks(verdicts)) or 'none'} |"
        )
    return "\n".join(rows)


def draw(run: RunLogs, out: Path) -> list[Path]:
    """The plots of one run as PNG files under ``out``; their paths."""
    from lightning_netdiag import plots

    figures = plots.draw_all(**run.by_kind())
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figures.items():
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        written.append(path)
    return written


def batches(run: Path) -> dict[int, Path]:
    """step -> the file of the batch the flight recorder kept at an event of that step, in a run's directory."""
    found = {tags.parse_batch_file(p.name): p for p in sorted(run.rglob(tags.BATCH_FILES))}
    return {step: path for step, path in sorted(found.items()) if step is not None}


def describe_batch(path: Path, rows: int = 4) -> str:
    """A kept batch in words: each micro-batch's tensors by place, their shape and type; token ids (integers) as ids,
    their first ``rows`` rows; other values by their statistics."""
    import torch

    saved = torch.load(path, weights_only=True)
    lines = [f"batch of step {saved['step']} ({path.name})" + (": cut to fit keep_batch" if saved["cut"] else "")]
    for i, ids in enumerate(saved["index"]):
        lines.append(f"  micro-batch {i}: {ids}")

    def walk(x: Any, where: str) -> None:
        if isinstance(x, torch.Tensor):
            head = f"  {where}: {tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}"
            if not x.is_floating_point() and x.numel():
                shown = x.reshape(x.shape[0], -1)[:rows] if x.dim() else x.reshape(1, 1)
                lines.append(head + "".join(f"\n    {row.tolist()}" for row in shown))
            elif x.numel():
                v = x.double()
                finite = v[v.isfinite()]
                stats = (
                    f"mean {finite.mean():.4g}, std {finite.std():.4g}, min {finite.min():.4g}, max {finite.max():.4g}"
                )
                lines.append(
                    f"{head}: {stats}"
                    + (f", {int((~v.isfinite()).sum())} not finite" if len(finite) < v.numel() else "")
                )
            else:
                lines.append(head)
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{where}.{k}")
        elif isinstance(x, (list, tuple)):
            for k, v in enumerate(x):
                walk(v, f"{where}[{k}]")

    for i, inputs in enumerate(saved["micro_batches"]):
        walk(inputs, f"micro-batch {i}")
    return "\n".join(lines)


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
    p = sub.add_parser("batch", help="print the batch the flight recorder kept at an event")
    p.add_argument("run", help="the run's directory")
    p.add_argument("--step", type=int, default=None, help="the event's step (default: each batch kept)")
    args = parser.parse_args(argv)
    if args.command == "batch":
        kept = batches(Path(args.run))
        chosen = kept if args.step is None else {s: p for s, p in kept.items() if s == args.step}
        if not chosen:
            steps = ", ".join(map(str, kept)) or "none"
            print(f"netdiag: no batch kept at step {args.step} in {args.run} (kept: {steps})", file=sys.stderr)
            return 2
        print("\n".join(describe_batch(path) for path in chosen.values()))
        return 0
    try:
        runs, skipped = load_runs(args.runs)
        for path in skipped:
            print(f"netdiag: skipped {path}: it holds no netdiag tags (another tool's logs)", file=sys.stderr)
        if args.command == "report":
            for run in runs:
                print(f"== {run.name}")
                print(health(run).table())
        elif args.command == "plots":
            unique = len({r.path.name for r in runs}) == len(runs)
            for i, run in enumerate(runs):
                folder = Path(args.out) / (run.path.name if unique else str(i)) if len(runs) > 1 else Path(args.out)
                for path in draw(run, folder):
                    print(path)
                if not any(r.has_histograms() for r in run.records.values()):
                    print(f"netdiag: {run.name} holds no histograms (a CSV log keeps quantiles): "
                          "only the plots of scalars are drawn", file=sys.stderr)  # fmt: skip
        else:
            print(compare(runs))
    except LogError as e:
        print(f"netdiag: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a folder for the plots that cannot be made, logs that cannot be read
        print(f"netdiag: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
