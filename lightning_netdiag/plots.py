"""The lecture's four plots, and each layer's distribution over time, drawn from the records.

Every function takes the record of a diagnostic (:mod:`lightning_netdiag.record`: scalars and histogram counts
over fixed edges, so no raw tensor is needed), live or read from logs, draws on ``ax`` or on a new figure, and
returns the figure. matplotlib is imported only when a plot is drawn; no pyplot state is touched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_netdiag.flight.events import Event, stopped
from lightning_netdiag.record import (
    ActivationRecord,
    FlightRecord,
    GradDataRecord,
    LogitRecord,
    OptimizerRecord,
    ParameterRecord,
    Record,
    UpdateRecord,
)
from lightning_netdiag.stats import Histogram

__all__ = [
    "FLIGHT_WINDOWS", "MANY_LAYERS", "activation_distribution", "activation_gradient_distribution",
    "attention_entropy_over_time", "attention_logits_over_time", "depth_profile", "distribution_over_time", "draw_all",
    "flight_window", "layers_by_bins", "layers_by_steps", "output_logits_over_time", "update_ratio_over_time",
    "weight_gradient_distribution",
]  # fmt: skip

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _axes(ax: Axes | None, figsize: tuple[float, float] = (20, 4)) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax  # type: ignore[return-value]
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _at(record: Record, metric: str, name: str, step: int | None) -> tuple[int, Histogram] | None:
    points = record.histograms_of(metric, name)
    if step is None:
        return points[-1] if points else None
    return next(((s, h) for s, h in points if s == step), None)


def _scalar(record: Record, metric: str, name: str, step: int) -> float:
    value = record.value(metric, step, name)
    return float("nan") if value is None else value


def _density_line(ax: Axes, hist: Histogram, label: str) -> None:
    """Over evenly spaced edges, a density line as the lecture's ``torch.histogram(t, density=True)``.

    Over log-spaced edges a density would spike in the narrow bins near 0 (exact zeros, such as the
    gradient of unused embedding rows); there each bin's fraction of the values is drawn on a symlog axis.
    """
    used = [i for i, c in enumerate(hist.counts) if c > 0]
    if not used:
        return
    bounds, total = hist.bounds, hist.total
    bins = range(used[0], used[-1] + 1)
    xs = [(bounds[i] + bounds[i + 1]) / 2 for i in bins]
    if hist.uniform:
        ax.plot(xs, [hist.counts[i] / (total * (bounds[i + 1] - bounds[i])) for i in bins], label=label)
        ax.set_ylabel("density")
    else:
        ax.plot(xs, [hist.counts[i] / total for i in bins], label=label)
        _symlog(ax, hist, "x")
        ax.set_ylabel("fraction of values per bin")


def _symlog(ax: Axes, hist: Histogram, axis: str) -> None:
    threshold = min(abs(e) for e in hist.edges if e != 0)
    (ax.set_xscale if axis == "x" else ax.set_yscale)("symlog", linthresh=threshold)


def _distribution(record: Record, metric: str, title: str, label: Any, step: int | None, ax: Axes | None) -> Figure:
    fig, ax = _axes(ax)
    shown = None
    for name in record.histogram_names(metric):
        found = _at(record, metric, name, step)
        if found is not None:
            shown, hist = found
            _density_line(ax, hist, label(name, shown))
    ax.set_title(f"{title} (step {shown})" if shown is not None else f"{title}: nothing recorded")
    _legend(ax)
    return fig


def _legend(ax: Axes) -> None:
    """Beside the axes, never over the data."""
    if ax.lines:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def activation_distribution(monitor: ActivationRecord, step: int | None = None, ax: Axes | None = None) -> Figure:
    """D1: one density line per watched layer (the latest step by default), as in the lecture."""

    def label(name: str, s: int) -> str:
        kind = monitor.layer_types.get(name, "?")
        mean, std = _scalar(monitor, "act_mean", name, s), _scalar(monitor, "act_std", name, s)
        saturated = _scalar(monitor, "act_saturated_pct", name, s)
        return f"{name} ({kind}): mean {mean:+.2f}, std {std:.2f}, saturated {saturated:.2f}%"

    return _distribution(monitor, "act", "activation distribution", label, step, ax)


def activation_gradient_distribution(
    monitor: ActivationRecord, step: int | None = None, ax: Axes | None = None
) -> Figure:
    """D2: one density line per watched layer's output gradient."""

    def label(name: str, s: int) -> str:
        kind = monitor.layer_types.get(name, "?")
        mean, std = _scalar(monitor, "act_grad_mean", name, s), _scalar(monitor, "act_grad_std", name, s)
        return f"{name} ({kind}): mean {mean:+.2e}, std {std:.2e}"

    return _distribution(monitor, "act_grad", "activation gradient distribution", label, step, ax)


