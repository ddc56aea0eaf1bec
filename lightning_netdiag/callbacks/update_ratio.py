"""D4 under Lightning: when to measure each weight's update (the meter says how)."""

from __future__ import annotations

from collections.abc import Sequence

from lightning_netdiag.callbacks._common import ParameterCallback
from lightning_netdiag.meters import DEFAULT_TARGET, UpdateMeter
from lightning_netdiag.select import WEIGHT_NDIMS

__all__ = ["UpdateRatio"]


class UpdateRatio(UpdateMeter, ParameterCallback):
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
            None selects every parameter (filtered by ``ndims``); a frozen one is watched once it trains.
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
        UpdateMeter.__init__(self, params, exclude, ndims, target, sample, prefix, history_size)
        self._cadence(every_n_steps)
