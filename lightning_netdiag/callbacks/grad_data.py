"""D3: the gradient of each weight, relative to the weight."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_netdiag import stats
from lightning_netdiag.callbacks._common import ParameterCallback, loss_scale
from lightning_netdiag.capture import WEIGHT_NDIMS


class GradDataRatio(ParameterCallback):
    r"""Per selected parameter, its gradient's statistics and ``grad.std() / param.std()`` (D3).

    Measured in ``on_before_optimizer_step``: the gradient is complete (every micro-batch of an
    accumulation window has been added, and under DDP it is the all-reduced one), unscaled under AMP
    (also for optimizers that unscale inside their own step, such as fused Adam), and not yet clipped.
    Frozen parameters and parameters without a gradient are skipped.

    Args:
        params: parameter name globs (``"layers.*.weight"``) and module types owning the parameter;
            None selects every trainable parameter (filtered by ``ndims``).
        exclude: name globs and module types never selected.
        ndims: the numbers of dimensions selected (default: every weight of rank 2 to 5: matrices,
            embeddings, conv kernels; not biases nor norm scales, as in the lecture); None selects any.
        every_n_steps: measure every n-th optimizer step; None takes ``trainer.log_every_n_steps``.
        histograms: log gradient histograms (TensorBoard) or their quantiles (loggers without histograms).
        prefix: the first part of every tag.
        history_size: the number of points kept in ``history`` per tag.

    Raises:
        ValueError: if an argument is out of range or a selection holds something other than module
            types and strings.

    Example::

        from lightning import Trainer
        from lightning_netdiag import GradDataRatio

        trainer = Trainer(callbacks=[GradDataRatio(params=["layers.*"], every_n_steps=10)])

    **Logged metrics**, per selected parameter ``{name}`` (its qualified name, e.g. ``layers.0.weight``):

    - ``{prefix}/grad_mean/{name}``, ``{prefix}/grad_std/{name}``: mean and (unbiased) std of the gradient;
    - ``{prefix}/grad_data_ratio/{name}``: ``grad.std() / param.std()`` (left out where the parameter's std is 0);
    - ``{prefix}/grad_nonfinite/{name}``: number of NaN/Inf gradient values (left out of everything else);
    - ``{prefix}/grad/{name}``: histogram of the gradient (or ``.../q05``, ``q50``, ``q95``);
    - ``{prefix}/loss_scale``: the AMP GradScaler's scale at the step, when one is on.
    """

    def __init__(
        self,
        params: Sequence[type | str] | None = None,
        exclude: Sequence[type | str] = (),
        ndims: Sequence[int] | None = WEIGHT_NDIMS,
        every_n_steps: int | None = None,
        histograms: bool = True,
        prefix: str = "netdiag",
        history_size: int = 10_000,
    ) -> None:
        super().__init__(params, exclude, ndims, every_n_steps, prefix, history_size)
        self.histograms = bool(histograms)
        self._bins = stats.log2_bins()
        # name -> (step, the parameter's version counter, the ranks holding the part, its record): the weights
        # as they were just before the optimizer step, which UpdateRatio needs too (read once, not twice).
        self.weight_records: dict[str, tuple[int, int, int, Tensor]] = {}

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._measure(trainer, optimizer)

    def _detach(self) -> None:
        super()._detach()
        self.weight_records = {}

    def _measure(self, trainer: pl.Trainer, optimizer: Any) -> None:
        if self._step is None:
            return
        chosen = self._stepped_by(optimizer)
        if not chosen:
            return
        amp = loss_scale(trainer)
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
        values = self._values(trainer, records, same)
        scalars: dict[str, float] = {}
        if amp is not None:  # the scaler skips steps whose gradients overflowed: the report must know it is on
            scalars[f"{self.prefix}/loss_scale"] = values.pop()[0]
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
        self._emit(trainer, self._step, scalars, histograms)
