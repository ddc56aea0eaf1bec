"""D3 and D4: the parameter meters. They read the watched weights and their gradients around the optimizer's step.

They live at the moments of the meters' one lifecycle (:class:`~lightning_netdiag.meters.Meter`):
:meth:`~ParameterMeter.step_starts` with the step's number (None: not measured); :meth:`GradDataMeter.before_step`
before the optimizer step; :meth:`UpdateMeter.before_step` before it and :meth:`UpdateMeter.after_step` after it.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_netdiag import stats, tags
from lightning_netdiag.capture import own_work
from lightning_netdiag.dist import is_sharded, local_shard
from lightning_netdiag.meters.base import InRecord, Meter
from lightning_netdiag.record import DEFAULT_TARGET, GradDataRecord, Key, ParameterRecord, UpdateRecord
from lightning_netdiag.run import Run, check_positive_int
from lightning_netdiag.select import WEIGHT_NDIMS, check_selection, select_parameters, weight_class

__all__ = ["DEFAULT_TARGET", "GradDataMeter", "ParameterMeter", "UpdateMeter", "optimizer_family"]


def optimizer_family(optimizer: Any) -> str | None:
    """``"sgd"`` (an SGD step, with or without momentum: the update follows ``lr * grad``), ``"adam"`` (the
    Adam kin: each element's step is normalised, about ``lr`` at first), or None (another kind: the report
    does not judge its learning rate). By class name, so that other libraries' Adams count too."""
    names = [cls.__name__ for cls in type(optimizer).__mro__]
    if any("Adam" in n for n in names):
        return "adam"
    return "sgd" if "SGD" in names else None


class ParameterMeter(Meter):
    """Base of the meters that watch parameters (D3, D4). Not for use on its own.

    Args:
        params: parameter name globs (``"layers.*.weight"``) and module types owning the parameter;
            None selects every parameter. A frozen one is watched from the step it has a gradient (unfrozen).
        exclude: name globs and module types never selected.
        ndims: the numbers of dimensions selected; None selects any. The default (2, 3, 4, 5) takes every
            weight: matrices, embeddings, conv kernels, position embeddings; not biases nor norm scales
            (1-D), which the lecture leaves out too.
        prefix: the first part of every tag.
        history_size: the number of points kept in ``history`` per tag.
    """

    record: ParameterRecord
    # what was watched, kept in the record (see ParameterRecord)
    param_shapes = InRecord()
    param_classes = InRecord()

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
            self._warn_nothing_selected(model, f"parameters (looked for: params={self.params}, ndims={self.ndims})")

    def detach(self) -> None:
        self._selected = {}
        self._step = None

    def step_starts(self, step: int, measured: int | None) -> None:
        """A training step begins: ``measured`` is its number if it is measured, else None."""
        self._step = measured

    def _stepped_by(self, optimizer: Any | None) -> list[tuple[str, torch.nn.Parameter]]:
        """The selected parameters that ``optimizer`` updates (None: a manual update of them all) and that
        have a gradient (when sharded, all that train: every rank must send records of the same layout)."""
        params = (
            [p for _, p in self._selected.values()]
            if optimizer is None
            else [p for group in optimizer.param_groups for p in group["params"]]
        )
        out = []
        for p in params:
            chosen = self._selected.get(id(p))
            if chosen is not None and (p.grad is not None or (self._shards > 1 and p.requires_grad)):
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
        return ParameterMeter._weighted(records, [copies for _, copies in parts])

    @staticmethod
    def _weighted(records: list[Tensor], copies: list[int]) -> list[Tensor]:
        """Each record divided by the number of summed ranks that hold its part: the sum counts it once."""
        return [r if n == 1 else r / n for r, n in zip(records, copies, strict=True)]

    def _values(self, parts: list[Tensor], same: Sequence[Tensor] = ()) -> list[list[float]]:
        """The records summed over the ranks that hold shards, and the values ``same`` on every rank (not
        summed), moved to the host at once, one list each."""
        # every rank arrives here at the same step, with the same layout
        return self._summed(parts, across=self._shards > 1, same=same)


class GradDataMeter(ParameterMeter):
    """D3: per selected weight, its gradient's statistics and ``grad.std() / param.std()``.

    See :class:`lightning_netdiag.GradDataRatio` for the arguments and what is logged.
    """

    record_type = GradDataRecord

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

    def detach(self) -> None:
        super().detach()
        self.weight_records = {}

    def before_step(self, optimizer: Any | None) -> None:
        """Just before ``optimizer`` steps (None: before a manual update), with the step's full gradients."""
        if self._step is None:
            return
        with own_work():
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
            scalars: dict[Key, float] = {}
            if amp is not None:  # the scaler skips steps whose gradients overflowed: the report must know it is on
                scalars[("loss_scale", "")] = values.pop()[0]
            histograms: dict[Key, stats.Histogram] = {}
            for i, (name, _) in enumerate(chosen):
                grad_record, param_record = values[2 * i], values[2 * i + 1]
                if not stats.recorded(grad_record):
                    continue
                g, w = stats.Moments.of(grad_record), stats.Moments.of(param_record)
                scalars[("grad_mean", name)] = g.mean
                scalars[("grad_std", name)] = g.std
                scalars[("grad_data_ratio", name)] = g.std / w.std if w.std > 0 else float("nan")
                scalars[("grad_nonfinite", name)] = g.nonfinite
                if self.histograms:
                    histograms[("grad", name)] = stats.Histogram.of(grad_record, self._bins.edges)
            self._emit(self._step, scalars, histograms)


