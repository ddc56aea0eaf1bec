"""Metric names and every on-disk convention, each defined once next to its inverse.

A measurement is logged as ``{prefix}/{metric}/{name}`` (a layer's or weight's) or ``{prefix}/{metric}`` (one
value per step); each metric belongs to one diagnostic, a record's ``kind``. Besides the numbers the logs hold
each record's description (:func:`meta_tag` in TensorBoard, :func:`meta_file` beside a CSV log), D4's target as
a line of its own (:data:`TARGET`) and, for loggers without histograms, quantiles (:func:`quantile_tag`). The
sinks write with the builders here and the log reader (:mod:`lightning_netdiag.logs`) reads with their inverses.
"""

from __future__ import annotations

import re

__all__ = [
    "BATCH_FILES", "FALLBACK_QUANTILES", "KIND_OF", "META_FILES", "METRICS", "RECORD_FILES", "TARGET", "batch_file",
    "is_quantile", "meta_file", "meta_tag", "parse", "parse_batch_file", "parse_meta", "parse_record_file",
    "quantile_name", "quantile_tag", "record_file", "split", "tag",
]  # fmt: skip

#: The metric names of each diagnostic, as the meters record them (``{prefix}/{metric}/{layer}`` in the logs).
METRICS = {
    "saturation": (
        "act_mean", "act_std", "act_saturated_pct", "act_dead_pct", "act_nonfinite", "act", "act_grad_mean",
        "act_grad_std", "act_grad_nonfinite", "act_grad", "act_grad_fp16_tiny_pct", "init_output_ce",
        "init_output_classes", "init_loss", "loss_median",
    ),
    "grad_data": ("grad_mean", "grad_std", "grad_data_ratio", "grad_nonfinite", "grad", "loss_scale"),
    "update": ("update_data_log10", "update_skipped", "update_zero", "lr"),
    "logits": (
        "attn_logit_max", "attn_logit_nonfinite", "attn_entropy", "attn_q_rms", "attn_k_rms", "output_logz",
        "output_logit_max",
    ),
    "optimizer": ("adam_step_rms", "adam_eps_pct"),
    "flight": (
        "flight_loss", "flight_loss_nonfinite", "flight_grad_total", "flight_grad_norm", "flight_grad_nonfinite",
        "flight_update_total", "flight_update_norm", "flight_weight_norm", "flight_skipped", "flight_batch",
        "flight_guarded", "flight_joined",
    ),
}  # fmt: skip

#: metric -> the diagnostic that logs it
KIND_OF = {metric: kind for kind, metrics in METRICS.items() for metric in metrics}

#: The name of D4's reference line, logged as ``{prefix}/update_data_log10/_target`` so that charts carry it.
TARGET = "_target"

#: Quantiles logged in place of a histogram for loggers that have none (CSV, MLflow, ...).
FALLBACK_QUANTILES = (0.05, 0.5, 0.95)
_QUANTILE = re.compile(r"/q\d\d$")
_META = re.compile(r"^(.+)/meta/(\w+)(?:/text_summary)?$")


def tag(prefix: str, metric: str, name: str = "") -> str:
    """``{prefix}/{metric}/{name}``, or ``{prefix}/{metric}`` for a step-level metric. Inverse: :func:`parse`."""
    return f"{prefix}/{metric}/{name}" if name else f"{prefix}/{metric}"


def parse(tag: str) -> tuple[str, str, str] | None:
    """``(prefix, metric, name)`` of a netdiag tag: its first path part that is a known metric splits it; None for
    another tag (a loss, a quantile, a description)."""
    if is_quantile(tag):
        return None
    parts = tag.split("/")
    for i in range(1, len(parts)):
        if parts[i] in KIND_OF:
            return "/".join(parts[:i]), parts[i], "/".join(parts[i + 1 :])
    return None


def split(prefix: str, tag: str) -> tuple[str, str]:
    """``(metric, name)`` of a tag known to start with ``{prefix}/``; a KeyError for any other tag."""
    if not tag.startswith(f"{prefix}/"):
        raise KeyError(tag)
    metric, _, name = tag[len(prefix) + 1 :].partition("/")
    return metric, name


def quantile_name(q: float) -> str:
    """``0.05`` -> ``"q05"``."""
    return f"q{round(q * 100):02d}"


def quantile_tag(tag: str, q: float) -> str:
    """Where a histogram's quantile ``q`` goes for a logger without histograms. Inverse: :func:`is_quantile`."""
    return f"{tag}/{quantile_name(q)}"


def is_quantile(tag: str) -> bool:
    return _QUANTILE.search(tag) is not None


def meta_tag(prefix: str, kind: str) -> str:
    """Where a record's description is logged in TensorBoard (JSON text)."""
    return f"{prefix}/meta/{kind}"


def parse_meta(tag: str) -> tuple[str, str] | None:
    """``(prefix, kind)`` of a description's tag as TensorBoard keeps it (``add_text`` appends
    ``/text_summary``); None for another tag. Inverse of :func:`meta_tag`."""
    found = _META.match(tag)
    return None if found is None else (found[1], found[2])


def meta_file(prefix: str, kind: str) -> str:
    """The name of the JSON file beside a CSV log's ``metrics.csv`` that holds a record's description."""
    return meta_tag(prefix, kind).replace("/", "_") + ".json"


#: The glob that finds every :func:`meta_file` in a run's directory.
META_FILES = "*_meta_*.json"


def record_file(prefix: str, kind: str) -> str:
    """The name of the JSON file beside a run's logs that holds a whole record (``Record.to_json``): the flight
    recorder's window, written when a run spikes or dies. Inverse: :func:`parse_record_file`."""
    return f"{prefix.replace('/', '_')}_record_{kind}.json"


def parse_record_file(name: str) -> str | None:
    """The kind of a :func:`record_file` name, or None for another file."""
    found = re.match(r"^.+_record_(\w+)\.json$", name)
    return None if found is None else found[1]


#: The glob that finds every :func:`record_file` in a run's directory.
RECORD_FILES = "*_record_*.json"


def batch_file(prefix: str, step: int) -> str:
    """The name of the file beside a run's logs that holds the batch of a step the flight recorder had an event at
    (``torch.save``). Inverse: :func:`parse_batch_file`."""
    return f"{prefix.replace('/', '_')}_flight_batch_{step}.pt"


def parse_batch_file(name: str) -> int | None:
    """The step of a :func:`batch_file` name, or None for another file."""
    found = re.match(r"^.+_flight_batch_(\d+)\.pt$", name)
    return None if found is None else int(found[1])


#: The glob that finds every :func:`batch_file` in a run's directory.
BATCH_FILES = "*_flight_batch_*.pt"
