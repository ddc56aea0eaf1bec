"""D1 and D2: the activation meter. It owns the activation hooks and turns their records into a measurement.

It lives at the moments of the meters' one lifecycle (:class:`~lightning_netdiag.meters.Meter`):
:meth:`~ActivationMeter.forward_starts` before each forward of the step (with the step's number, or None when the
step is not measured), :meth:`~ActivationMeter.backward_starts` and :meth:`~ActivationMeter.backward_ends` around
its backward, :meth:`~ActivationMeter.before_step` before the optimizer step.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_netdiag import activations, stats
from lightning_netdiag.capture import ActivationHooks, Layer, OutputProbe, compiled, own_work
from lightning_netdiag.dist import rank_zero_warn
from lightning_netdiag.meters.base import InRecord, Meter
from lightning_netdiag.record import ActivationRecord, Key
from lightning_netdiag.run import Run, check_positive_int
from lightning_netdiag.select import check_selection, matches

__all__ = ["LOSS_WINDOW", "ActivationMeter"]

#: The most steps whose losses are held (one scalar tensor each, on the device): the median logged at a measured step
#: is over its last ``every_n_steps`` steps, at most ``LOSS_WINDOW``.
LOSS_WINDOW = 1_000


class ActivationMeter(Meter):
    """D1 and D2: the watched activation layers' outputs and the gradients that reach them.

    See :class:`lightning_netdiag.SaturationMonitor` for the arguments, what is watched and what is logged.
    """

    record_type = ActivationRecord
    watches_forward = True
    record: ActivationRecord
    # what was watched, kept in the record (see ActivationRecord)
    threshold = InRecord()
    layer_types = InRecord()
    layer_kinds = InRecord()
    layer_families = InRecord()
    layer_regions = InRecord()
    layers_in_loop = InRecord()
    layer_sizes = InRecord()

    def __init__(
        self,
        modules: Sequence[type | str] | None = None,
        exclude: Sequence[type | str] = (),
        threshold: float = stats.DEFAULT_THRESHOLD,
        track_grad: bool = True,
        unit_dim: int | None = None,
        functional: bool = True,
        max_calls: int = 16,
        histograms: bool = True,
        prefix: str = "netdiag",
        history_size: int = 10_000,
    ) -> None:
        super().__init__(prefix, history_size)
        self.modules = None if modules is None else check_selection("modules", modules)
        self.exclude = check_selection("exclude", exclude)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
            raise ValueError(f"Expected `threshold` to be a number in (0, 1), got {threshold!r}")
        if unit_dim is not None and (isinstance(unit_dim, bool) or not isinstance(unit_dim, int)):
            raise ValueError(f"Expected `unit_dim` to be an int or None, got {unit_dim!r}")
        check_positive_int("max_calls", max_calls)
        self.threshold = float(threshold)
        self.track_grad = bool(track_grad)
        self.unit_dim = unit_dim
        self.functional = bool(functional)
        self.max_calls = max_calls
        self.histograms = bool(histograms)
        self._hooks: ActivationHooks | None = None
        self._probe: OutputProbe | None = None  # the output at step 0 (the network at initialisation)
        self._model: nn.Module | None = None
        self._records_step: int | None = None
        self._pending = False
        self._units: tuple[tuple[str, ...], list[int]] | None = None  # the layers they were agreed for
        self._warned_empty = False
        # The losses of the last steps (a tuple of its micro-batches' per step), and those of the step running: the
        # median of the last every_n_steps is logged at a measured step (the report's diverged loss).
        self._window: deque[tuple[Tensor, ...]] = deque()
        self._micro: list[Tensor] = []

    def attach(self, model: nn.Module, run: Run, optimizers: Sequence[Any] = ()) -> None:
        """Select the layers of ``model`` to watch and register the hooks, before its first forward."""
        self.detach()
        self.run, self._model = run, model
        chosen, known = [], []
        for name, m in model.named_modules():
            kind = activations.module_kind(m)
            if kind is not None:
                known.append(m)
            wanted = kind is not None if self.modules is None else matches(name, m, self.modules)
            if wanted and not matches(name, m, self.exclude):
                chosen.append((name, m, kind or activations.UNKNOWN))
        functional = self.functional
        is_compiled = compiled(model)
        if functional and is_compiled:
            functional = False
            rank_zero_warn(
                f"{type(self).__name__}: the model runs under torch.compile, where watching functional activation "
                "calls (F.relu, torch.tanh, ...) would break the graph; only activation modules are watched."
            )
        if not chosen and not functional:
            self._warn_nothing_selected(model, f"activation modules (looked for: modules={_names(self.modules)})")
            return
        # The output at step 0 with the default selection only; never around a compiled forward, whose graph a
        # global hook would break as the function mode would.
        self._probe = OutputProbe() if self.modules is None and not is_compiled else None
        self._hooks = ActivationHooks(
            model,
            chosen,
            self._watch_call if functional else None,
            self.threshold,
            self.histograms,
            self.track_grad,
            self.unit_dim,
            grad_divisor=self._grad_divisor,
            max_calls=self.max_calls,
            activation_modules=known,
            persistent=is_compiled,
        )
        self._describe_layers(self._hooks.layers)

    def _watch_call(self, owner_name: str, owner: nn.Module, name: str) -> bool:
        if self.modules is not None and not (
            matches(name, owner, self.modules) or matches(owner_name, owner, self.modules)
        ):
            return False
        return not (matches(name, owner, self.exclude) or matches(owner_name, owner, self.exclude))

    def _grad_divisor(self) -> Tensor | float | None:
        """An output gradient as backward sees it is the loss-scaled gradient of this rank's loss; under data
        parallelism the optimized loss is the mean over ranks, so it is ``world_size`` times that loss's."""
        scale = None if self.run is None else self.run.loss_scale()
        world = self._world()
        if scale is None:
            return world if world > 1 else None
        return scale * world

    def detach(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
        if self._probe is not None:
            self._probe.stop()
        self._hooks = self._probe = None
        self._records_step = self._units = None
        self._pending = False
        self._window.clear()
        self._micro = []

    def step_starts(self, step: int, measured: int | None) -> None:
        """A step begins: the losses of the step before it join the window."""
        self._close_step()

    def _close_step(self) -> None:
        """The losses of the step under way join the window, which holds the last ``every_n_steps`` steps only (at
        most :data:`LOSS_WINDOW`)."""
        if self._micro:
            self._window.append(tuple(self._micro))
            self._micro = []
            if len(self._window) > min(self.record.every_n_steps or LOSS_WINDOW, LOSS_WINDOW):
                self._window.popleft()

    def add_loss(self, loss: Tensor) -> None:
        """A micro-batch's loss, held (a step between reads nothing: no kernel) until the next measured step."""
        if self._hooks is not None:
            with own_work():  # a user's function mode sees only the model's calls
                self._micro.append(loss.detach())

    def forward_starts(self, measured: int | None, device: torch.device | None) -> None:
        """A forward of a training step begins: ``measured`` is the step's number if it is measured, else None.

        Every forward of a measured step adds to its records (accumulation); they are zeroed at the first
        forward of the step, so that the records of a step that never reached an optimizer step are dropped.
        """
        if self._hooks is None:
            return
        if measured != self._records_step:
            self._records_step = measured
            if device is not None:  # given where the step is measured
                self._hooks.prepare(device)
            if self._probe is not None:
                self._probe.reset()
        self._pending = measured is not None
        if self._pending:
            self._hooks.start()
            if measured == 0 and self._probe is not None and self._model is not None:
                self._probe.start(self._model)

    @property
    def needs_loss(self) -> bool:
        """Whether :meth:`backward_starts` wants the loss: only until the output at init is recorded."""
        return self._probe is not None

    def backward_starts(self, loss: Tensor | None) -> None:
        """A backward starts; ``loss``: the loss it starts from, unscaled and not divided for accumulation
        (None when the front end cannot see it: the output at init is then recorded without it)."""
        if self._hooks is not None:
            self._hooks.backward()
        if self._probe is not None:
            self._probe.backward(loss)

    def forget_loss(self) -> None:
        """Drop the losses recorded for the output at init (they were not the step's whole loss)."""
        if self._probe is not None:
            self._probe.forget_loss()

    def manual_step(self, loss: Tensor | None, lr: float | None) -> None:
        """The loss of the step, told after its backward (the plain loop's ``step(loss)``)."""
        if self._probe is not None and loss is not None:
            self._probe.add_loss(loss.detach())

    def backward_ends(self) -> None:
        if self._hooks is not None:
            self._hooks.backward_done()

    def pause(self) -> None:
        """The training batch ended: nothing after it (validation) is recorded."""
        if self._hooks is not None:
            self._hooks.stop()
        if self._probe is not None:
            self._probe.stop()

    def before_step(self, optimizer: Any | None) -> None:
        """Just before the optimizer step of a measured step: reduce, describe and emit its records."""
        hooks, step = self._hooks, self._records_step
        if hooks is None or step is None or not self._pending:
            return
        with own_work():
            self._pending = False
            hooks.stop()
            layers = self._layout(hooks)
            if not layers:
                if not self._warned_empty and self._model is not None:
                    self._warned_empty = True
                    self._warn_nothing_selected(
                        self._model,
                        f"activation modules (looked for: modules={_names(self.modules)}) and no functional "
                        "activation calls",
                    )
                return
            # Every layer has a record of fixed size on every rank, zeros where it did not run, so that the
            # ranks' sums line up; only the per-unit counts are sized by the layer's first run.
            units = self._unit_counts(layers)
            parts: list[Tensor] = []
            for layer, n in zip(layers, units, strict=True):
                act: Tensor = layer.act  # type: ignore[assignment]
                alive = act.new_zeros(n) if layer.alive is None else layer.alive
                parts += [act, alive, act.new_zeros(0) if layer.grad is None else layer.grad]
            window_at = len(parts)  # the window's losses, after the layers' records
            window, per_step = self._take_losses(layers[0].act)  # type: ignore[arg-type]
            parts.append(window)
            probe = self._probe
            output = probe.record if probe is not None and probe.name is not None and step == 0 else None
            if output is not None:
                parts.append(output)
            values = self._summed(parts, across=self._world() > 1)  # every rank arrives here at the same step
            hooks.reset()
            self._describe_layers(layers)
            scalars: dict[Key, float] = {}
            histograms: dict[Key, stats.Histogram] = {}
            for i in sorted(range(len(layers)), key=lambda i: layers[i].depth):
                act_record, alive_counts, grad_record = values[3 * i : 3 * i + 3]
                if stats.recorded(act_record):
                    if layers[i].name not in self.layer_sizes:  # its first measured step's, kept
                        self.layer_sizes[layers[i].name] = act_record[stats.COUNT] + act_record[stats.NONFINITE]
                    self._describe(layers[i], act_record, alive_counts, grad_record, scalars, histograms)
            means, at = [], 0  # each step's mean over its micro-batches and the ranks
            for n in per_step:
                means.append(sum(values[window_at][at : at + n]) / (n * self._world()))
                at += n
            finite = [x for x in means if math.isfinite(x)]
            if finite:
                scalars[("loss_median", "")] = statistics.median(finite)
            if output is not None and probe is not None and probe.name is not None:
                rows, excess, cells, losses, loss = values[-1][:5]
                scalars[("init_output_ce", probe.name)] = excess / rows
                scalars[("init_output_classes", probe.name)] = cells / rows
                if losses:
                    scalars[("init_loss", "")] = loss / losses
            if probe is not None:  # it reads step 0 only: nothing of it runs after the first measured step
                probe.stop()
                self._probe = None
            self._emit(step, scalars, histograms)

    def _take_losses(self, like: Tensor) -> tuple[Tensor, list[int]]:
        """The micro-batches' losses of the last ``every_n_steps`` steps (this one's included), in float64 and one
        stack (empty: none seen), and how many each step had (its loss: their mean, taken on the host). A rolling
        window, not the steps since the last measured step: a step measured on request (after an event) reads as
        many steps as the others. Every rank holds as many: their sums line up."""
        self._close_step()
        losses = [x for step in self._window for x in step]
        if not losses:
            return like.new_zeros(0, dtype=torch.float64), []
        with torch.no_grad():
            stacked = torch.stack([x.reshape(()) if x.numel() == 1 else x.mean() for x in losses]).double()
        return stacked, [len(step) for step in self._window]

    def _layout(self, hooks: ActivationHooks) -> list[Layer]:
        """The layers in an order every rank shares. Layers are found as they run, and a rank may run a call
        that another does not: then every rank takes the union, holding zeros for the layers it never ran."""
        if self._world() == 1:
            return list(hooks.layers)
        for spec in self._union({layer.name: layer.spec() for layer in hooks.layers}).values():
            hooks.adopt(spec)
        return sorted(hooks.layers, key=lambda layer: layer.name)

    def _describe_layers(self, layers: Sequence[Layer]) -> None:
        for layer in sorted(layers, key=lambda layer: layer.depth):
            self.layer_types[layer.name] = layer.type_name
            self.layer_kinds[layer.name] = layer.kind.name
            self.layer_families[layer.name] = layer.kind.family
            self.layer_regions[layer.name] = layer.rule.region if layer.rule is not None else ""
            if layer.in_loop:
                self.layers_in_loop.add(layer.name)

    def _unit_counts(self, layers: list[Layer]) -> list[int]:
        """Per layer, the length of its per-unit counts: the same on every rank, 0 where no rank ran it yet."""
        local = [0 if layer.alive is None else layer.alive.numel() for layer in layers]
        names = tuple(layer.name for layer in layers)
        if self._world() == 1:
            return local
        if self._units is not None and self._units[0] == names:
            return self._units[1]
        run: Run = self.run  # type: ignore[assignment]
        counts = run.reduce(torch.tensor(local, device=run.device), "max")
        units = [int(n) for n in counts.tolist()]
        if all(units[i] for i, layer in enumerate(layers) if layer.has_rule):
            self._units = (names, units)  # known everywhere for these layers: no more collectives for it
        return units

    def _describe(
        self,
        layer: Layer,
        act: list[float],
        alive: list[float],
        grad: list[float],
        scalars: dict[Key, float],
        histograms: dict[Key, stats.Histogram],
    ) -> None:
        name, has_rule = layer.name, layer.has_rule
        m = stats.Moments.of(act)
        scalars[("act_mean", name)] = m.mean
        scalars[("act_std", name)] = m.std
        scalars[("act_nonfinite", name)] = m.nonfinite
        if has_rule and alive:
            scalars[("act_saturated_pct", name)] = 100 * act[stats.MOMENTS] / m.count if m.count else float("nan")
            scalars[("act_dead_pct", name)] = 100 * sum(a == 0 for a in alive) / len(alive)
        if self.histograms:
            histograms[("act", name)] = stats.Histogram.of(act, layer.act_bins.edges, extra=int(has_rule))
        if grad and stats.recorded(grad):
            g = stats.Moments.of(grad)
            scalars[("act_grad_mean", name)] = g.mean
            scalars[("act_grad_std", name)] = g.std
            scalars[("act_grad_nonfinite", name)] = g.nonfinite
            half, tiny = grad[stats.MOMENTS : stats.MOMENTS + stats.HALF_EXTRA]
            if half > 0:
                scalars[("act_grad_fp16_tiny_pct", name)] = 100 * tiny / half
            if self.histograms:
                histograms[("act_grad", name)] = stats.Histogram.of(grad, layer.grad_bins.edges, extra=stats.HALF_EXTRA)


def _names(selection: Sequence[type | str] | None) -> str:
    if selection is None:
        return "every activation"
    return "[" + ", ".join(s if isinstance(s, str) else s.__name__ for s in selection) + "]"
