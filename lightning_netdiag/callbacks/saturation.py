"""D1 and D2: activation statistics of the nonlinear layers, and of their gradients."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_netdiag import activations, stats
from lightning_netdiag.callbacks._common import (
    DiagnosticCallback,
    check_positive_int,
    host,
    logging_step,
    loss_scale,
    split,
)
from lightning_netdiag.capture import ActivationHooks, Layer, OutputProbe, check_selection, compiled, matches


class SaturationMonitor(DiagnosticCallback):
    r"""Watches the activation layers: how saturated they are (D1) and what gradient reaches them (D2).

    Every activation that runs is watched by default: ``torch.nn`` activation modules, any other
    parameter-free elementwise module (transformers' and timm's activation classes, a user's ``Swish``:
    probed once and matched against the known kinds, see ``lightning_netdiag.activations``), and functional
    calls in ``forward`` (``F.relu``, ``torch.tanh``, ``x.relu_()``, ...) named by the module whose forward
    made them (``layer1.0/relu``). Each call of a module in one forward is a layer of its own
    (``layer1.0.relu``, ``layer1.0.relu-2``); calls from ``max_calls`` on share the last one.

    A forward hook on each watched module (on logging steps, a ``TorchFunctionMode`` for functional calls)
    reads its output; a tensor hook on that output reads its gradient. They run only on logging steps and
    only add on-device counts; the records of every micro-batch of the step (gradient accumulation) and,
    under DDP, of every rank are summed, then moved to the host once, just before the optimizer step. A
    forward recomputed during the backward (activation checkpointing) is not recorded again.

    Saturation is "in the flat region where the derivative is about 0", per activation kind:

    - Tanh, Softsign: ``|t| > threshold`` (the lecture's 0.97); Sigmoid: ``t < 1 - threshold or t > threshold``;
    - Hardtanh, ReLU6, Hardsigmoid: at or beyond their clamp bounds; Hardshrink, Softshrink: ``t == 0``;
    - ReLU, ReLU², LeakyReLU, PReLU, RReLU: ``t <= 0``;
    - ELU, CELU: ``t < -threshold * alpha``; SELU: ``t < -threshold * scale * alpha`` (near the asymptote);
    - Softplus: ``t < -ln(threshold) / beta``; LogSigmoid: ``t > ln(threshold)`` (derivative below 1 - threshold);
    - GELU (exact and tanh), QuickGELU, Hardswish: input ``x < -3``; SiLU, Mish: input ``x < -5``
      (derivative below about 0.03).

    A unit (a feature along ``unit_dim``) is dead when it is saturated for every example of the step.

    Args:
        modules: what to watch: module types (``isinstance``) and glob patterns on qualified module names
            (``"blocks.*.act"``); a functional call is watched if its owner or its own name matches. None
            watches every activation. A module without a known kind gets mean, std and histograms, but no
            saturation.
        exclude: module types and name globs never watched (nor the functional calls of matching owners).
        threshold: the saturation threshold of the smoothly bounded kinds, in (0, 1).
        track_grad: also record the gradient of each watched output (D2).
        unit_dim: the dimension of an activation that indexes units; None: the channels (dim 1) of 4-D and
            5-D outputs (N, C, H, W), the last dim otherwise (Linear and sequence layers). Pass 1 for a
            Conv1d's (N, C, L) outputs, -1 for channels-last (N, H, W, C) ones.
        functional: also watch functional activation calls (not under torch.compile: there they would break
            the graph, and a warning says so).
        max_calls: the calls of one module (or one function from one owner) per forward that get a layer of
            their own; the later ones are pooled into the last.
        every_n_steps: measure every n-th optimizer step; None takes ``trainer.log_every_n_steps``.
        histograms: log histograms (TensorBoard) or their quantiles (loggers without histograms).
        prefix: the first part of every tag.
        history_size: the number of points kept in ``history`` per tag.

    Raises:
        ValueError: if an argument is out of range or a selection holds something other than module
            types and strings.

    Example::

        from lightning import Trainer
        from lightning_netdiag import SaturationMonitor

        trainer = Trainer(callbacks=[SaturationMonitor(every_n_steps=10)])

    **Logged metrics**, per watched layer ``{name}`` (its qualified module name, ``-k`` for its k-th call in
    a forward, ``{owner}/{function}`` for a functional call), at the step being measured:

    - ``{prefix}/act_mean/{name}``, ``{prefix}/act_std/{name}``: mean and (unbiased) std of the output;
    - ``{prefix}/act_saturated_pct/{name}``: % of output values in the saturated region;
    - ``{prefix}/act_dead_pct/{name}``: % of units saturated for every example of the step;
    - ``{prefix}/act_nonfinite/{name}``: number of NaN/Inf output values (left out of everything else);
    - ``{prefix}/act/{name}``: histogram of the output;
    - with ``track_grad``: ``{prefix}/act_grad_mean/{name}``, ``{prefix}/act_grad_std/{name}``,
      ``{prefix}/act_grad_nonfinite/{name}`` and the histogram ``{prefix}/act_grad/{name}``, of the gradient
      of the loss with respect to the output: unscaled under AMP, and under data parallelism that of the
      global-batch loss; where that gradient is computed in fp16, ``{prefix}/act_grad_fp16_tiny_pct/{name}``:
      % of its values (as computed: loss-scaled under a GradScaler) that are non-zero and below fp16's
      smallest normal value, 2**-14 (they lose precision, and below 2**-24 they become 0).

    At step 0 only (the network at initialisation; with ``modules=None``, not under torch.compile), of the
    model's output, the last tensor a module with parameters of its own made in the forward (``{out}`` is that
    module's name), read as logits: ``{prefix}/init_output_ce/{out}``, the cross-entropy of the output against
    uniformly random labels (``ln(classes)`` for a uniform output); ``{prefix}/init_output_classes/{out}``, its
    last dimension (dim 1 of a 4-D output); ``{prefix}/init_loss``, the loss that the step's backward started
    from (unscaled, not divided for accumulation).

    Loggers without histograms get ``.../q05``, ``.../q50``, ``.../q95`` of each histogram instead.
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
        every_n_steps: int | None = None,
        histograms: bool = True,
        prefix: str = "netdiag",
        history_size: int = 10_000,
    ) -> None:
        super().__init__(every_n_steps, prefix, history_size)
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
        self._records_step: int | None = None
        self._pending = False
        self._units: tuple[tuple[str, ...], list[int]] | None = None  # the layers they were agreed for
        self._warned_empty = False
        self.layer_types: dict[str, str] = {}  # watched layer -> its class name ("function" for a call)
        self.layer_kinds: dict[str, str] = {}  # watched layer -> its activation kind ("tanh", "gelu", ...)
        self.layer_families: dict[str, str | None] = {}  # watched layer -> its family, for the report's rules
        self.layers_in_loop: set[str] = set()  # layers made in a module that runs more than once per forward

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._arm(trainer, pl_module)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self._hooks is not None:
            self._hooks.backward()
        if self._probe is not None:
            scale = loss_scale(trainer)  # the loss as the step computed it: unscaled, not divided for accumulation
            self._probe.backward(loss * trainer.accumulate_grad_batches / (1.0 if scale is None else scale))

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._hooks is not None:
            self._hooks.backward_done()

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._flush(trainer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._hooks is not None:
            self._hooks.stop()  # validation runs after this: it must never count
        if self._probe is not None:
            self._probe.stop()

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()
        chosen, known = [], []
        for name, m in pl_module.named_modules():
            kind = activations.module_kind(m)
            if kind is not None:
                known.append(m)
            wanted = kind is not None if self.modules is None else matches(name, m, self.modules)
            if wanted and not matches(name, m, self.exclude):
                chosen.append((name, m, kind or activations.UNKNOWN))
        functional = self.functional
        is_compiled = compiled(pl_module)
        if functional and is_compiled:
            functional = False
            rank_zero_warn(
                "SaturationMonitor: the model runs under torch.compile, where watching functional activation calls "
                "(F.relu, torch.tanh, ...) would break the graph; only activation modules are watched."
            )
        if not chosen and not functional:
            self._warn_nothing_selected(pl_module, f"activation modules (looked for: modules={_names(self.modules)})")
            return
        # The output at step 0 with the default selection only; never around a compiled forward, whose graph a
        # global hook would break as the function mode would.
        self._probe = OutputProbe() if self.modules is None and not is_compiled else None
        self._hooks = ActivationHooks(
            pl_module,
            chosen,
            self._watch_call if functional else None,
            self.threshold,
            self.histograms,
            self.track_grad,
            self.unit_dim,
            grad_divisor=lambda: _grad_divisor(trainer),
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

    def _detach(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
        if self._probe is not None:
            self._probe.stop()
        self._hooks = self._probe = None
        self._records_step = self._units = None
        self._pending = False

    def _arm(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._hooks is None:
            return
        step = logging_step(trainer, self._every)
        if step != self._records_step:
            self._records_step = step
            if step is not None:  # zeroed here: records of a step that never reached an optimizer step are dropped
                self._hooks.prepare(pl_module.device)
            if self._probe is not None:
                self._probe.reset()
        self._pending = step is not None
        if self._pending:
            self._hooks.start()
            if step == 0 and self._probe is not None:
                self._probe.start(pl_module)

    def _flush(self, trainer: pl.Trainer) -> None:
        hooks, step = self._hooks, self._records_step
        if hooks is None or step is None or not self._pending:
            return
        self._pending = False
        hooks.stop()
        layers = self._layout(trainer, hooks)
        if not layers:
            if not self._warned_empty:
                self._warned_empty = True
                self._warn_nothing_selected(
                    trainer.lightning_module,  # type: ignore[arg-type]
                    f"activation modules (looked for: modules={_names(self.modules)}) and no functional "
                    "activation calls",
                )
            return
        # Every layer has a record of fixed size on every rank, zeros where it did not run, so that the
        # ranks' sums line up; only the per-unit counts are sized by the layer's first run.
        units = self._unit_counts(trainer, layers)
        parts: list[Tensor] = []
        for layer, n in zip(layers, units, strict=True):
            act: Tensor = layer.act  # type: ignore[assignment]
            alive = act.new_zeros(n) if layer.alive is None else layer.alive
            parts += [act, alive, act.new_zeros(0) if layer.grad is None else layer.grad]
        probe = self._probe
        output = probe.record if probe is not None and probe.name is not None and step == 0 else None
        if output is not None:
            parts.append(output)
        sizes = [p.numel() for p in parts]
        if trainer.world_size > 1:  # every rank arrives here at the same step
            parts = [trainer.strategy.reduce(torch.cat(parts), reduce_op="sum")]
        values = split(host(parts), sizes)
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
            scalars[f"{self.prefix}/init_loss"] = loss / losses
        if probe is not None:  # it reads step 0 only: nothing of it runs after the first measured step
            probe.stop()
            self._probe = None
        self._emit(trainer, step, scalars, histograms)

    def _layout(self, trainer: pl.Trainer, hooks: ActivationHooks) -> list[Layer]:
        """The layers in an order every rank shares. Layers are found as they run, and a rank may run a call
        that another does not: then every rank takes the union, holding zeros for the layers it never ran."""
        if trainer.world_size == 1:
            return list(hooks.layers)
        names = sorted(layer.name for layer in hooks.layers)
        local = torch.tensor([len(names), zlib.crc32("\n".join(names).encode())], dtype=torch.float64)
        both = trainer.strategy.reduce(torch.cat([local, -local]).to(trainer.strategy.root_device), reduce_op="max")
        high_count, high_sum, neg_low_count, neg_low_sum = both.tolist()
        if (high_count, high_sum) != (-neg_low_count, -neg_low_sum):
            gathered: list[Any] = [None] * trainer.world_size
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

    def _unit_counts(self, trainer: pl.Trainer, layers: list[Layer]) -> list[int]:
        """Per layer, the length of its per-unit counts: the same on every rank, 0 where no rank ran it yet."""
        local = [0 if layer.alive is None else layer.alive.numel() for layer in layers]
        names = tuple(layer.name for layer in layers)
        if trainer.world_size == 1:
            return local
        if self._units is not None and self._units[0] == names:
            return self._units[1]
        counts = trainer.strategy.reduce(torch.tensor(local, device=trainer.strategy.root_device), reduce_op="max")
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


def _grad_divisor(trainer: pl.Trainer) -> Tensor | float | None:
    """An output gradient as backward sees it is the loss-scaled gradient of this rank's loss; under data
    parallelism the optimized loss is the mean over ranks, so it is ``world_size`` times that loss's."""
    scale = loss_scale(trainer)
    world = trainer.world_size
    if scale is None:
        return world if world > 1 else None
    return scale * world


def _names(selection: Sequence[type | str] | None) -> str:
    if selection is None:
        return "every activation"
    return "[" + ", ".join(s if isinstance(s, str) else s.__name__ for s in selection) + "]"
