"""Where measurements go: every logger attached (Lightning's loggers, or a bare ``SummaryWriter``)."""

from __future__ import annotations

import itertools
import json
import os
import re
import weakref
from collections.abc import Mapping
from typing import Any

from lightning_netdiag import checksum
from lightning_netdiag.dist import rank_zero_warn
from lightning_netdiag.stats import Histogram
from lightning_netdiag.tags import FALLBACK_QUANTILES, TARGET, meta_file, meta_tag, quantile_name, quantile_tag, split

__all__ = [
    "CHARTS", "MAX_LINES", "LoggerSink", "chart_groups", "fast_tensorboard_checksums", "flush_loggers", "log_figure",
    "log_report",
    "logger_kind", "quantile_scalars", "write_meta", "write_tensorboard", "write_tensorboard_layout",
]  # fmt: skip


def logger_kind(logger: object) -> str:
    """``"tensorboard"``, ``"wandb"``, ``"mlflow"`` or ``"other"``: what a logger can hold.

    The one place that tells loggers apart. By class name (anywhere in the class's bases) for W&B and
    MLflow and by what the experiment can do for TensorBoard, so that the loggers of both
    ``lightning.pytorch`` and the standalone ``pytorch_lightning`` package (different classes) are
    recognised alike, and neither ``wandb`` nor ``mlflow`` is imported unless such a logger is attached.
    """
    names = {cls.__name__ for cls in type(logger).__mro__}
    if "WandbLogger" in names:
        return "wandb"
    if "MLFlowLogger" in names:
        return "mlflow"
    experiment = getattr(logger, "experiment", None)
    return "tensorboard" if callable(getattr(experiment, "add_histogram_raw", None)) else "other"


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
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        kinds = [logger_kind(logger) for logger in loggers]
        if _CHECKSUMS_CHOSEN[0] is None and is_global_zero and "tensorboard" in kinds:
            fast_tensorboard_checksums()  # at the first write: the user may have chosen before it
        if meta is not None and is_global_zero:
            write_meta(loggers, self.prefix, meta, step)
        for logger, kind in zip(loggers, kinds, strict=True):
            metrics: dict[str, Any] = dict(scalars)
            if kind == "tensorboard":
                if is_global_zero:  # only rank zero writes, as the logger's own log_metrics does
                    write_tensorboard_layout(logger.experiment, self.prefix, scalars)
                    write_tensorboard(logger, step, scalars, histograms)
                continue
            if kind == "wandb":  # one row per step: the histograms go with the scalars
                metrics.update({tag: _wandb_histogram(hist) for tag, hist in histograms.items() if hist.total > 0})
            elif histograms:
                self._warn_no_histograms(logger)
                metrics.update(quantile_scalars(histograms))
            logger.log_metrics(metrics, step=step)

    def _warn_no_histograms(self, logger: object) -> None:
        kind = type(logger).__name__
        if kind not in self._warned:
            self._warned.add(kind)
            rank_zero_warn(
                f"{self.source}: {kind} cannot hold histograms; logging the quantiles "
                f"{', '.join(quantile_name(q) for q in FALLBACK_QUANTILES)} of each instead."
            )


def write_meta(loggers: list[Any], prefix: str, meta: Mapping[str, Any], step: int) -> None:
    """A record's description (:meth:`lightning_netdiag.record.Record.describe`), for the ``netdiag`` command:
    JSON text in TensorBoard, a JSON file beside a CSV logger's ``metrics.csv``; other loggers hold the numbers
    only."""
    text = json.dumps(meta, sort_keys=True)
    kind = str(meta["kind"])
    for logger in loggers:
        if logger_kind(logger) == "tensorboard":
            logger.experiment.add_text(meta_tag(prefix, kind), text, global_step=step)
        elif "CSVLogger" in {cls.__name__ for cls in type(logger).__mro__}:
            os.makedirs(logger.log_dir, exist_ok=True)
            with open(os.path.join(logger.log_dir, meta_file(prefix, kind)), "w") as f:
                f.write(text)


def quantile_scalars(histograms: Mapping[str, Histogram]) -> dict[str, float]:
    out = {}
    for tag, hist in histograms.items():
        for q, value in zip(FALLBACK_QUANTILES, hist.quantiles(FALLBACK_QUANTILES), strict=True):
            out[quantile_tag(tag, q)] = value
    return out


def _used(hist: Histogram) -> tuple[list[float], list[float]]:
    """The bounds and counts of the bins from the first to the last non-empty one (both empty if none)."""
    used = [i for i, c in enumerate(hist.counts) if c > 0]
    if not used:
        return [], []
    first, last = used[0], used[-1]
    return hist.bounds[first : last + 2], list(hist.counts[first : last + 1])


