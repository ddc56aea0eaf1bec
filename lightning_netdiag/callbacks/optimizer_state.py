"""The Adam family's state under Lightning: when to read it (the meter says how)."""

from __future__ import annotations

from collections.abc import Sequence

from lightning_netdiag.callbacks._common import ParameterCallback
from lightning_netdiag.meters import OptimizerMeter
from lightning_netdiag.select import WEIGHT_NDIMS

__all__ = ["OptimizerState"]


class OptimizerState(OptimizerMeter, ParameterCallback):
    r"""Per selected weight stepped by an Adam-family optimizer (Adam, AdamW, ...): its normalised step and
    where eps takes over, read from the optimizer's own moments after its step (no extra pass).

    Adam moves each element by ``lr * m_hat / (sqrt(v_hat) + eps)``. The RMS of the normalised step
    ``m_hat / (sqrt(v_hat) + eps)`` is near 1 where the gradient keeps its direction from step to step and small
    where it is noise; where ``sqrt(v_hat) < eps`` the gradient is so small that eps sets the step (Adam becomes
    a slowed SGD: Wortsman et al. 2023). Other optimizers are not read.

    Args:
        params: parameter name globs and module types owning the parameter; None selects every
            parameter (filtered by ``ndims``); a frozen one is watched once it trains.
        exclude: name globs and module types never selected.
        ndims: the numbers of dimensions selected (default: every weight of rank 2 to 5).
        every_n_steps: measure every n-th optimizer step; None takes ``trainer.log_every_n_steps``.
        prefix: the first part of every tag.
        history_size: the number of points kept in ``history`` per tag.

    Raises:
        ValueError: if an argument is out of range or a selection holds something other than module
            types and strings.

    Example::

        from lightning import Trainer
        from lightning_netdiag import OptimizerState

        trainer = Trainer(callbacks=[OptimizerState()])

    **Logged metrics**, per selected weight ``{name}`` with Adam state, at each measured step:

    - ``{prefix}/adam_step_rms/{name}``: the RMS of ``m_hat / (sqrt(v_hat) + eps)`` (bias-corrected moments;
      ``max_exp_avg_sq`` with amsgrad), as the step just taken used them;
    - ``{prefix}/adam_eps_pct/{name}``: % of the weight's elements with ``sqrt(v_hat) < eps``.
    """

    def __init__(
        self,
        params: Sequence[type | str] | None = None,
        exclude: Sequence[type | str] = (),
        ndims: Sequence[int] | None = WEIGHT_NDIMS,
        every_n_steps: int | None = None,
        prefix: str = "netdiag",
        history_size: int = 10_000,
    ) -> None:
        OptimizerMeter.__init__(self, params, exclude, ndims, prefix, history_size)
        self._cadence(every_n_steps)
