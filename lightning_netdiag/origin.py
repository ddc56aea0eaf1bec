"""Where non-finite values were made: a step's forward replayed without gradients, a hook on every module.

When a step's gradients turn non-finite the optimizer has not stepped yet: the weights are still those that made
them. The step's outermost module calls (kept by reference while the step runs) are run again without gradients,
each module's output looked at as it finishes: the first module to finish with a non-finite output made it (a module
finishes before the one that called it, so this is the innermost); inputs that were not finite to begin with are the
data's. A forward that stays finite leaves the backward. Only the step's own state is touched: the buffers (batch
norm's running statistics) and the random generators are restored after the replay, and the other diagnostics'
captures look away while it runs.

No Lightning here: the flight recorder decides when, and on which device (where the verdict is read at once).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import TypedDict

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map
from typing_extensions import NotRequired

from lightning_netdiag.capture import HookHandles, paused

__all__ = [
    "FLOAT16_MAX", "FORWARD", "INPUTS", "MAX_CALLS", "NOT_FORWARD", "SAME", "ForwardCalls", "Made", "Replayed",
    "floating_tensors", "reproduces", "where_nonfinite",
]  # fmt: skip

#: Where the replay found the first non-finite value: a module's forward, the data, or not in the forward at all.
FORWARD, INPUTS, NOT_FORWARD = "forward", "inputs", "backward"

#: Where a step's non-finite values were made (:func:`where_nonfinite`): ``in`` the forward (``module``: the first
#: module whose output was not finite; ``overflow``: its float16 output, run again in float32 from the same inputs,
#: is finite, with this largest magnitude: float16's range overflowed), its inputs, or not the forward.
Made = TypedDict("Made", {"in": str, "module": NotRequired[str], "overflow": NotRequired[float]})
#: The largest finite float16 value: a value past it overflows to inf.
FLOAT16_MAX = float(torch.finfo(torch.float16).max)


class Replayed(TypedDict):
    """Whether a step's forward, run again on the same inputs with the same weights and random state, gave the same
    output (``same``), with the fingerprints of the output as it ran (``first``) and again (``again``)."""

    same: bool
    first: float
    again: float


#: The relative difference of two fingerprints of one output above which they differ: far above what the order of
#: a reduction changes (1e-7 in float32), far below what a fault does
SAME = 1e-4
#: The calls kept per step, at most (accumulation over more micro-batches, or a loop whose steps are not seen: no
#: replay, rather than inputs held without end).
MAX_CALLS = 64


class ForwardCalls:
    """The training forwards of a step, kept by reference for a replay: the calls of the model (or, where the model
    itself is never called, as a LightningModule's is not, of its direct children).

    Example::

        calls = ForwardCalls(model)
        loss = model(x).sum(); loss.backward()
        where_nonfinite(calls)  # {"in": "backward"}: the forward was finite
        calls.step_done()
    """

    def __init__(self, model: nn.Module, device: torch.device | None = None) -> None:
        self.model, self.device = model, device if device is not None else torch.device("cpu")
        self.device_type = self.device.type
        # each call with its autocast (a mixed-precision forward is replayed as it ran)
        self.calls: list[tuple[nn.Module, tuple, dict, torch.dtype | None]] = []
        self.states: list[Tensor] = []  # the random generator's state as each call began (dropout replayed as it was)
        self.outputs: list[Tensor] = []  # each call's output fingerprint, on its device (nothing read back)
        self._root = HookHandles()
        self._children = HookHandles()
        self._settled = False  # whether the first step showed which modules are called
        self._called = False  # whether the model itself is (its children's calls are then within its own)
        self.complete = True  # no call of the step was left out
        self._root.add(model.register_forward_pre_hook(self._keep, with_kwargs=True))
        self._root.add(model.register_forward_hook(self._output))
        for child in model.children():
            self._children.add(child.register_forward_pre_hook(self._keep, with_kwargs=True))
            self._children.add(child.register_forward_hook(self._output))

    def _keep(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not (module.training and torch.is_grad_enabled()):  # an evaluation, not a training forward
            return
        if module is self.model:
            self._called = True
        elif self._called:  # a call within the model's: replayed with it
            return
        if len(self.calls) >= MAX_CALLS:
            self.complete = False
            return
        cast = torch.get_autocast_dtype(self.device_type) if torch.is_autocast_enabled(self.device_type) else None
        self.calls.append((module, args, kwargs, cast))
        self.states.append(_rng_state(self.device))

    def _output(self, module: nn.Module, args: object, output: object) -> None:
        """A kept call's output: its fingerprint (one reduction, on the device)."""
        if len(self.outputs) < len(self.calls) and self.calls[len(self.outputs)][0] is module:
            self.outputs.append(fingerprint(output))

    def step_done(self) -> None:
        """The step is over: its calls are let go. After the first, a model that is called itself holds all the
        others: its children are no longer watched (a hook less per call)."""
        if not self._settled and self.calls:
            self._settled = True
            if self._called:
                self._children.remove()
        self.calls.clear()
        self.states.clear()
        self.outputs.clear()
        self.complete = True

    def remove(self) -> None:
        self._root.remove()
        self._children.remove()
        self.step_done()


def floating_tensors(output: object) -> list[Tensor]:
    """The floating tensors of a module's output (or inputs): a tensor, a tuple or list, a dict or a ``ModelOutput``."""
    if isinstance(output, Tensor):
        return [output] if output.is_floating_point() else []
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else ()
    return [t for v in values for t in floating_tensors(v)]


def fingerprint(output: object) -> Tensor:
    """The sum of an output's floating values (float32 sums, float64 for float64 values), as float64 (NaN for an
    output without any). Not summed into float64: torch would first copy the whole output to float64 (a language
    model's logits at every step: 166 ms against 16 for 8 x 128 tokens of a 50,257-token vocabulary on a CPU)."""
    parts = [t.detach().sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32).double()
             for t in floating_tensors(output)]  # fmt: skip
    return torch.stack(parts).sum() if parts else torch.tensor(float("nan"), dtype=torch.float64)


