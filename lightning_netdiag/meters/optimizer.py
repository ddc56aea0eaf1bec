"""The optimizer meter: the Adam family's state per watched weight, read from the optimizer after its step.

Adam moves each element by ``lr * m_hat / (sqrt(v_hat) + eps)`` (``m_hat``, ``v_hat``: the moments, bias-corrected).
The *normalised step* ``m_hat / (sqrt(v_hat) + eps)`` is about 1 where the gradient points the same way step after
step and small where it is noise; where ``sqrt(v_hat)`` falls below ``eps`` (gradients that small), eps sets the
step instead of the gradient and Adam turns into a slowed SGD (Wortsman et al. 2023). No extra pass: the moments
are the optimizer's own.

A step's life: :meth:`OptimizerMeter.begin` with the step's number (None: not measured), :meth:`measure` after
the optimizer's step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_netdiag import stats
from lightning_netdiag.capture import own_work
from lightning_netdiag.meters.base import InRecord
from lightning_netdiag.meters.parameters import ParameterMeter, optimizer_family
from lightning_netdiag.record import Key, OptimizerRecord
from lightning_netdiag.select import WEIGHT_NDIMS

__all__ = ["OptimizerMeter", "adam_records"]


#: The most values of moments whose normalised steps are computed together (one call of each ``torch._foreach_*`` op,
#: one launch on a GPU for them all): their temporaries are one float32 tensor of that many values (64 MB) at most,
#: or one weight's where it is larger.
_GROUP = 1 << 24


def _on_host(step: Tensor) -> bool:
    """Whether an Adam step count is read on the host for nothing: a CPU tensor (torch keeps a non-fused,
    non-capturable Adam's there, on a GPU run too)."""
    return step.device.type == "cpu"


def adam_records(moments: Sequence[tuple[Tensor, Tensor, Tensor | float, tuple[float, float], float]]) -> list[Tensor]:
    """Per ``(exp_avg, exp_avg_sq, step, betas, eps)`` of Adam's state, of its normalised step
    ``u = m_hat / (sqrt(v_hat) + eps)``: the sum of squares and the count where ``sqrt(v_hat) < eps`` (eps sets the
    step there), float64 on the moments' device (how many values there are the caller knows on the host).

    With the bias corrections ``c1 = 1 - beta1**t`` and ``c2 = 1 - beta2**t``,
    ``u = m / ((sqrt(v) + eps * sqrt(c2)) * c1 / sqrt(c2))``: one temporary per moment (``sqrt(v)``, then ``u`` in its
    place) and a read of each moment, the moments of each device in groups of up to :data:`_GROUP` values
    (:func:`~lightning_netdiag.stats.size_groups`), one call of each elementwise op per group. ``step`` may be the
    optimizer's own step tensor: read on the host where it is kept there (:func:`_on_host`), kept on the device
    otherwise (a capturable or fused optimizer's, on the GPU; the elementwise ops then take a 0-dim tensor per moment
    instead of a number).
    """
    floors: list[Tensor | float] = []  # eps * sqrt(c2)
    scales: list[Tensor | float] = []  # c1 / sqrt(c2)
    for _, _, step, (beta1, beta2), eps in moments:
        if isinstance(step, Tensor) and _on_host(step):
            step = step.item()
        c1: Tensor | float
        root_c2: Tensor | float
        if isinstance(step, Tensor):
            c1, root_c2 = 1 - beta1 ** step.double(), (1 - beta2 ** step.double()).sqrt()
        else:
            c1, root_c2 = 1 - beta1**step, math.sqrt(1 - beta2**step)
        floors.append(eps * root_c2)
        scales.append(c1 / root_c2)
    by_device: dict[torch.device, list[int]] = {}
    for i, (m, _, _, _, _) in enumerate(moments):
        by_device.setdefault(m.device, []).append(i)
    out: list[Tensor | None] = [None] * len(moments)
    for group in stats.size_groups(by_device.values(), [m.numel() for m, _, _, _, _ in moments], _GROUP):
        us = torch._foreach_sqrt([moments[i][1].float() for i in group])
        below = [stats.count_true(u < floors[i]) for u, i in zip(us, group, strict=True)]
        torch._foreach_add_(us, [floors[i] for i in group])  # type: ignore[misc]  # numbers, or 0-dim tensors
        torch._foreach_mul_(us, [scales[i] for i in group])  # type: ignore[misc]
        torch._foreach_reciprocal_(us)
        torch._foreach_mul_(us, [moments[i][0] for i in group])  # now u
        if stats.launch_bound(us[0].device):  # one launch, its float64 sums taken as it reads (CUDA's foreach norm)
            squares = torch.stack(torch._foreach_norm(us, 2, dtype=torch.float64)).square_()
        else:  # a CPU's norm into float64 copies each u to float64 first: by pieces
            squares = torch.cat([stats.row_squares(u.view(1, -1)) for u in us])
        rows = torch.stack([squares, torch.stack(below).double()], dim=1).unbind()
        for i, row in zip(group, rows, strict=True):
            out[i] = row
    return out  # type: ignore[return-value]


class OptimizerMeter(ParameterMeter):
    """Per selected weight stepped by an Adam-family optimizer: the RMS of its normalised step and the share of
    its elements where eps dominates.

    See :class:`lightning_netdiag.OptimizerState` for the arguments and what is logged.
    """

    record_type = OptimizerRecord
    record: OptimizerRecord
    optimizer_family = InRecord()
    eps = InRecord()

    def __init__(
        self,
        params: Sequence[type | str] | None = None,
        exclude: Sequence[type | str] = (),
        ndims: Sequence[int] | None = WEIGHT_NDIMS,
        prefix: str = "netdiag",
        history_size: int = 10_000,
    ) -> None:
        super().__init__(params, exclude, ndims, prefix, history_size)

    def attach(self, model: Any, run: Any, optimizers: Sequence[Any] = ()) -> None:
        super().attach(model, run, optimizers)
        families = [optimizer_family(o) for o in optimizers]
        self.optimizer_family = next((f for f in families if f is not None), None)

    def after_step(self, optimizer: Any | None, logging: bool) -> None:
        """Just after ``optimizer`` stepped (on a measured step): read its moments."""
        if self._step is None or optimizer is None or optimizer_family(optimizer) != "adam":
            return
        with own_work():
            group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
            moments: list[tuple[Tensor, Tensor, Tensor | float, tuple[float, float], float]] = []
            held_by: list[int] = []
            names: list[str] = []
            counts: list[int] = []  # the whole weight's (a DTensor's numel is): what the ranks' sums are over
            for name, p in self._stepped_by(optimizer):
                state, group = optimizer.state.get(p, {}), group_of[id(p)]
                second = state.get("max_exp_avg_sq") if group.get("amsgrad") else state.get("exp_avg_sq")
                if "exp_avg" not in state or second is None or "step" not in state or "eps" not in group:
                    continue  # not stepped yet, or an Adam kin that keeps other state
                self.eps = float(group["eps"])
                (m, copies), (v, _) = self._shard(name, state["exp_avg"]), self._shard(name, second)
                moments.append((m, v, state["step"], group["betas"], group["eps"]))
                held_by.append(copies)
                names.append(name)
                counts.append(p.numel())
            if not moments:
                return
            with torch.no_grad():
                records = adam_records(moments)
            values = self._values(self._weighted(records, held_by))
            scalars: dict[Key, float] = {}
            for name, count, (sumsq, eps_bound) in zip(names, counts, values, strict=True):
                if count > 0:
                    scalars[("adam_step_rms", name)] = math.sqrt(sumsq / count)
                    scalars[("adam_eps_pct", name)] = 100 * eps_bound / count
            self._emit(self._step, scalars, {})
