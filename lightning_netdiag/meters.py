"""The four diagnostics as meters: each owns its hooks and records and turns them into a measurement.

Pure torch, no Lightning. A meter knows *what* to measure; a front end (the Lightning callbacks, the plain
loop of :mod:`lightning_netdiag.loop`, the Hugging Face callback) decides *when*, by calling its methods at
the right moments of a training step, and hands it a :class:`Run`: what the meter needs from the loop it is
attached to (the ranks, the AMP loss scale, where the numbers go). Every formula is here, once.

A step's life, as the front ends drive it:

- :meth:`ActivationMeter.arm` before each forward of the step (with the step's number, or None when the
  step is not measured); :meth:`ActivationMeter.backward` when a backward starts; :meth:`ActivationMeter.
  backward_done` when it ends; :meth:`ActivationMeter.flush` before the optimizer step (D1, D2);
- :meth:`ParameterMeter.begin` with the step's number; :meth:`GradDataMeter.measure` before the optimizer
  step (D3); :meth:`UpdateMeter.snapshot` before it and :meth:`UpdateMeter.measure` after it (D4).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_netdiag import activations, stats, tags
from lightning_netdiag.capture import (
    WEIGHT_NDIMS,
    ActivationHooks,
    Layer,
    OutputProbe,
    check_selection,
    compiled,
    is_sharded,
    local_shard,
    matches,
    select_parameters,
    weight_class,
)
from lightning_netdiag.dist import host, rank_zero_warn, split
from lightning_netdiag.history import History, finite_only

#: The lecture's rule of thumb: updates about 1/1000 of the data.
DEFAULT_TARGET = -3.0


class Run(Protocol):
    """What a meter needs from the training loop it is attached to; each front end provides one."""

    @property
    def world_size(self) -> int:
        """The number of data-parallel ranks (1 in a single process)."""

    @property
    def device(self) -> torch.device:
        """Where this rank's collectives run."""

    def reduce(self, t: Tensor, op: str) -> Tensor:
        """``t`` summed (``op="sum"``) or maxed (``"max"``) over the ranks; every rank calls it alike."""

    def loss_scale(self) -> Tensor | float | None:
        """The AMP GradScaler's current scale, or None when the gradients are not scaled."""

    def emit(
        self,
        step: int,
        scalars: Mapping[str, float],
        histograms: Mapping[str, stats.Histogram],
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        """Send one meter's measurement of one step to the loggers, with what it watches (``meta``, see
        :meth:`Meter.describe`) when that changed."""


class TorchRun:
    """A :class:`Run` over ``torch.distributed`` (when initialised) for the front ends without a Trainer.

    Args:
        emit: where measurements go (the front end's loggers), or None to keep them in the history only.
        scaler: the AMP GradScaler that scales the loss, if any.
        device: where collectives run; None: CUDA's current device under NCCL, the CPU otherwise.
    """

    def __init__(
        self,
        emit: Callable[..., None] | None = None,
        scaler: Any = None,
        device: torch.device | None = None,
    ) -> None:
        self._emit, self.scaler, self._device = emit, scaler, device

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def device(self) -> torch.device:
        if self._device is not None:
            return self._device
        nccl = self.world_size > 1 and dist.get_backend() == "nccl"
        return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def reduce(self, t: Tensor, op: str) -> Tensor:
        if self.world_size == 1:
            return t
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return out

    def loss_scale(self) -> Tensor | float | None:
        return scaler_scale(self.scaler)

    def emit(
        self,
        step: int,
        scalars: Mapping[str, float],
        histograms: Mapping[str, stats.Histogram],
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        if self._emit is not None:
            self._emit(step, scalars, histograms, meta)


def scaler_scale(scaler: Any) -> Tensor | float | None:
    """A GradScaler's current scale, or None when there is none or it is off (fp32, bf16).

    Read from the scaler's scale tensor where it has one, so that no host synchronisation happens.
    """
    if scaler is None or not scaler.is_enabled():
        return None
    scale = getattr(scaler, "_scale", None)
    return scale if isinstance(scale, Tensor) else scaler.get_scale()


def check_positive_int(name: str, value: object, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive integer, got {value!r}")


def optimizer_family(optimizer: Any) -> str | None:
    """``"sgd"`` (an SGD step, with or without momentum: the update follows ``lr * grad``), ``"adam"`` (the
    Adam kin: each element's step is normalised, about ``lr`` at first), or None (another kind: the report
    does not judge its learning rate). By class name, so that other libraries' Adams count too."""
    names = [cls.__name__ for cls in type(optimizer).__mro__]
    if any("Adam" in n for n in names):
        return "adam"
    return "sgd" if "SGD" in names else None


class Meter:
    """Base of the meters: the tag prefix, the history, where measurements go. Not for use on its own.

    ``kind`` names the diagnostic (``"saturation"``, ``"grad_data"``, ``"update"``): the views and the
    ``netdiag`` command find a meter's measurements by it.

    Args:
        prefix: the first part of every tag.
        history_size: the number of points kept in ``history`` per tag.
    """

    def __init__(self, prefix: str, history_size: int) -> None:
        check_positive_int("history_size", history_size)
        if not isinstance(prefix, str) or not prefix or prefix.strip("/") != prefix:
            raise ValueError(
                f"Expected `prefix` to be a non-empty string without leading or trailing '/', got {prefix!r}"
            )
        self.prefix = prefix
        self.history = History(history_size)
        self.run: Run | None = None
        self._described: dict[str, Any] | None = None

    kind = ""

    def describe(self) -> dict[str, Any]:
        """What the views need besides the numbers (activation kinds, weight classes, the optimizer's
        family), as JSON-able values: logged beside the numbers, so that finished runs' logs carry it."""
        return {"kind": self.kind, "prefix": self.prefix}

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history.load_state_dict(state_dict["history"])

    def detach(self) -> None:
        """Remove every hook and drop every pending tensor; safe to call any number of times."""

    def _warn_nothing_selected(self, model: nn.Module, looked_for: str) -> None:
        rank_zero_warn(f"{type(self).__name__} found no {looked_for} in {type(model).__name__}; it will log nothing.")

    def _emit(self, step: int, scalars: Mapping[str, float], histograms: Mapping[str, stats.Histogram]) -> None:
        scalars = finite_only(scalars)
        self.history.add(step, scalars, histograms)
        meta = self.describe()
        fresh = meta != self._described
        self._described = meta
        if self.run is not None:
            self.run.emit(step, scalars, histograms, meta if fresh else None)

    def _summed(self, parts: list[Tensor], across: bool, same: Sequence[Tensor] = ()) -> list[list[float]]:
        """The reduction, written once: additive ``parts`` summed over the ranks (``across``) and the values
        ``same`` on every rank (not summed), moved to the host in one transfer, one list each."""
        sizes = [x.numel() for x in (*parts, *same)]
        if across and parts:
            parts = [self.run.reduce(torch.cat(parts), "sum")]  # type: ignore[union-attr]
        return split(host([*parts, *(x.to(torch.float64) for x in same)]), sizes)

    def _tag(self, metric: str, name: str = "") -> str:
        return tags.tag(self.prefix, metric, name)

    def _world(self) -> int:
        return 1 if self.run is None else self.run.world_size


class ActivationMeter(Meter):
    """D1 and D2: the watched activation layers' outputs and the gradients that reach them.

    See :class:`lightning_netdiag.SaturationMonitor` for the arguments, what is watched and what is logged.
    """

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
        self.layer_types: dict[str, str] = {}  # watched layer -> its class name ("function" for a call)
        self.layer_kinds: dict[str, str] = {}  # watched layer -> its activation kind ("tanh", "gelu", ...)
        self.layer_families: dict[str, str | None] = {}  # watched layer -> its family, for the report's rules
        self.layers_in_loop: set[str] = set()  # layers made in a module that runs more than once per forward

    kind = "saturation"

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "threshold": self.threshold,
            "layer_types": self.layer_types,
            "layer_kinds": self.layer_kinds,
            "layer_families": self.layer_families,
            "layers_in_loop": sorted(self.layers_in_loop),
        }

    def attach(self, model: nn.Module, run: Run) -> None:
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

    def arm(self, step: int | None, device: torch.device) -> None:
        """A forward of a training step begins: ``step`` is the step's number if it is measured, else None.

        Every forward of a measured step adds to its records (accumulation); they are zeroed at the first
        forward of the step, so that the records of a step that never reached an optimizer step are dropped.
        """
        if self._hooks is None:
            return
        if step != self._records_step:
            self._records_step = step
            if step is not None:
                self._hooks.prepare(device)
            if self._probe is not None:
                self._probe.reset()
        self._pending = step is not None
        if self._pending:
            self._hooks.start()
            if step == 0 and self._probe is not None and self._model is not None:
                self._probe.start(self._model)

    @property
    def needs_loss(self) -> bool:
        """Whether :meth:`backward` wants the loss: only until the output at init is recorded."""
        return self._probe is not None

    def backward(self, loss: Tensor | None = None) -> None:
        """A backward starts; ``loss``: the loss it starts from, unscaled and not divided for accumulation
        (None when the front end cannot see it: the output at init is then recorded without it)."""
        if self._hooks is not None:
            self._hooks.backward()
        if self._probe is not None:
            self._probe.backward(loss)

    def watch_backward_calls(self, callback: Callable[[Tensor], None] | None) -> None:
        """Have ``callback(loss)`` called at each ``loss.backward()`` made while a step is armed (functional
        capture only: it is seen through the same function mode)."""
        if self._hooks is not None:
            self._hooks.on_backward = callback

    def forget_loss(self) -> None:
        """Drop the losses recorded for the output at init (they were not the step's whole loss)."""
        if self._probe is not None:
            self._probe.forget_loss()

    def add_loss(self, loss: Tensor) -> None:
        """The loss of the step, told after its backward (the plain loop's ``step(loss)``)."""
        if self._probe is not None:
            self._probe.add_loss(loss)

    def backward_done(self) -> None:
        if self._hooks is not None:
            self._hooks.backward_done()

    def stop(self) -> None:
        """The training batch ended: nothing after it (validation) is recorded."""
        if self._hooks is not None:
            self._hooks.stop()
        if self._probe is not None:
            self._probe.stop()

    def flush(self) -> None:
        """Just before the optimizer step of a measured step: reduce, describe and emit its records."""
        hooks, step = self._hooks, self._records_step
        if hooks is None or step is None or not self._pending:
            return
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
        probe = self._probe
        output = probe.record if probe is not None and probe.name is not None and step == 0 else None
        if output is not None:
            parts.append(output)
        values = self._summed(parts, across=self._world() > 1)  # every rank arrives here at the same step
        hooks.reset()
        self._describe_layers(layers)
        scalars: dict[str, float] = {}
        histograms: dict[str, stats.Histogram] = {}
        for i in sorted(range(len(layers)), key=lambda i: layers[i].depth):
            act_record, alive_counts, grad_record = values[3 * i : 3 * i + 3]
            if stats.recorded(act_record):
                self._describe(layers[i], act_record, alive_counts, grad_record, scalars, histograms)
        if output is not None and probe is not None and probe.name is not None:
            rows, excess, cells, losses, loss = values[-1]
            scalars[self._tag("init_output_ce", probe.name)] = excess / rows
            scalars[self._tag("init_output_classes", probe.name)] = cells / rows
            if losses:
                scalars[self._tag("init_loss")] = loss / losses
        if probe is not None:  # it reads step 0 only: nothing of it runs after the first measured step
            probe.stop()
            self._probe = None
        self._emit(step, scalars, histograms)

    def _layout(self, hooks: ActivationHooks) -> list[Layer]:
        """The layers in an order every rank shares. Layers are found as they run, and a rank may run a call
        that another does not: then every rank takes the union, holding zeros for the layers it never ran."""
        world = self._world()
        if world == 1:
            return list(hooks.layers)
        run: Run = self.run  # type: ignore[assignment]
        names = sorted(layer.name for layer in hooks.layers)
        local = torch.tensor([len(names), zlib.crc32("\n".join(names).encode())], dtype=torch.float64)
        both = run.reduce(torch.cat([local, -local]).to(run.device), "max")
        high_count, high_sum, neg_low_count, neg_low_sum = both.tolist()
        if (high_count, high_sum) != (-neg_low_count, -neg_low_sum):
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, [layer.spec() for layer in hooks.layers])
            for specs in gathered:
                for spec in specs:
                    hooks.adopt(spec)
        return sorted(hooks.layers, key=lambda layer: layer.name)

    def _describe_layers(self, layers: Sequence[Layer]) -> None:
        for layer in sorted(layers, key=lambda layer: layer.depth):
            self.layer_types[layer.name] = layer.type_name
            self.layer_kinds[layer.name] = layer.kind.name
            self.layer_families[layer.name] = layer.kind.family
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
        scalars: dict[str, float],
        histograms: dict[str, stats.Histogram],
    ) -> None:
        name, has_rule = layer.name, layer.has_rule
        m = stats.Moments.of(act)
        scalars[self._tag("act_mean", name)] = m.mean
        scalars[self._tag("act_std", name)] = m.std
        scalars[self._tag("act_nonfinite", name)] = m.nonfinite
        if has_rule and alive:
            scalars[self._tag("act_saturated_pct", name)] = (
                100 * act[stats.MOMENTS] / m.count if m.count else float("nan")
            )
            scalars[self._tag("act_dead_pct", name)] = 100 * sum(a == 0 for a in alive) / len(alive)
        if self.histograms:
            histograms[self._tag("act", name)] = stats.Histogram.of(act, layer.act_bins.edges, extra=int(has_rule))
        if grad and stats.recorded(grad):
            g = stats.Moments.of(grad)
            scalars[self._tag("act_grad_mean", name)] = g.mean
            scalars[self._tag("act_grad_std", name)] = g.std
            scalars[self._tag("act_grad_nonfinite", name)] = g.nonfinite
            half, tiny = grad[stats.MOMENTS : stats.MOMENTS + stats.HALF_EXTRA]
            if half > 0:
                scalars[self._tag("act_grad_fp16_tiny_pct", name)] = 100 * tiny / half
            if self.histograms:
                histograms[self._tag("act_grad", name)] = stats.Histogram.of(
                    grad, layer.grad_bins.edges, extra=stats.HALF_EXTRA
                )