class UpdateMeter(ParameterMeter):
    """D4: per selected weight, ``log10(std(θ_after - θ_before) / std(θ_before))``, from the update applied.

    See :class:`lightning_netdiag.UpdateRatio` for the arguments and what is logged.
    """

    record_type = UpdateRecord
    record: UpdateRecord
    target = InRecord()
    optimizer_family = InRecord()  # of the main group's optimizer, see optimizer_family()

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
        self._optimizers: list[Any] = []  # a selected weight in none of them is compared across the main one's step
        self._main: tuple[Any, int] | None = None  # the optimizer and group holding most selected weights
        self._lr: float | None = None
        self.grad_data: GradDataMeter | None = None  # whose weight records are shared, when one is attached

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
        self._optimizers = list(optimizers)

    def detach(self) -> None:
        super().detach()
        self._before = {}
        self._indices = {}
        self._optimizers = []
        self._main = None

    def meet(self, meters: Sequence[Meter]) -> None:
        """The GradDataMeter among ``meters`` shares its reads of the weights before the step."""
        self.grad_data = next((m for m in meters if isinstance(m, GradDataMeter)), None)

    def manual_step(self, loss: Tensor | None, lr: float | None) -> None:
        """The step is a manual ``p -= lr * p.grad`` (the lecture's loop): plain SGD at ``lr`` (None: unknown)."""
        self._lr = None if lr is None else float(lr)
        self.optimizer_family = "sgd" if lr is not None else None

    def before_step(self, optimizer: Any | None) -> None:
        """Just before ``optimizer`` steps (None: before a manual update of every selected weight)."""
        if self._step is None:
            return
        with own_work():
            chosen = self._stepped_by(optimizer)
            if self._main is not None and optimizer is self._main[0]:
                # A weight with a gradient left out of every optimizer (as they hold their groups now: a backbone
                # unfrozen is added to one) is compared across the main one's step: it must not move.
                held = {id(p) for opt in self._optimizers for group in opt.param_groups for p in group["params"]}
                chosen += [(n, p) for key, (n, p) in self._selected.items() if key not in held and p.grad is not None]
                self._lr = float(optimizer.param_groups[self._main[1]]["lr"])  # a tensor rate: read once a step
            whole: tuple[list[Tensor], list[Tensor]] = ([], [])  # copies to fill, their parts: one multi-tensor copy
            for name, p in chosen:
                part = self._shard(name, p)[0]
                index = self._sample_of(name, part)
                copy = torch.empty_like(part) if index is None else torch.take(part, index)
                if index is None:
                    whole[0].append(copy)
                    whole[1].append(part)
                self._before[name] = (p, index, copy, p._version)
            if whole[0]:
                torch._foreach_copy_(*whole)

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

    def after_step(self, optimizer: Any | None, logging: bool) -> None:
        """After the step's updates: compare each weight with its copy (the copies are freed here; the step of a
        second optimizer finds none left)."""
        before, self._before = self._before, {}
        if self._step is None or not before:
            return
        with own_work():
            shards = [self._shard(name, p) for name, (p, _, _, _) in before.items()]
            copies = [(copy, n) for (_, _, copy, _), (_, n) in zip(before.values(), shards, strict=True)]
            old_records = self._old_records(before, copies)
            # each copy becomes copy - now, the update negated (no second full-size tensor; its std and squares are
            # the update's, all that is read of it): the whole ones by one multi-tensor op
            whole: tuple[list[Tensor], list[Tensor]] = ([], [])
            for (_, index, copy, _), (now, _) in zip(before.values(), shards, strict=True):
                if index is None:
                    whole[0].append(copy)
                    whole[1].append(now)
                else:
                    copy.sub_(torch.take(now, index))
            if whole[0]:
                torch._foreach_sub_(*whole)
            update_records = self._records(copies)
            values = self._values([r for pair in zip(update_records, old_records, strict=True) for r in pair])
            scalars: dict[Key, float] = {}
            moved = [values[2 * i][stats.SUMSQ] > 0 or values[2 * i][stats.NONFINITE] > 0 for i in range(len(before))]
            for i, name in enumerate(before):
                if moved[i]:
                    update, old = stats.Moments.of(values[2 * i]), stats.Moments.of(values[2 * i + 1])
                    scalars[("update_data_log10", name)] = stats.ratio_log10(update.std, old.std)
                elif any(moved):  # a weight with a gradient that stood still while others moved
                    scalars[("update_zero", name)] = 1.0
            scalars[("update_data_log10", tags.TARGET)] = self.target
            scalars[("update_skipped", "")] = float(not any(moved))
            if self._lr is not None:
                scalars[("lr", "")] = self._lr
                if self._main is not None:  # read again at the next step; a manual rate stays as told
                    self._lr = None
            self._emit(self._step, scalars, {})