def _histogram_raw(hist: Histogram) -> dict[str, Any] | None:
    """The arguments of TensorBoard's raw histogram for the bins from the first to the last non-empty one
    (None if all are empty). Only finite values are ever counted, so TensorBoard never sees a NaN; ``min``
    and ``max`` are the outer bounds of the non-empty bins (the exact ones are not kept)."""
    bounds, counts = _used(hist)
    if not counts:
        return None
    mids = [(a + b) / 2 for a, b in itertools.pairwise(bounds)]
    return {
        "min": bounds[0],
        "max": bounds[-1],
        "num": int(sum(counts)),
        "sum": sum(c * m for c, m in zip(counts, mids, strict=True)),
        "sum_squares": sum(c * m * m for c, m in zip(counts, mids, strict=True)),
        "bucket_limits": bounds[1:],
        "bucket_counts": counts,
    }


def write_tensorboard(
    logger: Any, step: int, scalars: Mapping[str, float], histograms: Mapping[str, Histogram]
) -> None:
    """One callback's scalars and histograms of one step as **one** TensorBoard event.

    TensorBoard's writer costs about as much per event as per value (each event is framed and
    checksummed in pure Python), and Lightning's ``log_metrics`` writes one event per scalar: a step of a
    hundred scalars cost 14 ms that way and under 1 ms as one event here. Readers (TensorBoard,
    EventAccumulator, tbparse) take every value of an event as its own point. The event goes through the
    writer's own file writer (``SummaryWriter.file_writer.add_summary``, as its ``add_scalar`` does). A logger
    with a key prefix, or another writer than torch's, gets the per-value calls instead, unchanged.
    """
    from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary  # type: ignore[import-untyped]
    from torch.utils.tensorboard import SummaryWriter

    writer = logger.experiment
    file_writer = getattr(writer, "file_writer", None)
    if getattr(logger, "_prefix", "") or not isinstance(writer, SummaryWriter) or file_writer is None:
        logger.log_metrics(dict(scalars), step=step)
        for tag, hist in histograms.items():
            raw = _histogram_raw(hist)
            if raw is not None:
                writer.add_histogram_raw(tag, global_step=step, **raw)
        return
    # The protos torch's add_scalar and add_histogram_raw write, built directly (its helpers convert each
    # value through numpy first).
    values = [Summary.Value(tag=tag, simple_value=value) for tag, value in scalars.items()]
    for tag, hist in histograms.items():
        raw = _histogram_raw(hist)
        if raw is not None:
            limits, counts = raw.pop("bucket_limits"), raw.pop("bucket_counts")
            values.append(Summary.Value(tag=tag, histo=HistogramProto(**raw, bucket_limit=limits, bucket=counts)))
    if values:
        file_writer.add_summary(Summary(value=values), step)


#: What the user chose with :func:`fast_tensorboard_checksums` (None: nothing; the fast checksums at the first write).
_CHECKSUMS_CHOSEN: list[bool | None] = [None]


def fast_tensorboard_checksums(enable: bool = True) -> None:
    """TensorBoard's event writer checksums every record in C (google-crc32c, where installed) or a block at a time
    (:mod:`lightning_netdiag.checksum`, numpy) instead of a byte at a time in pure Python: the same checksums.

    TensorBoard frames each event with a CRC32C computed in pure Python on its writer thread, holding the GIL:
    about 0.2 ms per kB on a 2-core CPU, which the training thread waits for (a small model's logging step writes
    about 17 kB of histograms and scalars: 3.8 ms, against 0.16 ms a block at a time and 0.01 ms in C). This
    replaces TensorBoard's checksum function (``tensorboard.summary.writer.record_writer.masked_crc32c``) for every
    TensorBoard writer in this process. netdiag does it by itself when it first writes to TensorBoard, unless this
    was called with ``enable=False`` before, which puts TensorBoard's own back and keeps it.
    """
    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow  # type: ignore[import-untyped]
    from tensorboard.summary.writer import record_writer  # type: ignore[import-untyped]

    _CHECKSUMS_CHOSEN[0] = bool(enable)
    if not enable:
        record_writer.masked_crc32c = pywrap_tensorflow.masked_crc32c
        return
    try:
        import google_crc32c  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        record_writer.masked_crc32c = checksum.masked_crc32c
        return

    def masked_crc32c(data: bytes) -> int:
        return checksum.mask(google_crc32c.value(data))

    record_writer.masked_crc32c = masked_crc32c


def _wandb_histogram(hist: Histogram) -> Any:
    """A ``wandb.Histogram`` of the non-empty bins, from the counts (no raw values exist on the host)."""
    import numpy as np
    import wandb  # only ever reached with a WandbLogger attached

    bounds, counts = _used(hist)
    return wandb.Histogram(np_histogram=(np.asarray(counts), np.asarray(bounds)))


#: The charts of the TensorBoard "Custom Scalars" tab: per diagnostic, one category of charts.
CHARTS = {
    "D1 activation saturated %": "act_saturated_pct",
    "D1 activation std": "act_std",
    "D1 dead units %": "act_dead_pct",
    "D2 activation-gradient std": "act_grad_std",
    "D3 grad:data ratio": "grad_data_ratio",
    "D4 update:data, log10 (line _target: the target)": "update_data_log10",
    "attention: largest logit": "attn_logit_max",
    "attention: softmax entropy (1 uniform, 0 one-hot)": "attn_entropy",
    "output logits: mean log Z": "output_logz",
    "output logits: largest": "output_logit_max",
    "Adam: normalised step RMS": "adam_step_rms",
    "Adam: % where eps dominates": "adam_eps_pct",
}
#: Lines per chart at most: nobody reads more. Layers are grouped by module path to stay under it.
MAX_LINES = 12

