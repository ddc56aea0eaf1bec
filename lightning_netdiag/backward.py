"""Seeing ``loss.backward()``: the loss a plain loop backpropagates, at every step, for the price of one Python call.

``Tensor.backward`` is wrapped while someone listens (the plain loop's :class:`~lightning_netdiag.NetDiag`), and
put back when the last listener leaves. A function mode would see the call too, but would pass every torch call of
the step through Python: the plain loop's flight recorder needs the loss at every step. Pure torch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["listen", "unlisten"]

Listener = Callable[[Tensor], None]

_LISTENERS: list[Listener] = []
_ORIGINAL: list[Callable[..., Any]] = []  # Tensor.backward as it was before the first listener came
_INSIDE = threading.local()  # in this thread: a listener's own code, or the call a function mode hands back, seen once


@torch.compiler.disable  # a compiled training step breaks its graph at the backward anyway: run eagerly there
def _backward(self: Tensor, *args: Any, **kwargs: Any) -> Any:
    original = _ORIGINAL[0]
    if getattr(_INSIDE, "now", False):
        return original(self, *args, **kwargs)
    _INSIDE.now = True
    try:
        for listener in tuple(_LISTENERS):
            listener(self)
        return original(self, *args, **kwargs)
    finally:
        _INSIDE.now = False


def listen(listener: Listener) -> None:
    """Have ``listener(tensor)`` called at each ``tensor.backward(...)``, before its backward runs."""
    if not _LISTENERS:
        _ORIGINAL[:] = [Tensor.backward]
        Tensor.backward = _backward  # type: ignore[method-assign]
    _LISTENERS.append(listener)


def unlisten(listener: Listener) -> None:
    """Stop calling ``listener``; the last one to leave puts ``Tensor.backward`` back. Safe to call twice."""
    if listener in _LISTENERS:
        _LISTENERS.remove(listener)
        if not _LISTENERS and Tensor.backward is _backward:
            Tensor.backward = _ORIGINAL[0]  # type: ignore[method-assign]
