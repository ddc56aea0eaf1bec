"""D4: the size of each optimizer update relative to the weight, from the update actually applied."""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_netdiag import stats
from lightning_netdiag.callbacks._common import ParameterCallback, check_positive_int, monitors
from lightning_netdiag.capture import WEIGHT_NDIMS

#: The lecture's rule of thumb: updates about 1/1000 of the data.
DEFAULT_TARGET = -3.0


def optimizer_family(optimizer: Any) -> str | None:
    """``"sgd"`` (an SGD step, with or without momentum: the update follows ``lr * grad``), ``"adam"`` (the
    Adam kin: each element's step is normalised, about ``lr`` at first), or None (another kind: the report
    does not judge its learning rate). By class name, so that other libraries' Adams count too."""
    names = [cls.__name__ for cls in type(optimizer).__mro__]
    if any("Adam" in n for n in names):
        return "adam"
    return "sgd" if "SGD" in names else None


class UpdateRatio(ParameterCallback):
    r"""Per selected parameter, ``log10(std(θ_after - θ_before) / std(θ_before))`` (D4).

    The lecture estimates the update as ``lr * grad``, which holds only for plain SGD. Here the
    parameters are copied just before the optimizer step, on logging steps only, and compared with
    themselves after it (the copy is freed right away): the number is right for Adam, momentum, weight
    decay, gradient clipping and any learning-rate schedule. With a GradDataRatio attached, the std before
    the step comes from its record of the same weight at the same moment: each weight is read once.

    A step in which no selected parameter changed (the AMP GradScaler skipped it because of non-finite
    gradients, or the step was skipped) is reported as ``update_skipped = 1`` with no ratio, never as
    ``log10(0) = -inf``; a single parameter that did not change is left out of that step.

    Args:
        params: parameter name globs (``"layers.*.weight"``) and module types owning the parameter;
            None selects every trainable parameter (filtered by ``ndims``).
        exclude: name globs and module types never selected.
        ndims: the numbers of dimensions selected (default: every weight of rank 2 to 5: matrices,
            embeddings, conv kernels; not biases nor norm scales, as in the lecture); None selects any.
        target: the healthy log10 ratio, drawn as the reference line (the lecture's -3).
        sample: None (default) copies each selected parameter whole: exact, and as much memory again as
            the selected parameters for the moment of the step. An int ``k`` keeps only a fixed random
            subset of ``k`` elements of each (of each rank's shard), the same at every step: for models
            whose parameters do not fit twice. The estimate's error: a std over ``k`` roughly normal
            values is off by about ``1 / sqrt(2k)`` relatively, so the log10 ratio by at most about
            ``0.43 / sqrt(k)`` decades (``k = 4096``: 0.007; the lecture's band is a decade wide).
        every_n_steps: measure every n-th optimizer step; None takes ``trainer.log_every_n_steps``.
        prefix: the first part of every tag.
        history_size: the number of points kept in ``history`` per tag.

    Raises:
        ValueError: if an argument is out of range or a selection holds something other than module
            types and strings.

    Example::

        from lightning import Trainer
        from lightning_netdiag import UpdateRatio

        trainer = Trainer(callbacks=[UpdateRatio(target=-3.0)])

    **Logged metrics**:

    - ``{prefix}/update_data_log10/{name}``: ``log10(std(update) / std(param before the update))`` per
      selected parameter ``{name}`` that changed (left out where the parameter's std was 0);
    - ``{prefix}/update_data_log10/_target``: ``target``, so that the chart carries the reference line;
    - ``{prefix}/update_skipped``: 1 if no selected parameter changed in this step, else 0;
    - ``{prefix}/update_zero/{name}``: 1 for a selected weight that has a gradient and did not change while
      others did (left out of every optimizer, a learning rate of 0, or a gradient of 0); logged only then;
    - ``{prefix}/lr``: the learning rate of the optimizer's parameter group that holds most selected weights.
    """

    def __init__(
        self,
        params: Sequence[type | str] | None = None,
        exclude: Sequence[type | str] = (),
        ndims: Sequence[int] | None = WEIGHT_NDIMS,
        target: float = DEFAULT_TARGET,
        sample: int | None = None,
        every_n_steps: int | None = None,
        prefix: str = "netdiag",
        history_size: int = 10_000,
    ) -> None:
        super().__init__(params, exclude, ndims, every_n_steps, prefix, history_size)
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
        self.optimizer_family: str | None = None  # of the main group's optimizer, see optimizer_family()

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._snapshot(optimizer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._measure(trainer)

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super()._attach(trainer, pl_module)
        optimizers: list[Any] = trainer.optimizers
        held: dict[tuple[int, int], int] = {}
        for i, opt in enumerate(optimizers):
            for j, group in enumerate(opt.param_groups):
                held[(i, j)] = sum(id(p) in self._selected for p in group["params"])
        if held and max(held.values()) > 0:
            i, j = max(held, key=held.__getitem__)
            self._main = (optimizers[i], j)
            self.optimizer_family = optimizer_family(optimizers[i])
        stepped = {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
        self._orphans = [(name, p) for key, (name, p) in self._selected.items() if key not in stepped]

    def _detach(self) -> None:
        super()._detach()
        self._before = {}
        self._indices = {}
        self._orphans = []
        self._main = None

    def _snapshot(self, optimizer: Any) -> None:
        if self._step is not None:
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
        self,
        trainer: pl.Trainer,
        before: dict[str, tuple[nn.Parameter, Tensor | None, Tensor, int]],
        copies: list[tuple[Tensor, int]],
    ) -> list[Tensor]:
        """The record of each parameter before the step: GradDataRatio's where it read the same values (this
        step, the same version counter) weighted alike across ranks, so that no weight is read twice; the
        others from the copies. With ``sample``, GradDataRatio's record is of the whole weight: the exact std."""
        d3 = monitors(trainer)["grad_data"]
        shared = {} if d3 is None else d3.weight_records
        records: list[Tensor | None] = []
        for (name, (_, _, _, version)), (_, held_by) in zip(before.items(), copies, strict=True):
            step, read_at, copies_then, record = shared.get(name, (None, None, None, None))
            records.append(record if (step, read_at, copies_then) == (self._step, version, held_by) else None)
        missing = [i for i, r in enumerate(records) if r is None]
        for i, record in zip(missing, self._records([copies[i] for i in missing]), strict=True):
            records[i] = record
        return records  # type: ignore[return-value]

    def _measure(self, trainer: pl.Trainer) -> None:
        before, self._before = self._before, {}  # the copies are freed when this returns
        if self._step is None or not before:
            return
        shards = [self._shard(name, p) for name, (p, _, _, _) in before.items()]
        copies = [(copy, n) for (_, _, copy, _), (_, n) in zip(before.values(), shards, strict=True)]
        old_records = self._old_records(trainer, before, copies)
        for (_, index, copy, _), (now, _) in zip(before.values(), shards, strict=True):
            # the copy becomes the update: no second full-size tensor
            torch.sub(now if index is None else torch.take(now, index), copy, out=copy)
        update_records = self._records(copies)
        values = self._values(trainer, [r for pair in zip(update_records, old_records, strict=True) for r in pair])
        scalars: dict[str, float] = {}
        moved = [values[2 * i][stats.SUMSQ] > 0 or values[2 * i][stats.NONFINITE] > 0 for i in range(len(before))]
        for i, name in enumerate(before):
            if moved[i]:
                update, old = stats.Moments.of(values[2 * i]), stats.Moments.of(values[2 * i + 1])
                scalars[self._tag("update_data_log10", name)] = stats.ratio_log10(update.std, old.std)
            elif any(moved):  # a weight with a gradient that stood still while others moved
                scalars[self._tag("update_zero", name)] = 1.0
        scalars[self._tag("update_data_log10", "_target")] = self.target
        scalars[f"{self.prefix}/update_skipped"] = float(not any(moved))
        if self._lr is not None:
            scalars[f"{self.prefix}/lr"] = self._lr
            self._lr = None
        self._emit(trainer, self._step, scalars, {})