def _names(selection: Sequence[type | str] | None) -> str:
    if selection is None:
        return "every activation"
    return "[" + ", ".join(s if isinstance(s, str) else s.__name__ for s in selection) + "]"


class ParameterMeter(Meter):
    """Base of the meters that watch parameters (D3, D4). Not for use on its own.

    Args:
        params: parameter name globs (``"layers.*.weight"``) and module types owning the parameter;
            None selects every trainable parameter.
        exclude: name globs and module types never selected.
        ndims: the numbers of dimensions selected; None selects any. The default (2, 3, 4, 5) takes every
            weight: matrices, embeddings, conv kernels, position embeddings; not biases nor norm scales
            (1-D), which the lecture leaves out too.
        prefix: the first part of every tag.
        history_size: the number of points kept in ``history`` per tag.
    """

    def __init__(
        self,
        params: Sequence[type | str] | None,
        exclude: Sequence[type | str],
        ndims: Sequence[int] | None,
        prefix: str,
        history_size: int,
    ) -> None:
        super().__init__(prefix, history_size)
        self.params = None if params is None else check_selection("params", params)
        self.exclude = check_selection("exclude", exclude)
        if ndims is not None and (
            isinstance(ndims, (str, int))
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in ndims)
        ):
            raise ValueError(f"Expected `ndims` to be None or a sequence of non-negative ints, got {ndims!r}")
        self.ndims = None if ndims is None else tuple(ndims)
        self._selected: dict[int, tuple[str, torch.nn.Parameter]] = {}
        self._step: int | None = None
        self._shards = 1  # ranks over which records are summed: >1 only when parameters are sharded
        self.param_shapes: dict[str, tuple[int, ...]] = {}  # selected parameter -> shape, for plots and reports
        self.param_classes: dict[str, str] = {}  # selected parameter -> "matrix", "conv kernel", "embedding", ...

    def describe(self) -> dict[str, Any]:
        shapes = {name: list(shape) for name, shape in self.param_shapes.items()}
        return {**super().describe(), "param_classes": self.param_classes, "param_shapes": shapes}

    def attach(self, model: nn.Module, run: Run, optimizers: Sequence[Any] = ()) -> None:
        """Select the parameters of ``model`` to watch (they must be final: created, and sharded if so)."""
        self.detach()
        self.run = run
        chosen = select_parameters(model, self.params, self.exclude, self.ndims)
        self._selected = {id(p): (name, p) for name, p, _ in chosen}
        # Replicated parameters are equal on every rank (DDP all-reduces the gradients): no collective.
        self._shards = run.world_size if any(is_sharded(p) for _, p, _ in chosen) else 1
        self.param_shapes = {name: tuple(p.shape) for name, p, _ in chosen}
        self.param_classes = {name: weight_class(p, owner) for name, p, owner in chosen}
        if not chosen:
            self._warn_nothing_selected(
                model, f"trainable parameters (looked for: params={self.params}, ndims={self.ndims})"
            )

    def detach(self) -> None:
        self._selected = {}
        self._step = None

    def begin(self, step: int | None) -> None:
        """A training step begins: ``step`` is its number if it is measured, else None."""
        self._step = step

    def _stepped_by(self, optimizer: Any | None) -> list[tuple[str, torch.nn.Parameter]]:
        """The selected parameters that ``optimizer`` updates (None: a manual update of them all) and that
        have a gradient (all of them when sharded: every rank must send records of the same layout)."""
        params = (
            [p for _, p in self._selected.values()]
            if optimizer is None
            else [p for group in optimizer.param_groups for p in group["params"]]
        )
        out = []
        for p in params:
            chosen = self._selected.get(id(p))
            if chosen is not None and (p.grad is not None or self._shards > 1):
                out.append(chosen)
        return out

    def _shard(self, name: str, t: Tensor) -> tuple[Tensor, int]:
        """This rank's part of ``t`` (never gathered), and how many of the summed ranks hold that part."""
        return local_shard(name, t.detach(), self._shards)

    @staticmethod
    def _records(
        parts: list[tuple[Tensor, int]], bins: stats.Bins | None = None, divisor: Tensor | float | None = None
    ) -> list[Tensor]:
        """The record of each part (held by ``copies`` ranks), weighted so that the sum over the ranks
        counts every element once; the small parts are reduced together."""
        records = stats.tensor_records([part for part, _ in parts], bins, divisor)
        return [r if copies == 1 else r / copies for r, (_, copies) in zip(records, parts, strict=True)]

    def _values(self, parts: list[Tensor], same: Sequence[Tensor] = ()) -> list[list[float]]:
        """The records summed over the ranks that hold shards, and the values ``same`` on every rank (not
        summed), moved to the host at once, one list each."""
        # every rank arrives here at the same step, with the same layout
        return self._summed(parts, across=self._shards > 1, same=same)


