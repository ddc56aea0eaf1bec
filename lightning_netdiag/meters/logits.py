"""The logit meter: what every attention's softmax sees, and the model's output logits, at measured steps.

It lives at the moments of the meters' one lifecycle (:class:`~lightning_netdiag.meters.Meter`), as the activation
meter does: :meth:`~LogitMeter.forward_starts` before each forward of the step, :meth:`~LogitMeter.backward_starts`
and :meth:`~LogitMeter.backward_ends` around its backward, :meth:`~LogitMeter.before_step` before the optimizer
step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_netdiag.attention import AttentionHooks, AttentionLayer
from lightning_netdiag.capture import compiled, own_work
from lightning_netdiag.dist import rank_zero_warn
from lightning_netdiag.meters.base import InRecord, Meter
from lightning_netdiag.record import Key, LogitRecord
from lightning_netdiag.run import Run, check_positive_int

__all__ = ["LogitMeter"]

_OUTPUT = "\0output"  # the output's place among the layers of a reduction (no module has this name)


class LogitMeter(Meter):
    """Per attention call, its largest logit, its softmax's mean normalised entropy and the RMS of its q and k; the
    output's mean log Z and largest logit.

    See :class:`lightning_netdiag.LogitMonitor` for the arguments, what is watched and what is logged.
    """

    record_type = LogitRecord
    watches_forward = True
    record: LogitRecord
    attention_kinds = InRecord()
    qk_norm = InRecord()
    unwatched = InRecord()
    output = InRecord()

    def __init__(self, max_calls: int = 16, prefix: str = "netdiag", history_size: int = 10_000) -> None:
        super().__init__(prefix, history_size)
        check_positive_int("max_calls", max_calls)
        self.max_calls = max_calls
        self._hooks: AttentionHooks | None = None
        self._step: int | None = None
        self._pending = False

    def attach(self, model: nn.Module, run: Run, optimizers: Sequence[Any] = ()) -> None:
        """Watch ``model``'s attention calls and output, before its first forward."""
        self.detach()
        self.run = run
        if compiled(model):
            rank_zero_warn(
                f"{type(self).__name__}: the model runs under torch.compile, where watching its attention calls and "
                "output would break the graph; attention and output logits are not measured."
            )
            return
        self._hooks = AttentionHooks(model, self.max_calls)

    def detach(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
        self._hooks, self._step, self._pending = None, None, False

    def forward_starts(self, measured: int | None, device: torch.device | None) -> None:
        """A forward of a training step begins: ``measured`` is its number if it is measured, else None."""
        hooks = self._hooks
        if hooks is None:
            return
        if measured != self._step:
            self._step = measured
            if device is not None:  # given where the step is measured
                hooks.prepare(device)
        self._pending = measured is not None
        if self._pending:
            hooks.start()

    def backward_starts(self, loss: Tensor | None) -> None:
        """A backward starts: the forward's output is read, and a recomputed forward records nothing."""
        if self._hooks is not None and self._pending:
            self._hooks.backward()
            self._hooks.output.backward(None)

    def backward_ends(self) -> None:
        if self._hooks is not None:
            self._hooks.backward_done()

    def pause(self) -> None:
        """The training batch ended: nothing after it (validation) is recorded."""
        if self._hooks is not None:
            self._hooks.stop()

    def before_step(self, optimizer: Any | None) -> None:
        """Just before the optimizer step of a measured step: reduce and emit its records."""
        hooks, step = self._hooks, self._step
        if hooks is None or step is None or not self._pending:
            return
        with own_work():
            self._pending = False
            hooks.stop()
            out = hooks.output
            local = {layer.name: layer for layer in hooks.layers if layer.peak is not None}
            names = [n for n in self._union({**dict.fromkeys(local), _OUTPUT: None}) if n != _OUTPUT]
            device = self.run.device if self.run is not None and self._world() > 1 else _device(hooks, out.record)
            sums: list[Tensor] = []
            peaks: list[Tensor] = []
            for name in names:
                layer = local.get(name)
                ran = layer is not None and layer.sums is not None and layer.peak is not None
                sums.append(layer.sums if ran else torch.zeros(AttentionLayer.SUMS, dtype=torch.float64, device=device))  # type: ignore[union-attr,arg-type]
                peaks.append(layer.peak if ran else _nothing(device))  # type: ignore[union-attr,arg-type]
            sums.append(
                out.record[[0, 5]] if out.record is not None else torch.zeros(2, dtype=torch.float64, device=device)
            )
            peaks.append(out.peak if out.peak is not None else _nothing(device))
            values = self._summed([t.to(device) for t in sums], self._world() > 1, peaks=[t.to(device) for t in peaks])
            n = len(names) + 1
            summed, maxed = values[:n], values[n:]
            self._describe(hooks, out.name)
            scalars: dict[Key, float] = {}
            order = {layer.name: layer.depth for layer in hooks.layers}
            for i in sorted(range(len(names)), key=lambda i: order.get(names[i], (True, 0))):
                q_sq, q_n, k_sq, k_n, entropy, rows = summed[i]
                if maxed[i][0] == -math.inf:  # not run on any rank at this step
                    continue
                if math.isfinite(maxed[i][0]):
                    scalars[("attn_logit_max", names[i])] = maxed[i][0]
                else:  # overflowed (fp16: above 65504) or NaN: said as such, never dropped as a non-finite value
                    scalars[("attn_logit_nonfinite", names[i])] = 1.0
                if q_n > 0 and k_n > 0:
                    scalars[("attn_q_rms", names[i])] = math.sqrt(q_sq / q_n)
                    scalars[("attn_k_rms", names[i])] = math.sqrt(k_sq / k_n)
                if rows > 0 and math.isfinite(entropy):
                    scalars[("attn_entropy", names[i])] = entropy / rows
            rows, log_z = summed[-1]
            if rows > 0 and self.output is not None:
                scalars[("output_logz", self.output)] = log_z / rows
                scalars[("output_logit_max", self.output)] = maxed[-1][0]
            self._emit(step, scalars, {})

    def _describe(self, hooks: AttentionHooks, output: str | None) -> None:
        for layer in sorted(hooks.layers, key=lambda layer: layer.depth):
            self.attention_kinds[layer.name] = "fused" if layer.fused else "eager"
            if layer.qk_norm:
                self.qk_norm.add(layer.name)
        self.unwatched = set(hooks.unwatched)
        if output is not None:
            self.output = output


def _nothing(device: torch.device) -> Tensor:
    return torch.full((1,), -math.inf, dtype=torch.float64, device=device)


def _device(hooks: AttentionHooks, record: Tensor | None) -> torch.device:
    for layer in hooks.layers:
        if layer.peak is not None:
            return layer.peak.device
    return record.device if record is not None else torch.device("cpu")