def weight_gradient_distribution(grad_data: GradDataRecord, step: int | None = None, ax: Axes | None = None) -> Figure:
    """D3: one density line per parameter's gradient, with its shape and grad:data ratio."""

    def label(name: str, s: int) -> str:
        shape = grad_data.param_shapes.get(name, ())
        return f"{name} {tuple(shape)}: grad:data {_scalar(grad_data, 'grad_data_ratio', name, s):.2e}"

    return _distribution(grad_data, "grad", "weight gradient distribution", label, step, ax)


def update_ratio_over_time(update: UpdateRecord, ax: Axes | None = None) -> Figure:
    """D4: log10(update:data) over steps, one line per parameter, and the target as a black line."""
    fig, ax = _axes(ax)
    steps: list[int] = []
    for name in update.names("update_data_log10"):
        xs, ys = zip(*update.points("update_data_log10", name), strict=True)
        ax.plot(xs, ys, label=name)
        steps += [xs[0], xs[-1]]
    if steps:
        ax.plot([min(steps), max(steps)], [update.target, update.target], "k", label=f"target {update.target:g}")
        _legend(ax)
    ax.set_title("update:data ratio, log10")
    ax.set_xlabel("step")
    return fig


def attention_logits_over_time(logits: LogitRecord, ax: Axes | None = None) -> Figure:
    """The largest attention logit of each attention over the steps, on a log scale, with the level above which
    the report warns (the instability suite's unstable runs passed it, its healthy ones never did). Above
    ``MANY_LAYERS`` attentions: the largest, the median and the smallest over them."""
    from lightning_netdiag.rules.instability import ATTN_LOGIT_HIGH

    fig, ax = _axes(ax, figsize=(12, 4))
    if _over_attentions(logits, "attn_logit_max", ax):
        ax.axhline(ATTN_LOGIT_HIGH, color="k", linestyle="--", label=f"{ATTN_LOGIT_HIGH:g}: unstable above")
        ax.set_yscale("log")
        _legend(ax)
    ax.set_title("largest attention logit (pre-softmax)")
    ax.set_xlabel("step")
    return fig


def attention_entropy_over_time(logits: LogitRecord, ax: Axes | None = None) -> Figure:
    """The mean normalised entropy of each attention's softmax over the steps (1: uniform, 0: one-hot), with the
    level below which the report warns when the median over the attentions has fallen there from its first value.
    Above ``MANY_LAYERS`` attentions: the largest, the median and the smallest over them."""
    from lightning_netdiag.rules.instability import ATTN_ENTROPY_LOW

    fig, ax = _axes(ax, figsize=(12, 4))
    if _over_attentions(logits, "attn_entropy", ax):
        ax.axhline(ATTN_ENTROPY_LOW, color="k", linestyle="--", label=f"{ATTN_ENTROPY_LOW:g}: median collapsed below")
        ax.set_ylim(0, 1.05)
        _legend(ax)
    ax.set_title("attention softmax entropy (1: uniform, 0: one-hot)")
    ax.set_xlabel("step")
    return fig