class GradDataMeter(ParameterMeter):
    """D3: per selected weight, its gradient's statistics and ``grad.std() / param.std()``.

    See :class:`lightning_netdiag.GradDataRatio` for the arguments and what is logged.
    """

    def __init__(
        self,
        params: Sequence[type | str] | None = None,
        exclude: Sequence[type | str] = (),
        ndims: Sequence[int] | None = WEIGHT_NDIMS,
        histograms: bool = True,
        prefix: str = "netdiag",
        history_size: int = 10_000,
    ) -> None:
        super().__init__(params, exclude, ndims, prefix, history_size)
        self.histograms = bool(histograms)
        self._bins = stats.log2_bins()
        # name -> (step, the parameter's version counter, the ranks holding the part, its record): the weights
        # as they were just before the optimizer step, which UpdateMeter needs too (read once, not twice).
        self.weight_records: dict[str, tuple[int, int, int, Tensor]] = {}

    kind = "grad_data"

    def detach(self) -> None:
        super().detach()
        self.weight_records = {}

    def measure(self, optimizer: Any | None) -> None:
        """Just before ``optimizer`` steps (None: before a manual update), with the step's full gradients."""
        if self._step is None:
            return
        chosen = self._stepped_by(optimizer)
        if not chosen:
            return
        amp = None if self.run is None else self.run.loss_scale()
        # Optimizers that unscale inside their own step (fused ones) still hold loss-scaled gradients here.
        scale = amp if getattr(optimizer, "_step_supports_amp_scaling", False) else None
        grads, weights = [], []
        for name, p in chosen:
            self._bins = self._bins.to(p.device)
            # A parameter without a gradient sends an empty record: skipped below unless another rank has one.
            grads.append(self._shard(name, p.grad if p.grad is not None else torch.empty(0, device=p.device)))
            weights.append(self._shard(name, p))
        grad_records = self._records(grads, self._bins if self.histograms else None, divisor=scale)
        weight_records = self._records(weights)
        # kept by name over the optimizers of a step (manual optimization); older entries fail the step check
        for (name, p), (_, copies), record in zip(chosen, weights, weight_records, strict=True):
            self.weight_records[name] = (self._step, p._version, copies, record)
        device = chosen[0][1].device
        same = [torch.as_tensor(amp, dtype=torch.float64, device=device).reshape(1)] if amp is not None else []
        records = [r for pair in zip(grad_records, weight_records, strict=True) for r in pair]
        values = self._values(records, same)
        scalars: dict[str, float] = {}
        if amp is not None:  # the scaler skips steps whose gradients overflowed: the report must know it is on
            scalars[self._tag("loss_scale")] = values.pop()[0]
        histograms: dict[str, stats.Histogram] = {}
        for i, (name, _) in enumerate(chosen):
            grad_record, param_record = values[2 * i], values[2 * i + 1]
            if not stats.recorded(grad_record):
                continue
            g, w = stats.Moments.of(grad_record), stats.Moments.of(param_record)
            scalars[self._tag("grad_mean", name)] = g.mean
            scalars[self._tag("grad_std", name)] = g.std
            scalars[self._tag("grad_data_ratio", name)] = g.std / w.std if w.std > 0 else float("nan")
            scalars[self._tag("grad_nonfinite", name)] = g.nonfinite
            if self.histograms:
                histograms[self._tag("grad", name)] = stats.Histogram.of(grad_record, self._bins.edges)
        self._emit(self._step, scalars, histograms)


