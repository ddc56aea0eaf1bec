"""Tag and metric names, defined once: every logged tag is ``{prefix}/{metric}/{name}`` (or ``{prefix}/{metric}``
for a step-level value), and each metric belongs to one diagnostic (a meter's ``kind``)."""

from __future__ import annotations

#: The metric names of each diagnostic, as the meters log them (``{prefix}/{metric}/{layer}``).
METRICS = {
    "saturation": (
        "act_mean", "act_std", "act_saturated_pct", "act_dead_pct", "act_nonfinite", "act", "act_grad_mean",
        "act_grad_std", "act_grad_nonfinite", "act_grad", "act_grad_fp16_tiny_pct", "init_output_ce",
        "init_output_classes", "init_loss",
    ),
    "grad_data": ("grad_mean", "grad_std", "grad_data_ratio", "grad_nonfinite", "grad", "loss_scale"),
    "update": ("update_data_log10", "update_skipped", "update_zero", "lr"),
}  # fmt: skip

#: metric -> the diagnostic that logs it
KIND_OF = {metric: kind for kind, metrics in METRICS.items() for metric in metrics}


def tag(prefix: str, metric: str, name: str = "") -> str:
    """``{prefix}/{metric}/{name}``, or ``{prefix}/{metric}`` for a step-level metric."""
    return f"{prefix}/{metric}/{name}" if name else f"{prefix}/{metric}"


def head(prefix: str, metric: str) -> str:
    """What every per-layer tag of ``metric`` starts with: ``{prefix}/{metric}/``."""
    return f"{prefix}/{metric}/"
