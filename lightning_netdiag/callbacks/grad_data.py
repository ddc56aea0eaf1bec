"""D3 under Lightning: when to measure each weight's gradient (the meter says how)."""

from __future__ import annotations

from collections.abc import Sequence

from lightning_netdiag.callbacks._common import ParameterCallback
from lightning_netdiag.meters import GradDataMeter
from lightning_netdiag.select import WEIGHT_NDIMS

__all__ = ["GradDataRatio"]


class GradDataRatio(GradDataMeter, ParameterCallback):
    r"""Per selected parameter, its gradient's statistics and ``grad.std() / param.std()`` (D3).

    Measured in ``on_before_optimizer_step``: the gradient is complete (every micro-batch of an
    accumulation window has been added, and under DDP it is the all-reduced one), unscaled under AMP
    (also for optimizers that unscale inside their own step, such as fused Adam), and not yet clipped.
    Frozen parameters and parameters without a gradient are skipped.

    Args:
        params: parameter name globs (``"layers.*.weight"``) and module types owning the parameter;
            None selects every parameter (filtered by ``ndims``); a frozen one is watched once it trains.
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
        GradDataMeter.__init__(self, params, exclude, ndims, histograms, prefix, history_size)
        self._cadence(every_n_steps)