class UpdateMeter(ParameterMeter):
    """D4: per selected weight, ``log10(std(θ_after - θ_before) / std(θ_before))``, from the update applied.

    See :class:`lightning_netdiag.UpdateRatio` for the arguments and what is logged.
    """

    def __init__(
        self,
        params: Sequence[type | str] | None = None,
        exclude: Sequence[type | str] = (),
        ndims: Sequence[int] | None = WEIGHT_NDIMS,
        target: float = DEFAULT_TARGET,
        sample: int | None = None,
        prefix: str = "netdiag",
        history_size: int = 10_000,
    ) -> None:
        super().__init__(params, exclude, ndims, prefix, history_size)
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target):
            raise ValueError(f"Expected `target` to be a finite number (a log10 ratio, e.g. -3), got {target!r}")
        check_positive_int("sample", sample, allow_none=True)
        self.target = float(target)
        self.sample = sample
        # name -> (parameter, the element indices kept (None: all), copy of those elements of this rank's part,
        # the parameter's version counter when copied)
        self._before: dict[str, tuple[nn.Parameter, Tensor | None, Tensor, int]] = {}
        self._indices: dict[str, Tensor] = {}  # the fixed sample of each parameter, drawn once
        self._orphans: list[tuple[str, nn.Parameter]] = []  # selected, trainable, in no optimizer
        self._main: tuple[Any, int] | None = None  # the optimizer and group holding most selected weights
        self._lr: float | None = None
        self.grad_data: GradDataMeter | None = None  # whose weight records are shared, when one is attached
        self.optimizer_family: str | None = None  # of the main group's optimizer, see optimizer_family()

    kind = "update"

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "target": self.target, "optimizer_family": self.optimizer_family}

    def attach(self, model: nn.Module, run: Run, optimizers: Sequence[Any] = ()) -> None:
        super().attach(model, run, optimizers)
        held: dict[tuple[int, int], int] = {}
        for i, opt in enumerate(optimizers):
            for j, group in enumerate(opt.param_groups):
                held[(i, j)] = sum(id(p) in self._selected for p in group["params"])
        if held and max(held.values()) > 0:
            i, j = max(held, key=held.__getitem__)
            self._main = (optimizers[i], j)
            self.optimizer_family = optimizer_family(optimizers[i])
        if optimizers:
            stepped = {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
            self._orphans = [(name, p) for key, (name, p) in self._selected.items() if key not in stepped]

    def detach(self) -> None:
        super().detach()
        self._before = {}
        self._indices = {}
        self._orphans = []
        self._main = None

    def manual(self, lr: float | None) -> None:
        """The step is a manual ``p -= lr * p.grad`` (the lecture's loop): plain SGD at ``lr`` (None: unknown)."""
        self._lr = None if lr is None else float(lr)
        self.optimizer_family = "sgd" if lr is not None else None

    def snapshot(self, optimizer: Any | None) -> None:
        """Just before ``optimizer`` steps (None: before a manual update of every selected weight)."""
        if self._step is None:
            return
        chosen = self._stepped_by(optimizer)
        if self._main is not None and optimizer is self._main[0]:
            # A weight left out of every optimizer is compared across the main one's step: it must not move.
            chosen += [(name, p) for name, p in self._orphans if p.grad is not None]
            self._lr = float(optimizer.param_groups[self._main[1]]["lr"])  # a tensor rate: read once a step
        for name, p in chosen:
            part = self._shard(name, p)[0]
            index = self._sample_of(name, part)
            copy = part.clone() if index is None else torch.take(part, index)
            self._before[name] = (p, index, copy, p._version)

    def _sample_of(self, name: str, part: Tensor) -> Tensor | None:
        """The fixed elements of ``part`` kept with ``sample``: the same every step (so the update is
        measured on the same elements), drawn once from a generator seeded by the name; None: all."""
        if self.sample is None or part.numel() <= self.sample:
            return None
        if name not in self._indices:
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            self._indices[name] = torch.randperm(part.numel(), generator=g)[: self.sample].to(part.device)
        return self._indices[name]

    def _old_records(
        self, before: dict[str, tuple[nn.Parameter, Tensor | None, Tensor, int]], copies: list[tuple[Tensor, int]]
    ) -> list[Tensor]:
        """The record of each parameter before the step: the GradDataMeter's where it read the same values
        (this step, the same version counter) weighted alike across ranks, so that no weight is read twice;
        the others from the copies. With ``sample``, its record is of the whole weight: the exact std."""
        shared = {} if self.grad_data is None else self.grad_data.weight_records
        records: list[Tensor | None] = []
        for (name, (_, _, _, version)), (_, held_by) in zip(before.items(), copies, strict=True):
            step, read_at, copies_then, record = shared.get(name, (None, None, None, None))
            records.append(record if (step, read_at, copies_then) == (self._step, version, held_by) else None)
        missing = [i for i, r in enumerate(records) if r is None]
        for i, record in zip(missing, self._records([copies[i] for i in missing]), strict=True):
            records[i] = record
        return records  # type: ignore[return-value]

    def measure(self) -> None:
        """After the step's updates: compare each weight with its copy (the copies are freed here)."""
        before, self._before = self._before, {}
        if self._step is None or not before:
            return
        shards = [self._shard(name, p) for name, (p, _, _, _) in before.items()]
        copies = [(copy, n) for (_, _, copy, _), (_, n) in zip(before.values(), shards, strict=True)]
        old_records = self._old_records(before, copies)
        for (_, index, copy, _), (now, _) in zip(before.values(), shards, strict=True):
            # the copy becomes the update: no second full-size tensor
            torch.sub(now if index is None else torch.take(now, index), copy, out=copy)
        update_records = self._records(copies)
        values = self._values([r for pair in zip(update_records, old_records, strict=True) for r in pair])
        scalars: dict[str, float] = {}
        moved = [values[2 * i][stats.SUMSQ] > 0 or values[2 * i][stats.NONFINITE] > 0 for i in range(len(before))]
        for i, name in enumerate(before):
            if moved[i]:
                update, old = stats.Moments.of(values[2 * i]), stats.Moments.of(values[2 * i + 1])
                scalars[self._tag("update_data_log10", name)] = stats.ratio_log10(update.std, old.std)
            elif any(moved):  # a weight with a gradient that stood still while others moved
                scalars[self._tag("update_zero", name)] = 1.0
        scalars[self._tag("update_data_log10", "_target")] = self.target
        scalars[self._tag("update_skipped")] = float(not any(moved))
        if self._lr is not None:
            scalars[self._tag("lr")] = self._lr
            if self._main is not None:  # read again at the next step; a manual rate stays as told
                self._lr = None
        self._emit(self._step, scalars, {})
