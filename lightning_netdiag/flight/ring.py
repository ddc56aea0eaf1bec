"""The flight recorder's ring: the last steps' rows on the device, pure tensor work. Each step writes its row in
place (into views made once: on a CPU a call, not its work, is the cost); nothing is read back to the host but at an
event, a save or the end (:meth:`Ring.read`).

A row: the step's loss, the total gradient norm, each watched weight's update, weight and gradient norms (in that
order of series), the fingerprint of the step's batch, the micro-batch losses seen (where ranks are summed). The
scored columns (the loss, the total gradient norm, each weight's update and norm) are one slice, the norms another
(summed across ranks as one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_netdiag import spikes

__all__ = ["BATCH", "COUNT", "GRAD_TOTAL", "LOSS", "NORMS", "PRIORITY", "SERIES", "Ring", "Row"]

LOSS, GRAD_TOTAL, NORMS, BATCH, COUNT = 0, 1, 2, -2, -1  # the columns of a row
SERIES = ("update norm", "weight norm", "gradient norm")  # each weight's, in the row's order
PRIORITY = (1, 0, 2)  # at the same step, a weight's own change (its norm, its update) before the gradients it makes


class Row:
    """A row of the ring with the views each kernel writes into."""

    def __init__(self, row: Tensor, w: int) -> None:
        self.all, self.loss, self.grad_total, self.count = row, row[LOSS], row[GRAD_TOTAL], row[COUNT]
        self.batch = row[BATCH]
        self.judged, self.scored = row[:2], row[: 2 + 2 * w]  # the loss and total gradient; every scored column
        self.norms = row[NORMS : NORMS + 3 * w]
        self.changes, self.updates = self.norms[: 2 * w], self.norms[:w]
        self.weights, self.grads = self.norms[w : 2 * w], self.norms[2 * w :]


class Ring:
    """The last ``window`` steps' rows (at least :data:`spikes.BAND` + 1: the band of a step is the rows before it),
    each row's step and whether a loss was seen there."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.size = max(window, spikes.BAND + 1)
        self.tensor: Tensor | None = None  # [size, 4 + 3 * weights], float32, on the device; NaN where unwritten
        self.slots: Sequence[Row] = ()
        self.steps: list[int | None] = [None] * self.size  # the step of each row
        self.seen = [False] * self.size  # whether a loss was seen at each row's step (on this rank)
        self.rates: list[tuple[float, ...]] = [()] * self.size  # each parameter group's learning rate at it (host)
        self.guarded = [False] * self.size  # whether the guard skipped its step
        self.joined = [0] * self.size  # the parameters that began training at its step (unfrozen)
        self.rows = 0  # rows written so far
        self._back: Tensor | None = None  # -BAND, ..., -1: the rows of a band, from the step's, on the device

    def allocate(self, device: torch.device, w: int, kept: Sequence[int | None] = ()) -> None:
        """The ring and its rows' views for ``w`` weights, on ``device``. Where a ring is already allocated (weights
        joined, unfrozen), its rows are kept: ``kept[j]`` is the new weight ``j``'s place in the old rows (None: a
        weight new to the ring, NaN before)."""
        old, old_w = self.tensor, (0 if self.tensor is None else (self.tensor.shape[1] - 4) // 3)
        self.tensor = torch.full((self.size, 4 + 3 * w), math.nan, dtype=torch.float32, device=device)
        if old is not None:
            pairs = [(j, i) for j, i in enumerate(kept) if i is not None]
            new_cols = [LOSS, GRAD_TOTAL, BATCH, COUNT]  # the step's own columns: at the same (negative) places
            old_cols = list(new_cols)
            for k in range(len(SERIES)):
                new_cols += [NORMS + k * w + j for j, _ in pairs]
                old_cols += [NORMS + k * old_w + i for _, i in pairs]
            self.tensor[:, new_cols] = old[:, old_cols]
        self.slots = [Row(row, w) for row in self.tensor.unbind(0)]
        self._back = torch.arange(-spikes.BAND, 0, device=device)

    @property
    def next(self) -> Row:
        """The row the step under way writes."""
        return self.slots[self.rows % self.size]

    def written(self, step: int, seen: bool, rates: tuple[float, ...], guarded: bool = False, joined: int = 0) -> None:
        """The step under way wrote its row; ``rates``: its parameter groups' learning rates; ``guarded``: the guard
        skipped it; ``joined``: the parameters that began training at it."""
        i = self.rows % self.size
        self.steps[i], self.seen[i], self.rates[i] = step, seen, rates
        self.guarded[i], self.joined[i] = guarded, joined

    def band(self, columns: int) -> Tensor:
        """The first ``columns`` of the :data:`spikes.BAND` rows before the step under way, found on the device (an
        index from the host would wait for it); rows not yet written are NaN: no part of a band."""
        assert self.tensor is not None and self._back is not None
        before = torch.remainder(self._back + self.rows, self.size)
        return self.tensor[before, :columns]

    def advance(self) -> None:
        """The step under way is done: the next one writes the next row."""
        self.rows += 1

    def read(self, since: int = 0) -> tuple[list[int], Tensor]:
        """The rows from row ``since`` on (those still held, at most ``window``) on the host, oldest first: their
        places in the ring and their values. One copy of the whole ring, the rows picked on the host, so that nothing
        is allocated on the device, which may be out of memory."""
        n = min(self.rows - since, self.window)
        if self.tensor is None or n <= 0:
            return [], torch.empty(0)
        order = [(self.rows - n + k) % self.size for k in range(n)]
        return order, self.tensor.cpu()[order]

    @property
    def last_step(self) -> int | None:
        """The step of the last row written."""
        return self.steps[(self.rows - 1) % self.size] if self.rows else None
