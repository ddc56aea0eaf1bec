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


def adam_records(moments: Sequence[tuple[Tensor, Tensor, Tensor | float, tuple[float, float], float]]) -> list[Tensor]:
    """Per ``(exp_avg, exp_avg_sq, step, betas, eps)`` of Adam's state, of its normalised step
    ``u = m_hat / (sqrt(v_hat) + eps)``: the count, the sum of squares, and the count where ``sqrt(v_hat) < eps``
    (eps sets the step there), float64 on the moments' device.

    With the bias corrections ``c1 = 1 - beta1**t`` and ``c2 = 1 - beta2**t``,
    ``u = sqrt(c2) / c1 * m / (sqrt(v) + eps * sqrt(c2))``: one temporary per moment (``sqrt(v)``, then ``u`` in its
    place) and a read of each moment, the moments of up to :data:`_GROUP` values at a time in one call of each
    elementwise op. ``step`` may be the optimizer's own step tensor: read on the host where that is free (on the
    CPU: torch keeps a non-fused, non-capturable Adam's there), kept on the device otherwise (a capturable or fused
    optimizer's, on the GPU; its elementwise ops then take a tensor per moment).
    """
    out: list[Tensor] = []
    for group in _groups([m.numel() for m, _, _, _, _ in moments]):
        ms, vs = [moments[i][0] for i in group], [moments[i][1] for i in group]
        floors: list[Tensor | float] = []
        scales: list[Tensor | float] = []
        for i in group:
            _, _, step, (beta1, beta2), eps = moments[i]
            if isinstance(step, Tensor) and step.device.type == "cpu":
                step = step.item()
            c1: Tensor | float
            root_c2: Tensor | float
            if isinstance(step, Tensor):
                c1, root_c2 = 1 - beta1 ** step.double(), (1 - beta2 ** step.double()).sqrt()
            else:
                c1, root_c2 = 1 - beta1**step, math.sqrt(1 - beta2**step)
            floors.append(eps * root_c2)
            scales.append((root_c2 / c1) ** 2)
        us = torch._foreach_sqrt([v.float() for v in vs])
        below = [torch.count_nonzero(u < floor) for u, floor in zip(us, floors, strict=True)]
        torch._foreach_add_(us, floors)  # type: ignore[arg-type]  # floats, or 0-dim tensors (a step on the device)
        torch._foreach_reciprocal_(us)
        torch._foreach_mul_(us, ms)  # now u / (sqrt(c2) / c1)
        squares = torch.stack(torch._foreach_norm(us, 2, dtype=torch.float64)).square_()
        device = squares.device
        scale = torch.stack([torch.as_tensor(c, dtype=torch.float64, device=device) for c in scales])
        counts = torch.tensor([float(u.numel()) for u in us], dtype=torch.float64, device=device)
        out += torch.stack([counts, squares * scale, torch.stack(below).double()], dim=1).unbind()
    return out


def _groups(sizes: Sequence[int]) -> list[list[int]]:
    """Consecutive indices of ``sizes`` in groups of at most :data:`_GROUP` values (one larger alone)."""
    groups: list[list[int]] = []
    total = 0
    for i, n in enumerate(sizes):
        if not groups or total + n > _GROUP:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += n
    return groups


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
            if not moments:
                return
            with torch.no_grad():
                records = adam_records(moments)
            values = self._values([r if n == 1 else r / n for r, n in zip(records, held_by, strict=True)])
            scalars: dict[Key, float] = {}
            for name, (count, sumsq, eps_bound) in zip(names, values, strict=True):
                if count > 0:
                    scalars[("adam_step_rms", name)] = math.sqrt(sumsq / count)
                    scalars[("adam_eps_pct", name)] = 100 * eps_bound / count
            self._emit(self._step, scalars, {})
