"""The lecture's four plots, and each layer's distribution over time, drawn from what the callbacks kept.

Every function takes the callback that recorded the data (its ``history`` holds scalars and histogram
counts over fixed edges, so no raw tensor is needed), draws on ``ax`` or on a new figure, and returns the
figure. matplotlib is imported only when a plot is drawn; no pyplot state is touched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_netdiag.stats import Histogram

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _axes(ax: Axes | None, figsize: tuple[float, float] = (20, 4)) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax  # type: ignore[return-value]
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _names(callback: Any, metric: str) -> list[str]:
    """The layer or parameter names that have a ``metric`` histogram, in the order they were watched."""
    head = f"{callback.prefix}/{metric}/"
    return [tag[len(head) :] for tag in callback.history.histograms if tag.startswith(head)]


def _at(callback: Any, metric: str, name: str, step: int | None) -> tuple[int, Histogram] | None:
    points = callback.history.histograms.get(f"{callback.prefix}/{metric}/{name}", [])
    if step is None:
        return points[-1] if points else None
    return next(((s, h) for s, h in points if s == step), None)


def _scalar(callback: Any, metric: str, name: str, step: int) -> float:
    return dict(callback.history.get(f"{callback.prefix}/{metric}/{name}", [])).get(step, float("nan"))


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


def _distribution(callback: Any, metric: str, title: str, label: Any, step: int | None, ax: Axes | None) -> Figure:
    fig, ax = _axes(ax)
    shown = None
    for name in _names(callback, metric):
        found = _at(callback, metric, name, step)
        if found is not None:
            shown, hist = found
            _density_line(ax, hist, label(name, shown))
    ax.set_title(f"{title} (step {shown})" if shown is not None else f"{title}: nothing recorded")
    if ax.lines:
        ax.legend(fontsize="small")
    return fig


def activation_distribution(monitor: Any, step: int | None = None, ax: Axes | None = None) -> Figure:
    """D1: one density line per watched layer (the latest step by default), as in the lecture."""

    def label(name: str, s: int) -> str:
        kind = monitor.layer_types.get(name, "?")
        mean, std = _scalar(monitor, "act_mean", name, s), _scalar(monitor, "act_std", name, s)
        saturated = _scalar(monitor, "act_saturated_pct", name, s)
        return f"{name} ({kind}): mean {mean:+.2f}, std {std:.2f}, saturated {saturated:.2f}%"

    return _distribution(monitor, "act", "activation distribution", label, step, ax)


def activation_gradient_distribution(monitor: Any, step: int | None = None, ax: Axes | None = None) -> Figure:
    """D2: one density line per watched layer's output gradient."""

    def label(name: str, s: int) -> str:
        kind = monitor.layer_types.get(name, "?")
        mean, std = _scalar(monitor, "act_grad_mean", name, s), _scalar(monitor, "act_grad_std", name, s)
        return f"{name} ({kind}): mean {mean:+.2e}, std {std:.2e}"

    return _distribution(monitor, "act_grad", "activation gradient distribution", label, step, ax)


def weight_gradient_distribution(grad_data: Any, step: int | None = None, ax: Axes | None = None) -> Figure:
    """D3: one density line per parameter's gradient, with its shape and grad:data ratio."""

    def label(name: str, s: int) -> str:
        shape = grad_data.param_shapes.get(name, ())
        return f"{name} {tuple(shape)}: grad:data {_scalar(grad_data, 'grad_data_ratio', name, s):.2e}"

    return _distribution(grad_data, "grad", "weight gradient distribution", label, step, ax)


def update_ratio_over_time(update: Any, ax: Axes | None = None) -> Figure:
    """D4: log10(update:data) over steps, one line per parameter, and the target as a black line."""
    fig, ax = _axes(ax)
    head = f"{update.prefix}/update_data_log10/"
    steps: list[int] = []
    for tag, points in update.history.items():
        if tag.startswith(head) and not tag.endswith("/_target"):
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, label=tag[len(head) :])
            steps += [xs[0], xs[-1]]
    if steps:
        ax.plot([min(steps), max(steps)], [update.target, update.target], "k", label=f"target {update.target:g}")
        ax.legend(fontsize="small")
    ax.set_title("update:data ratio, log10")
    ax.set_xlabel("step")
    return fig


def distribution_over_time(callback: Any, metric: str, name: str, ax: Axes | None = None) -> Figure:
    """A heatmap of one layer's histogram over the recorded steps: each column is a step, normalised."""
    fig, ax = _axes(ax, figsize=(10, 4))
    points = callback.history.histograms.get(f"{callback.prefix}/{metric}/{name}", [])
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


def draw_all(saturation: Any = None, grad_data: Any = None, update: Any = None) -> dict[str, Figure]:
    """Every plot the given callbacks have data for, by name."""
    figures: dict[str, Figure] = {}
    if saturation is not None and saturation.history.histograms:
        figures["activations"] = activation_distribution(saturation)
        if _names(saturation, "act_grad"):
            figures["activation_gradients"] = activation_gradient_distribution(saturation)
        layers = _names(saturation, "act")
        from matplotlib.figure import Figure

        fig = Figure(figsize=(10, 2.5 * len(layers)), layout="constrained")
        for layer, ax in zip(layers, fig.subplots(len(layers), 1, squeeze=False)[:, 0], strict=True):
            distribution_over_time(saturation, "act", layer, ax=ax)
        figures["activations_over_time"] = fig
    if grad_data is not None and grad_data.history.histograms:
        figures["weight_gradients"] = weight_gradient_distribution(grad_data)
    if update is not None and len(update.history):
        figures["update_ratio"] = update_ratio_over_time(update)
    return figures
