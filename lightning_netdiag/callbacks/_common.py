"""What the three callbacks share: cadence, history, logging, checkpoint state, the AMP loss scale."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_netdiag import stats
from lightning_netdiag.capture import check_selection, is_sharded, local_shard, select_parameters, weight_class
from lightning_netdiag.sinks import History, LoggerSink, finite_only


def logging_step(trainer: pl.Trainer, every_n_steps: int) -> int | None:
    """The optimizer step that the current training batch leads to, if that step is measured.

    One logging step is one optimizer step: ``trainer.global_step`` counts them, so every micro-batch of
    an accumulation window shares its step. Steps 0, n, 2n, ... are measured: step 0 shows the network
    at initialisation, as the lecture does. Sanity checking, validation, test and predict never count.
    """
    if trainer.sanity_checking or not trainer.training:
        return None
    step = trainer.global_step
    return step if step % every_n_steps == 0 else None


def loss_scale(trainer: pl.Trainer) -> Tensor | float | None:
    """The GradScaler's current scale, or None when gradients are not scaled (fp32, bf16).

    Read from the scaler's scale tensor where it has one, so that no host synchronisation happens.
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    scale = getattr(scaler, "_scale", None)
    return scale if isinstance(scale, Tensor) else scaler.get_scale()


def check_positive_int(name: str, value: object, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive integer, got {value!r}")


class DiagnosticCallback(Callback):
    """Base of the netdiag callbacks. Not for use on its own.

    Args:
        every_n_steps: measure every n-th optimizer step; None takes ``trainer.log_every_n_steps``.
        prefix: the first part of every logged tag.
        history_size: the number of points kept in memory per tag.
    """

    def __init__(self, every_n_steps: int | None, prefix: str, history_size: int) -> None:
        check_positive_int("every_n_steps", every_n_steps, allow_none=True)
        check_positive_int("history_size", history_size)
        if not isinstance(prefix, str) or not prefix or prefix.strip("/") != prefix:
            raise ValueError(
                f"Expected `prefix` to be a non-empty string without leading or trailing '/', got {prefix!r}"
            )
        self.every_n_steps = every_n_steps
        self.prefix = prefix
        self.history = History(history_size)
        self._every = every_n_steps or 1
        self._sink = LoggerSink(type(self).__name__, prefix)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        log_every: int = trainer.log_every_n_steps  # type: ignore[attr-defined]  # set by Lightning's connector
        self._every = self.every_n_steps or log_every
        if self._every < 1:
            raise ValueError(
                f"{type(self).__name__}: `trainer.log_every_n_steps` is {log_every}; "
                "pass `every_n_steps` to measure with logging turned off"
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not in `setup`: `configure_model` runs after it and may create or shard (FSDP2) the modules and
        # parameters; here they are final, and no forward has run yet (nor been compiled).
        self._attach(trainer, pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._detach()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history.load_state_dict(state_dict["history"])

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Select what to watch and register hooks; called once per fit, before the first forward."""

    def _detach(self) -> None:
        """Remove every hook and drop every pending tensor; safe to call any number of times."""

    def _warn_nothing_selected(self, pl_module: pl.LightningModule, looked_for: str) -> None:
        rank_zero_warn(
            f"{type(self).__name__} found no {looked_for} in {type(pl_module).__name__}; it will log nothing."
        )

    def _emit(
        self, trainer: pl.Trainer, step: int, scalars: Mapping[str, float], histograms: Mapping[str, stats.Histogram]
    ) -> None:
        scalars = finite_only(scalars)
        self.history.add(step, scalars, histograms)
        self._sink.emit(trainer.loggers, step, scalars, histograms, trainer.is_global_zero)

    def _tag(self, metric: str, name: str) -> str:
        return f"{self.prefix}/{metric}/{name}"


def host(parts: list[Tensor]) -> list[float]:
    """All of a step's records in one device-to-host transfer."""
    return torch.cat([p.reshape(-1) for p in parts]).tolist() if parts else []


def split(values: list[float], sizes: list[int]) -> list[list[float]]:
    out, start = [], 0
    for n in sizes:
        out.append(values[start : start + n])
        start += n
    return out


class ParameterCallback(DiagnosticCallback):
    """Base of the callbacks that watch parameters (D3, D4). Not for use on its own.

    Args:
        params: parameter name globs (``"layers.*.weight"``) and module types owning the parameter;
            None selects every trainable parameter.
        exclude: name globs and module types never selected.
        ndims: the numbers of dimensions selected; None selects any. The default (2, 3, 4, 5) takes every
            weight: matrices, embeddings, conv kernels, position embeddings; not biases nor norm scales
            (1-D), which the lecture leaves out too.
    """

    def __init__(
        self,
        params: Sequence[type | str] | None,
        exclude: Sequence[type | str],
        ndims: Sequence[int] | None,
        every_n_steps: int | None,
        prefix: str,
        history_size: int,
    ) -> None:
        super().__init__(every_n_steps, prefix, history_size)
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
        self._world = 1  # ranks over which records are summed: >1 only when parameters are sharded
        self.param_shapes: dict[str, tuple[int, ...]] = {}  # selected parameter -> shape, for plots and reports
        self.param_classes: dict[str, str] = {}  # selected parameter -> "matrix", "conv kernel", "embedding", ...

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step = logging_step(trainer, self._every)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        flat = flat_sharding(trainer.strategy)
        if flat is not None:
            raise ValueError(
                f"{type(self).__name__}: {flat} splits each parameter into flat fragments across ranks, so "
                "per-parameter statistics would be one rank's fragment. Use ModelParallelStrategy with "
                "`fully_shard` (FSDP2): its DTensor shards are reduced across ranks here."
            )

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        chosen = select_parameters(pl_module, self.params, self.exclude, self.ndims)
        self._selected = {id(p): (name, p) for name, p, _ in chosen}
        # Replicated parameters are equal on every rank (DDP all-reduces the gradients): no collective.
        self._world = trainer.world_size if any(is_sharded(p) for _, p, _ in chosen) else 1
        self.param_shapes = {name: tuple(p.shape) for name, p, _ in chosen}
        self.param_classes = {name: weight_class(p, owner) for name, p, owner in chosen}
        if not chosen:
            self._warn_nothing_selected(
                pl_module, f"trainable parameters (looked for: params={self.params}, ndims={self.ndims})"
            )

    def _detach(self) -> None:
        self._selected = {}
        self._step = None

    def _stepped_by(self, optimizer: Any) -> list[tuple[str, torch.nn.Parameter]]:
        """The selected parameters that ``optimizer`` updates and that have a gradient (all of them when
        sharded: every rank must send records of the same layout)."""
        out = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                chosen = self._selected.get(id(p))
                if chosen is not None and (p.grad is not None or self._world > 1):
                    out.append(chosen)
        return out

    def _shard(self, name: str, t: Tensor) -> tuple[Tensor, int]:
        """This rank's part of ``t`` (never gathered), and how many of the summed ranks hold that part."""
        return local_shard(name, t.detach(), self._world)

    @staticmethod
    def _records(
        parts: list[tuple[Tensor, int]], bins: stats.Bins | None = None, divisor: Tensor | float | None = None
    ) -> list[Tensor]:
        """The record of each part (held by ``copies`` ranks), weighted so that the sum over the ranks
        counts every element once; the small parts are reduced together."""
        records = stats.tensor_records([part for part, _ in parts], bins, divisor)
        return [r if copies == 1 else r / copies for r, (_, copies) in zip(records, parts, strict=True)]

    def _values(self, trainer: pl.Trainer, parts: list[Tensor], same: Sequence[Tensor] = ()) -> list[list[float]]:
        """The records summed over the ranks that hold shards, and the values ``same`` on every rank (not
        summed), moved to the host at once, one list each."""
        sizes = [x.numel() for x in (*parts, *same)]
        if self._world > 1 and parts:  # every rank arrives here at the same step, with the same layout
            parts = [trainer.strategy.reduce(torch.cat(parts), reduce_op="sum")]
        return split(host([*parts, *(x.to(torch.float64) for x in same)]), sizes)


def flat_sharding(strategy: object) -> str | None:
    """The name of ``strategy`` if it flattens parameters into per-rank fragments (FSDP1, DeepSpeed ZeRO).

    By class name, so that the standalone ``pytorch_lightning`` package's strategies are recognised too.
    """
    names = {cls.__name__ for cls in type(strategy).__mro__}
    return next((n for n in ("FSDPStrategy", "DeepSpeedStrategy") if n in names), None)


def monitors(trainer: pl.Trainer) -> dict[str, Any]:
    """The first SaturationMonitor, GradDataRatio and UpdateRatio among the Trainer's callbacks (or None)."""
    from lightning_netdiag.callbacks.grad_data import GradDataRatio
    from lightning_netdiag.callbacks.saturation import SaturationMonitor
    from lightning_netdiag.callbacks.update_ratio import UpdateRatio

    def first(cls: type) -> Any:
        callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's connector
        return next((cb for cb in callbacks if isinstance(cb, cls)), None)

    return {"saturation": first(SaturationMonitor), "grad_data": first(GradDataRatio), "update": first(UpdateRatio)}