_layouts: weakref.WeakKeyDictionary[Any, dict[str, dict[str, list[str]]]] = weakref.WeakKeyDictionary()


def _path(name: str) -> list[str]:
    """A layer's module path, its call suffix (``-2``) taken off: the calls of one module stay together."""
    return re.sub(r"-\d+$", "", name).replace("/", ".").split(".")


def chart_groups(names: list[str], limit: int = MAX_LINES) -> list[tuple[str, list[str]]]:
    """``names`` (in depth order) cut into groups of at most ``limit``, each a list of module-path
    prefixes: consecutive siblings share a group; a subtree too large for one is split further."""

    def split(group: list[list[str]], depth: int) -> list[list[tuple[str, int]]]:
        buckets: dict[str, list[list[str]]] = {}
        for path in group:
            buckets.setdefault(".".join(path[: depth + 1]), []).append(path)
        out: list[list[tuple[str, int]]] = []
        current: list[tuple[str, int]] = []
        for prefix, members in buckets.items():
            deeper = [p for p in members if len(p) > depth + 1]
            if len(members) > limit and len(deeper) == len(members):
                if current:
                    out.append(current)
                    current = []
                out += split(members, depth + 1)
                continue
            if current and sum(n for _, n in current) + len(members) > limit:
                out.append(current)
                current = []
            current.append((prefix, len(members)))
        return [*out, current] if current else out

    paths = [_path(n) for n in names]
    common = 0
    while all(len(p) > common + 1 and p[common] == paths[0][common] for p in paths):
        common += 1
    return [(_label(g), [prefix for prefix, _ in g]) for g in split(paths, common)] if names else []


def _label(group: list[tuple[str, int]]) -> str:
    return group[0][0] if len(group) == 1 else f"{group[0][0]} .. {group[-1][0]}"


def _regex(prefix: str, metric: str, alternatives: list[str], target: bool) -> str:
    """A tag regex for a group: each prefix, then a call suffix, then deeper path components or nothing."""
    names = "|".join(re.escape(a).replace(r"\.", "[./]") for a in alternatives)
    tail = rf"|{TARGET}" if target else ""
    return rf"{re.escape(prefix)}/{metric}/(?:(?:{names})(?:-\d+)?(?:[./].*)?{tail})"


def write_tensorboard_layout(writer: Any, prefix: str, scalars: Mapping[str, float]) -> None:
    """Write the custom-scalars layout when a layer that no chart covers yet is logged (TensorBoard shows
    the latest layout): one category per diagnostic, one chart per group of at most ``MAX_LINES`` layers."""
    known = _layouts.setdefault(writer, {}).setdefault(prefix, {})
    new = False
    for tag in scalars:
        head, name = split(prefix, tag)
        if head in CHARTS.values() and name and name != TARGET:
            names = known.setdefault(head, [])
            if name not in names:
                names.append(name)
                new = True
    if not new:
        return
    layout: dict[str, dict[str, list[Any]]] = {}
    for p, metrics in sorted(_layouts[writer].items()):
        for title, metric in CHARTS.items():
            if metric not in metrics:
                continue
            target = metric == "update_data_log10"
            charts = chart_groups(metrics[metric], MAX_LINES - target)
            layout[f"{p}: {title}"] = {
                f"{title} [{label}]" if len(charts) > 1 else title: ["Multiline", [_regex(p, metric, group, target)]]
                for label, group in charts
            }
    writer.add_custom_scalars(layout)


def flush_loggers(loggers: list[Any]) -> None:
    """Everything logged so far onto the disk (a run that dies next keeps it)."""
    for logger in loggers:
        logger.save()
        if logger_kind(logger) == "tensorboard":
            logger.experiment.flush()


def log_figure(loggers: list[Any], tag: str, figure: Any, step: int) -> None:
    """A matplotlib figure: an image in TensorBoard and W&B, a PNG artifact in MLflow."""
    for logger in loggers:
        kind = logger_kind(logger)
        if kind == "tensorboard":
            logger.experiment.add_figure(tag, figure, global_step=step, close=False)
        elif kind == "wandb":
            import wandb

            logger.experiment.log({tag: wandb.Image(figure), "trainer/global_step": step})
        elif kind == "mlflow":
            logger.experiment.log_figure(logger.run_id, figure, f"{tag}_step{step}.png")


def log_report(
    loggers: list[Any], tag: str, markdown: str, table: tuple[list[str], list[list[Any]]], step: int
) -> None:
    """A report: markdown text in TensorBoard, a table in W&B, a markdown artifact in MLflow."""
    for logger in loggers:
        kind = logger_kind(logger)
        if kind == "tensorboard":
            logger.experiment.add_text(tag, markdown, global_step=step)
        elif kind == "wandb":
            columns, rows = table
            logger.log_table(key=tag, columns=columns, data=rows, step=step)
        elif kind == "mlflow":
            logger.experiment.log_text(logger.run_id, markdown, f"{tag}_step{step}.md")