def _over_attentions(logits: LogitRecord, metric: str, ax: Axes) -> bool:
    """Draws ``metric`` of each attention over the steps, or above ``MANY_LAYERS`` attentions its largest, median
    and smallest over them; whether anything was drawn."""
    names = logits.names(metric)
    if len(names) > MANY_LAYERS:
        import statistics

        at = [(s, list(logits.at(metric, s).values())) for s in logits.steps]
        kept = [(s, v) for s, v in at if v]
        for label, f in (("largest", max), ("median", statistics.median), ("smallest", min)):
            ax.plot([s for s, _ in kept], [f(v) for _, v in kept], label=f"{label} of {len(names)} attentions")
    else:
        for name in names:
            xs, ys = zip(*logits.points(metric, name), strict=True)
            ax.plot(xs, ys, label=name + (" (q/k normalised)" if name in logits.qk_norm else ""))
    return bool(ax.lines)


def output_logits_over_time(logits: LogitRecord, ax: Axes | None = None) -> Figure:
    """The output's mean log Z and its largest logit over the steps, with their values at init."""
    fig, ax = _axes(ax, figsize=(12, 4))
    for metric, label in (("output_logz", "mean log Z"), ("output_logit_max", "largest logit")):
        for name in logits.names(metric):
            xs, ys = zip(*logits.points(metric, name), strict=True)
            ax.plot(xs, ys, label=f"{name}: {label}")
    _legend(ax)
    ax.set_title("output logits")
    ax.set_xlabel("step")
    return fig


def distribution_over_time(record: Record, metric: str, name: str, ax: Axes | None = None) -> Figure:
    """A heatmap of one layer's histogram over the recorded steps: each column is a step, normalised."""
    fig, ax = _axes(ax, figsize=(10, 4))
    points = record.histograms_of(metric, name)
    ax.set_title(f"{metric} {name} over time")
    if not points:
        return fig
    bounds = points[0][1].bounds
    used = [i for _, h in points for i, c in enumerate(h.counts) if c > 0]
    lo, hi = min(used), max(used)
    columns = [[c / max(h.total, 1.0) for c in h.counts[lo : hi + 1]] for _, h in points]
    steps = [s for s, _ in points]
    x_edges = [*steps, steps[-1] + (steps[-1] - steps[-2] if len(steps) > 1 else 1)]
    rows = [list(r) for r in zip(*columns, strict=True)]  # bins x steps
    ax.pcolormesh(x_edges, bounds[lo : hi + 2], rows, shading="flat", cmap="viridis")
    if not points[0][1].uniform:
        _symlog(ax, points[0][1], "y")
    ax.set_xlabel("step")
    return fig


#: Above this many layers, overlaid lines are unreadable: heatmaps and a depth profile instead.
MANY_LAYERS = 10


def _family_groups(record: Record, names: list[str]) -> dict[str, list[str]]:
    """Layers by activation family (weights by kind: matrix, conv kernel, ...), in depth order: kinds are
    never mixed on one axis."""
    families: dict[str, Any] = {}
    if isinstance(record, ActivationRecord):
        families = record.layer_families
    elif isinstance(record, ParameterRecord):
        families = record.param_classes
    if not families:
        return {"": names} if names else {}
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(str(families.get(name) or "other"), []).append(name)
    return groups


def _figure(rows: int, height: float) -> tuple[Figure, list[Axes]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, max(height, 3.0)), layout="constrained")
    return fig, list(fig.subplots(rows, 1, squeeze=False)[:, 0])