def _rng_state(device: torch.device) -> Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _nonfinite(value: object) -> bool:
    return any(not bool(torch.isfinite(t).all()) for t in floating_tensors(value))


@contextlib.contextmanager
def _replaying(calls: ForwardCalls) -> Iterator[Callable[[int], object]]:
    """The step's ``calls`` ready to run again (``run(i)``: call ``i``'s output), without gradients, each from the
    random state it began with and under its autocast, the other diagnostics' captures looking away; the model's
    buffers (batch norm's running statistics) and the random generators as they were afterwards."""
    buffers = list(calls.model.buffers())
    kept = [b.clone() for b in buffers]
    gpus = [calls.device.index or 0] if calls.device_type == "cuda" else []

    def run(i: int) -> object:
        module, args, kwargs, cast = calls.calls[i]
        if calls.device_type == "cuda":
            torch.cuda.set_rng_state(calls.states[i], calls.device)
        else:
            torch.set_rng_state(calls.states[i])
        with torch.autocast(calls.device_type, dtype=cast, enabled=cast is not None):
            return module(*args, **kwargs)

    try:
        with torch.no_grad(), torch.random.fork_rng(devices=gpus), paused():
            yield run
    finally:
        with torch.no_grad():
            for b, saved in zip(buffers, kept, strict=True):
                b.copy_(saved)


def where_nonfinite(calls: ForwardCalls) -> Made | None:
    """The replay of the step's ``calls`` (see the module's docstring): ``{"in": FORWARD, "module": name}`` for the
    first module of the model to finish with a non-finite output, ``{"in": INPUTS}`` where a call's inputs were not
    finite, ``{"in": NOT_FORWARD}`` where the forward stayed finite; None without calls, with more than
    :data:`MAX_CALLS`, or where the replay failed (it raised: the error is not the run's). Where that first output is
    float16 (autocast) from finite inputs, the module is run once more in float32: finite there, it is float16's range
    that overflowed (``overflow``: the largest magnitude), not a division by zero nor a log of 0."""
    model = calls.model
    if not calls.calls or not calls.complete:
        return None
    names = {module: name or type(model).__name__ for name, module in model.named_modules()}
    found: list[Made] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        if found or not _nonfinite(output):
            return
        made: Made = {"in": FORWARD, "module": names.get(module, type(module).__name__)}
        found.append(made)  # first: the module runs again below, and this hook with it
        half = any(t.dtype == torch.float16 for t in floating_tensors(output))
        if half and not _nonfinite((args, kwargs)):
            largest = _largest_in_float32(module, args, kwargs, calls.device_type)
            if largest is not None:
                made["overflow"] = largest

    handles = HookHandles()
    for module in model.modules():  # after the model's own hooks: what they do to an output is the module's
        handles.add(module.register_forward_hook(hook, with_kwargs=True))
    try:
        with _replaying(calls) as run:
            for i, (_, args, kwargs, _) in enumerate(calls.calls):
                if _nonfinite(args) or _nonfinite(kwargs):
                    return {"in": INPUTS}
                run(i)
                if found:
                    return found[0]
        return {"in": NOT_FORWARD}
    except Exception:  # noqa: BLE001 - a replay that fails says nothing of the run
        return None
    finally:
        handles.remove()


def _largest_in_float32(module: nn.Module, args: tuple, kwargs: dict, device_type: str) -> float | None:
    """The largest magnitude of ``module``'s output run in float32 (autocast off, its float16 inputs cast up); None
    where it is not finite there either, or cannot run so (its weights are float16: a model cast to half)."""

    def up(x: object) -> object:
        return x.float() if isinstance(x, Tensor) and x.dtype == torch.float16 else x

    try:
        with torch.autocast(device_type, enabled=False):
            output = module(*tree_map(up, args), **tree_map(up, kwargs))
    except Exception:  # noqa: BLE001 - it cannot run in float32: nothing said
        return None
    tensors = [t for t in floating_tensors(output) if t.numel()]
    if not tensors or _nonfinite(output):
        return None
    return max(float(t.abs().max()) for t in tensors)


def reproduces(calls: ForwardCalls) -> Replayed | None:
    """The step's ``calls`` run again (:func:`_replaying`): whether the outputs are those the step made (their
    fingerprints within :data:`SAME`, relatively). A different output, from the same inputs, weights and random
    state, is non-determinism or a fault of the hardware: the spike does not reproduce. None where the step's calls
    were not all kept, or the replay failed."""
    if not calls.calls or not calls.complete or len(calls.outputs) != len(calls.calls):
        return None
    try:
        with _replaying(calls) as run:
            again = [fingerprint(run(i)) for i in range(len(calls.calls))]
        first, second = float(torch.stack(calls.outputs).sum()), float(torch.stack(again).sum())
    except Exception:  # noqa: BLE001 - a replay that fails says nothing of the run
        return None
    same = first == second or abs(first - second) <= SAME * max(abs(first), abs(second))
    return {"same": same, "first": first, "again": second}