def _layer_ticks(ax: Axes, names: list[str], axis: str = "y", most: int = 40) -> None:
    """Name the layers on the axis (every k-th one when there are many), their common module path once."""
    parts = [n.split(".") for n in names]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    prefix = ".".join(parts[0][:common]) + "." if common else ""
    every = max(1, -(-len(names) // most))
    ticks = list(range(0, len(names), every))
    labels = [names[i][len(prefix) :] for i in ticks]
    if axis == "y":
        ax.set_yticks([t + 0.5 for t in ticks], labels, fontsize="x-small")
        ax.invert_yaxis()  # the input side on top
        ax.set_ylabel(f"{prefix}… (depth)" if prefix else "depth", fontsize="small")
    else:
        ax.set_xticks(ticks, labels, fontsize="x-small", rotation=90)
        ax.set_xlabel(f"{prefix}… (depth)" if prefix else "depth", fontsize="small")


def layers_by_bins(record: Record, metric: str, title: str, step: int | None = None) -> Figure:
    """Every layer's histogram at one step (the latest by default) as a row of a heatmap, layers in depth
    order; one panel per activation family (each has its own bins), colour = fraction of the layer's values."""
    groups = _family_groups(record, record.histogram_names(metric))
    total_rows = sum(len(g) for g in groups.values())
    fig, axes = _figure(len(groups), 0.9 + 0.16 * total_rows + 0.6 * len(groups))
    for ax, (family, names) in zip(axes, groups.items(), strict=True):
        found: list[tuple[str, int, Histogram]] = []
        for n in names:
            at = _at(record, metric, n, step)
            if at is not None and at[1].total > 0:
                found.append((n, *at))
        if not found:
            continue
        used = [i for _, _, h in found for i, c in enumerate(h.counts) if c > 0]
        lo, hi = min(used), max(used)
        first = found[0][2]
        rows = [[c / h.total for c in h.counts[lo : hi + 1]] for _, _, h in found]
        mesh = ax.pcolormesh(first.bounds[lo : hi + 2], range(len(rows) + 1), rows, cmap="viridis", shading="flat")
        if not first.uniform:
            _symlog(ax, first, "x")
        _layer_ticks(ax, [n for n, _, _ in found])
        ax.set_title(f"{title}{f' ({family})' if family else ''}, step {found[0][1]}: {len(found)} layers")
        fig.colorbar(mesh, ax=ax, label="fraction of values")
    return fig


def layers_by_steps(record: Record, metric: str, title: str, log: bool = False, center: float | None = None) -> Figure:
    """A statistic of every layer over the recorded steps: layers (depth order) x steps, one panel per family."""
    import math

    names = record.names(metric)
    groups = _family_groups(record, names)
    fig, axes = _figure(len(groups), 0.9 + 0.16 * len(names) + 0.6 * len(groups))
    for ax, (family, members) in zip(axes, groups.items(), strict=True):
        series = {n: dict(record.points(metric, n)) for n in members}
        steps = sorted({s for points in series.values() for s in points})
        if not steps:
            continue
        nan = float("nan")
        rows = [[series[n].get(s, nan) for s in steps] for n in members]
        if log:
            rows = [[math.log10(v) if v > 0 else nan for v in row] for row in rows]
        kw: dict[str, Any] = {"cmap": "viridis"}
        if center is not None:
            finite = [abs(v - center) for row in rows for v in row if math.isfinite(v)]
            spread = max(finite, default=1.0) or 1.0
            kw = {"cmap": "RdBu_r", "vmin": center - spread, "vmax": center + spread}
        x_edges = [*steps, steps[-1] + (steps[-1] - steps[-2] if len(steps) > 1 else 1)]
        mesh = ax.pcolormesh(x_edges, range(len(members) + 1), rows, shading="flat", **kw)
        _layer_ticks(ax, members)
        ax.set_xlabel("step")
        ax.set_title(f"{title}{f' ({family})' if family else ''}: {len(members)} layers")
        fig.colorbar(mesh, ax=ax, label=f"log10 {metric}" if log else metric)
    return fig


def flight_window(flight: FlightRecord, event: Event | None = None, ax: Axes | None = None) -> Figure:
    """The flight recorder's window around ``event`` (default: the first event, else the latest steps): each
    weight's gradient norm (weights by depth, one row each) at every step, as decades above or below its own median
    over the window, with the event's step marked, and the loss above it."""
    import math

    names = flight.names("flight_grad_norm")
    event = event if event is not None else next(iter(flight.events), None)
    steps = flight.steps
    if event is not None:  # the steps of the window that held it
        steps = [s for s in steps if event["step"] - flight.window < s <= event["step"] + flight.window // 4]
    if ax is None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(14, 3 + 0.18 * len(names)), layout="constrained")
        top, ax = fig.subplots(2, 1, sharex=True, height_ratios=[1, 3])
    else:
        fig, top = ax.figure, None  # type: ignore[assignment]
    rows = []
    for name in names:
        series = dict(flight.points("flight_grad_norm", name))
        logs = [math.log10(series[s]) if series.get(s, 0) > 0 else math.nan for s in steps]
        finite = sorted(v for v in logs if math.isfinite(v))
        middle = finite[len(finite) // 2] if finite else 0.0
        rows.append([v - middle for v in logs])
    if steps and names:
        x_edges = [s - 0.5 for s in steps] + [steps[-1] + 0.5]
        spread = max((abs(v) for row in rows for v in row if math.isfinite(v)), default=1.0) or 1.0
        kw: dict[str, Any] = {"shading": "flat", "cmap": "RdBu_r", "vmin": -spread, "vmax": spread}
        mesh = ax.pcolormesh(x_edges, range(len(names) + 1), rows, **kw)
        _layer_ticks(ax, names)
        fig.colorbar(mesh, ax=ax, label="log10 gradient norm / its median")
    ax.set_xlabel("step")
    title = "flight recorder: gradient norm per weight"
    if event is not None:
        ax.axvline(event["step"], color="black", linestyle="--", linewidth=1)
        when = (
            "stopped after" if stopped(event)
            else "ended by an exception after" if event["cause"] == "exception" else f"{event['cause']} at"
        )  # fmt: skip
        title += f"; {when} step {event['step']}"
    ax.set_title(title)
    # the other events in this window, lighter
    others = [e["step"] for e in flight.events if e is not event and steps and steps[0] <= e["step"] <= steps[-1]]
    for axes in (ax, top) if top is not None else (ax,):
        for step in others:
            axes.axvline(step, color="gray", linestyle=":", linewidth=1)
    if top is not None:
        loss = [(s, v) for s, v in flight.points("flight_loss") if s in set(steps)]
        if loss:
            top.plot(*zip(*loss, strict=True), color="black", linewidth=1)
            top.set_ylabel("loss")
        if event is not None:
            top.axvline(event["step"], color="black", linestyle="--", linewidth=1)
    return fig


#: The most windows of the flight recorder drawn: its first event's, and later events' beyond the windows before.
FLIGHT_WINDOWS = 4


def _later_windows(flight: FlightRecord) -> list[Event]:
    """The events after the first whose step lies beyond the window drawn for the one before (up to
    :data:`FLIGHT_WINDOWS` windows in all): each is drawn in a window of its own."""
    drawn = flight.events[:1]
    for event in flight.events[1:]:
        if len(drawn) < FLIGHT_WINDOWS and event["step"] > drawn[-1]["step"] + flight.window // 4:
            drawn.append(event)
    return drawn[1:]


def depth_profile(
    saturation: ActivationRecord | None = None,
    grad_data: GradDataRecord | None = None,
    update: UpdateRecord | None = None,
) -> Figure:
    """Each D1-D4 statistic against layer depth at the first recorded step, midway and the latest: vanishing
    gradients and signal propagation at a glance. Activation statistics get one panel per family."""
    panels: list[tuple[Record, str, str, bool]] = []
    for given, metric, label, log in (
        (saturation, "act_std", "D1 activation std", False),
        (saturation, "act_saturated_pct", "D1 saturated %", False),
        (saturation, "act_grad_std", "D2 activation-gradient std", True),
        (grad_data, "grad_data_ratio", "D3 grad:data", True),
        (update, "update_data_log10", "D4 update:data, log10", False),
    ):
        if given is not None:
            panels.append((given, metric, label, log))
    rows = []
    for cb, metric, label, log in panels:
        groups = _family_groups(cb, cb.names(metric))
        rows += [(cb, metric, label, log, fam, members) for fam, members in groups.items()]
    fig, axes = _figure(max(len(rows), 1), 3.2 * max(len(rows), 1))
    for ax, (cb, metric, label, log, family, members) in zip(axes, rows, strict=False):
        series = [dict(cb.points(metric, n)) for n in members]
        steps = sorted({s for points in series for s in points})
        chosen = sorted({steps[0], steps[len(steps) // 2], steps[-1]})
        for step, style in zip(chosen, ("o:", "s--", "^-"), strict=False):
            ax.plot(range(len(members)), [p.get(step, float("nan")) for p in series], style, ms=3, label=f"step {step}")
        if log:
            ax.set_yscale("log")
        if isinstance(cb, UpdateRecord) and metric == "update_data_log10":
            ax.axhline(cb.target, color="k", lw=0.8)
        ax.set_title(f"{label}{f' ({family})' if family else ''} by depth")
        _layer_ticks(ax, members, axis="x")
        _legend(ax)
    return fig


def draw_all(
    saturation: ActivationRecord | None = None,
    grad_data: GradDataRecord | None = None,
    update: UpdateRecord | None = None,
    logits: LogitRecord | None = None,
    optimizer: OptimizerRecord | None = None,
    flight: FlightRecord | None = None,
) -> dict[str, Figure]:
    """Every plot the given records have data for, by name: the lecture's plots up to ``MANY_LAYERS``
    layers; above, heatmaps (layers in depth order) and the depth profile; the flight recorder's window around
    its first event (or its latest steps), and ``flight_{step}`` around a later event beyond it."""
    layers = saturation.histogram_names("act") if saturation is not None else []
    weights = grad_data.histogram_names("grad") if grad_data is not None else []
    many = max(len(layers), len(weights)) > MANY_LAYERS
    figures: dict[str, Figure] = {}
    if saturation is not None and saturation.has_histograms():
        if many:
            figures["activations"] = layers_by_bins(saturation, "act", "activation distribution")
            if saturation.histogram_names("act_grad"):
                figures["activation_gradients"] = layers_by_bins(saturation, "act_grad", "activation gradients")
            figures["activations_over_time"] = layers_by_steps(saturation, "act_saturated_pct", "saturated % over time")
        else:
            figures["activations"] = activation_distribution(saturation)
            if saturation.histogram_names("act_grad"):
                figures["activation_gradients"] = activation_gradient_distribution(saturation)
            from matplotlib.figure import Figure

            fig = Figure(figsize=(10, 2.5 * len(layers)), layout="constrained")
            for layer, ax in zip(layers, fig.subplots(len(layers), 1, squeeze=False)[:, 0], strict=True):
                distribution_over_time(saturation, "act", layer, ax=ax)
            figures["activations_over_time"] = fig
    if grad_data is not None and grad_data.has_histograms():
        many_weights = len(weights) > MANY_LAYERS
        figures["weight_gradients"] = (
            layers_by_bins(grad_data, "grad", "weight gradients")
            if many_weights
            else weight_gradient_distribution(grad_data)
        )
    if update is not None and len(update.series):
        figures["update_ratio"] = (
            layers_by_steps(update, "update_data_log10", "update:data, log10", center=update.target)
            if len(update.names("update_data_log10")) > MANY_LAYERS
            else update_ratio_over_time(update)
        )
    if many:
        figures["depth_profile"] = depth_profile(saturation, grad_data, update)
    if logits is not None and logits.names("attn_logit_max"):
        figures["attention_logits"] = attention_logits_over_time(logits)
    if logits is not None and logits.names("attn_entropy"):
        figures["attention_entropy"] = attention_entropy_over_time(logits)
    if logits is not None and logits.names("output_logz"):
        figures["output_logits"] = output_logits_over_time(logits)
    if optimizer is not None and optimizer.names("adam_step_rms"):
        figures["adam_step"] = layers_by_steps(optimizer, "adam_step_rms", "Adam: normalised step RMS", log=True)
    if flight is not None and flight.names("flight_grad_norm"):
        figures["flight"] = flight_window(flight)
        for event in _later_windows(flight):
            figures[f"flight_{event['step']}"] = flight_window(flight, event)
    return figures
