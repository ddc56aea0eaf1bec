"""The activation hooks: what runs in a forward and its backward, as resources with a lifetime.

No Lightning here either: the front ends decide *when* (through the meters), this module only measures.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack
from torch.utils.hooks import RemovableHandle

from lightning_netdiag import activations, stats

__all__ = [
    "BACKWARD", "FORWARD", "IDLE", "ActivationHooks", "HookHandles", "Layer", "ModeExit", "OutputProbe", "compiled",
    "own_work", "paused", "unit_dim_of", "watching",
]  # fmt: skip


_PAUSED = [False]


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Every capture looks away: a forward replayed (:mod:`lightning_netdiag.origin`) is not one to measure."""
    before, _PAUSED[0] = _PAUSED[0], True
    try:
        yield
    finally:
        _PAUSED[0] = before


def watching() -> bool:
    """Whether the captures record what runs (not while :func:`paused`)."""
    return not _PAUSED[0]


def own_work() -> contextlib.AbstractContextManager:
    """Our own statistics, run past the function modes: ours look only at the model's calls, and through a Python
    handler each of our ops costs half again as much on a CPU and several times its launch on a GPU (GPT-2 124M's
    logging step on an H200 made ~9,700 such calls)."""
    if not torch.compiler.is_compiling() and torch._C._is_torch_function_mode_enabled():
        return torch._C.DisableTorchFunction()
    return contextlib.nullcontext()


class HookHandles:
    """Hook handles with one lifetime: ``remove()`` detaches them all and is safe to call again."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle | ModeExit] = []

    def add(self, handle: RemovableHandle | ModeExit) -> None:
        self._handles.append(handle)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __len__(self) -> int:
        return len(self._handles)

    def watch_calls(self, mode: TorchFunctionMode, enter: Callable, leave: Callable) -> None:
        """Every torch call through ``mode``, and global module hooks that see each module's forward begin
        (``enter``) and end (``leave``, also when it raises), until :meth:`remove`: an armed step's captures."""
        self.add(register_module_forward_pre_hook(enter))
        self.add(register_module_forward_hook(leave, always_call=True))
        mode.__enter__()
        self.add(ModeExit(mode))

    def __enter__(self) -> HookHandles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def compiled(model: nn.Module) -> bool:
    """Whether ``model`` or one of its submodules runs under torch.compile (Lightning's ``fit`` of a
    compiled module, ``torch.compile(submodule)``, or ``module.compile()``)."""
    if getattr(model, "_compiler_ctx", None):  # Lightning unwraps a compiled LightningModule and marks it so
        return True
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # pragma: no cover - torch without dynamo
        return False
    return any(isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) for m in model.modules())


def unit_dim_of(t: Tensor, unit_dim: int | None) -> int:
    """The dimension that indexes units: ``unit_dim`` if given; by default the channels (dim 1) of a
    convolution's (N, C, H, W) or (N, C, D, H, W) output, the last dim of (N, F) and (N, T, F) outputs."""
    if unit_dim is not None:
        return unit_dim
    return 1 if t.dim() >= 4 else -1


IDLE, FORWARD, BACKWARD = "idle", "forward", "backward"


class Layer:
    """One watched activation call: a module's k-th call in a forward, or a functional call's.

    Its records are summed over the armed step. They are buffers allocated once and then zeroed and added
    to in place, so that a compiled graph keeps reading and writing the same tensors: no recompilation, and
    a gradient hook that only mutates a tensor traces into the graph without a break.
    """

    def __init__(self, name: str, kind: activations.Kind, type_name: str, threshold: float, grad_bins: stats.Bins):
        self.name, self.kind, self.type_name = name, kind, type_name
        self.rule = kind.rule(threshold)
        self.has_rule = self.rule is not None
        self.act_bins = self.rule.bins if self.rule is not None else kind.bins()
        self.grad_bins = grad_bins
        self.order: int | None = None  # position of its first call in the forward: depth order
        self.placeholder = False  # held for another rank's layer that this rank has not run
        # Made inside a module that runs more than once per forward (a recurrent cell over time steps): its
        # calls are steps in time, not depth. Known only where calls are watched (their owners are tracked).
        self.in_loop = False
        self.act: Tensor | None = None  # [moments, saturated, *histogram]
        self.grad: Tensor | None = None  # [moments, fp16 values, fp16 values below its normal range, *histogram]
        self.alive: Tensor | None = None  # per unit: examples in which it is not saturated; sized by the first run

    @property
    def depth(self) -> tuple[bool, int]:
        """Sorts layers in the order of their first call; those never run (here) last."""
        return (self.order is None, self.order or 0)

    def spec(self) -> tuple:
        """What another rank needs to hold this layer's place in a reduction: plain values only."""
        b = self.act_bins
        return (self.name, self.kind.name, self.kind.family, self.type_name, self.has_rule, (b.kind, b.lo, b.hi, b.exp))

    @classmethod
    def from_spec(cls, spec: tuple, grad_bins: stats.Bins) -> Layer:
        """A layer that this rank never ran: zeros of the right sizes in the reduction, read by name."""
        name, kind_name, family, type_name, has_rule, bins = spec
        layer = cls(name, activations.Kind(kind_name, family), type_name, stats.DEFAULT_THRESHOLD, grad_bins)
        layer.has_rule, layer.act_bins, layer.placeholder = has_rule, stats.Bins(*bins), True
        return layer

    def allocate(self, device: torch.device, histograms: bool, track_grad: bool) -> None:
        self.act_bins, self.grad_bins = self.act_bins.to(device), self.grad_bins.to(device)
        size = stats.record_size(self.act_bins if histograms else None, int(self.has_rule))
        self.act = torch.zeros(size, dtype=torch.float64, device=device)
        size = stats.record_size(self.grad_bins if histograms else None, stats.HALF_EXTRA)
        self.grad = torch.zeros(size, dtype=torch.float64, device=device) if track_grad else None
        self.alive = None


class ActivationHooks:
    """Hooks on the watched activation modules and, on armed steps, on every functional activation call.

    Module hooks are registered for an armed step only (:meth:`start` to :meth:`stop`): a module with a hook
    takes ``nn.Module``'s slow call path, about 3 µs a call on a CPU, on every step. Under torch.compile they stay
    registered for the whole fit and return at once unless a step is armed (``persistent``): hooks added and
    removed would change what the compiled graph guards on and recompile it at every logging step. Functional
    calls are seen through a ``TorchFunctionMode`` and the owning module through global module hooks,
    both entered only for an armed step and left after its backward; after the first armed step, only where
    it watched a functional call (:meth:`_looks_for_calls`).

    Phases: ``FORWARD`` records each call's output and hooks its gradient; ``BACKWARD`` (activation
    checkpointing recomputes the forward inside the backward) records nothing again and only hooks the
    gradient of recomputed outputs that need one (reentrant checkpointing, where the first forward ran
    without grad); ``IDLE`` does nothing.

    Each call of a module in one forward is a layer of its own (``name``, ``name-2``, ...); calls from
    ``max_calls`` on share the last one. A functional call is named by the module whose forward made it
    and the function (``layer1.0/relu``, ``layer1.0/relu-2``; at the top level just ``relu``). A call made
    inside an activation module's own forward belongs to that module and is not counted again.

    Args:
        model: the model whose modules own the calls.
        modules: the watched activation modules, with their names and kinds.
        watch_call: decides for a functional call (owner name, owner module, layer name) whether it is
            watched; None watches no functional call.
        threshold: the saturation threshold of the smoothly bounded kinds.
        histograms: whether records carry histogram counts.
        track_grad: whether to hook each output's gradient (D2).
        unit_dim: the dimension that indexes units, for dead units; None: :func:`unit_dim_of`.
        grad_divisor: called at each recorded call; what the output's gradient will be divided by (the
            AMP loss scale times the data-parallel world size), or None.
        max_calls: the number of calls per module (or per function and owner) with a layer of their own.
        activation_modules: every activation module of the model, watched or excluded: a functional call
            inside one's forward is its own, never a layer.
        persistent: keep the module hooks registered between armed steps (a compiled model).
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Sequence[tuple[str, nn.Module, activations.Kind]],
        watch_call: Callable[[str, nn.Module, str], bool] | None,
        threshold: float,
        histograms: bool,
        track_grad: bool,
        unit_dim: int | None,
        grad_divisor: Callable[[], Tensor | float | None],
        max_calls: int = 16,
        activation_modules: Iterable[nn.Module] = (),
        persistent: bool = False,
    ) -> None:
        self.threshold, self.histograms, self.track_grad, self.unit_dim = threshold, histograms, track_grad, unit_dim
        self.grad_divisor, self.watch_call, self.max_calls = grad_divisor, watch_call, max_calls
        self.phase = IDLE
        self.layers: list[Layer] = []
        self._grad_bins = stats.log2_bins()
        self._by_key: dict[tuple, Layer] = {}
        self._by_name: dict[str, Layer] = {}
        self._skipped: set[tuple] = set()
        self._calls: dict[tuple, int] = {}
        self._pending: dict[int, Tensor] = {}  # input-side saturation masks, from the pre-hook to the hook
        self._later = _Later()  # small records of this pass, taken together at its end
        self._divisor: Tensor | float | None = None  # grad_divisor() in this armed forward
        self._device: torch.device | None = None
        self._seen = 0
        self._root = model
        self._names = {id(m): name for name, m in model.named_modules()}
        self._activation_modules = {id(m) for _, m, _ in modules} | {id(m) for m in activation_modules}
        self._stack: list[nn.Module] = []
        self._entered: dict[int, int] = {}  # module -> forwards begun in this pass
        self._made_in: dict[int, set[Layer]] = {}  # module -> the layers made in its forward
        self._mode = _CallCapture(self) if watch_call is not None else None  # only then are calls handed to us
        self._capture = HookHandles()  # the global module hooks, while a step is armed
        self._looked = False  # an armed forward ran: its functional calls were looked for
        self._modules = [(module, kind.on_input) for _, module, kind in modules]
        self._persistent = persistent
        self.handles = HookHandles()  # the module hooks
        for name, module, kind in modules:
            self._layer(("m", id(module), 1), name or "model", kind, type(module).__name__)
        if persistent:
            self._hook_modules()

    def _hook_modules(self) -> None:
        for module, on_input in self._modules:
            if on_input:
                self.handles.add(module.register_forward_pre_hook(self._pre_hook))
            self.handles.add(module.register_forward_hook(self._hook))

    # --- when: the callback drives these ---------------------------------------------------------------

    def prepare(self, device: torch.device) -> None:
        """Zeroed records on ``device``, before the first armed forward of a step; allocated only once."""
        self._device = device
        for layer in self.layers:
            if layer.act is None or layer.act.device != device:
                layer.allocate(device, self.histograms, self.track_grad)
        self.reset()

    def start(self) -> None:
        """An armed forward begins: record every call from here on."""
        self.phase, self._calls, self._entered = FORWARD, {}, {}
        self._pending.clear()
        self._divisor = self.grad_divisor()  # the loss scale changes at an optimizer step only: one object a pass
        if not len(self.handles):
            self._hook_modules()
        if self._mode is not None and not len(self._capture) and self._looks_for_calls():
            self._stack.clear()
            self._capture.watch_calls(self._mode, self._enter, self._leave)

    def _looks_for_calls(self) -> bool:
        """Whether an armed forward passes through the function mode: the first does; after it, only where a
        functional call was watched. A model whose activations are modules then pays for no Python handler on each
        torch call of its forward."""
        return not self._looked or any(key[0] == "f" for key in self._by_key)

    def backward(self) -> None:
        """The backward of an armed forward begins: a recomputed forward only hooks gradients."""
        if self.phase == FORWARD:
            self.phase, self._calls, self._entered = BACKWARD, {}, {}
            self._take_later()

    def backward_done(self) -> None:
        """A backward ended: another forward of the same step (manual accumulation) is a new pass, whose
        calls count from one again."""
        if self.phase == BACKWARD:
            self.phase, self._calls, self._entered = FORWARD, {}, {}
            self._take_later()

    def stop(self) -> None:
        if self.phase == IDLE:
            return
        self._take_later()
        self._looked, self.phase = True, IDLE
        self._capture.remove()
        if not self._persistent:
            self.handles.remove()
        self._pending.clear()

    def _take_later(self) -> None:
        with torch.no_grad(), own_work():
            self._later.take()

    def reset(self) -> None:
        """Every record zeroed, in one call (one launch on a GPU for them all, not one per record)."""
        self._later.drop()
        records = [r for layer in self.layers for r in (layer.act, layer.grad, layer.alive) if r is not None]
        if records:
            torch._foreach_zero_(records)

    def remove(self) -> None:
        self.stop()
        self.handles.remove()
        for layer in self.layers:
            layer.act = layer.grad = layer.alive = None

    def adopt(self, spec: tuple) -> None:
        """Hold the place of a layer that another rank ran and this one did not (yet)."""
        if spec[0] not in self._by_name:
            self._place(Layer.from_spec(spec, self._grad_bins))

    # --- the hooks ----------------------------------------------------------------------------------

    def _layer(self, key: tuple, name: str, kind: activations.Kind, type_name: str) -> Layer:
        layer = self._by_name.get(name)
        if layer is None or layer.placeholder:
            layer = self._place(Layer(name, kind, type_name, self.threshold, self._grad_bins))
        self._by_key[key] = layer
        return layer

    def _place(self, layer: Layer) -> Layer:
        """A new layer, with records where the others have theirs; in the place of a placeholder of its
        name (another rank's layer that this rank runs now: same place, same record sizes)."""
        if self._device is not None:
            layer.allocate(self._device, self.histograms, self.track_grad)
        held = self._by_name.get(layer.name)
        if held is None:
            self.layers.append(layer)
        else:
            self.layers[self.layers.index(held)] = layer
        self._by_name[layer.name] = layer
        return layer

    def _call_index(self, key: tuple) -> int:
        k = min(self._calls.get(key, 0) + 1, self.max_calls)
        self._calls[key] = k
        return k

    def _pre_hook(self, module: nn.Module, inputs: tuple[object, ...]) -> None:
        if self.phase == FORWARD and not _PAUSED[0] and inputs and isinstance(inputs[0], Tensor):
            with own_work():
                self._pending[id(module)] = _input_mask(self._by_key[("m", id(module), 1)], inputs[0])

    def _hook(self, module: nn.Module, inputs: tuple[object, ...], output: object) -> None:
        if self.phase == IDLE or _PAUSED[0] or not isinstance(output, Tensor):
            return
        k = self._call_index(("m", id(module)))
        key = ("m", id(module), k)
        layer = self._by_key.get(key)
        if layer is None:
            if self.phase != FORWARD:
                return
            first = self._by_key[("m", id(module), 1)]
            layer = self._layer(key, f"{first.name}-{k}", first.kind, first.type_name)
        with own_work():
            self._observe(layer, output, self._pending.pop(id(module), None))

    def _observe(self, layer: Layer, output: Tensor, input_mask: Tensor | None) -> None:
        if self.phase == FORWARD and self._stack:
            # The module it runs in (its owner or parent): when that runs again in this forward, each of its
            # calls (the first too) is a step in a loop.
            parent = id(self._stack[-1])
            made = self._made_in.setdefault(parent, set())
            made.add(layer)
            if self._entered.get(parent, 0) > 1:
                for other in made:
                    other.in_loop = True
        if self.phase == FORWARD and layer.act is not None:
            with torch.no_grad():
                self._record_activation(layer, output.detach(), input_mask)
        if layer.grad is not None and output.requires_grad:
            later = None if self._persistent else self._later  # a compiled graph's hooks hold nothing
            output.register_hook(
                _grad_hook(layer.grad, layer.grad_bins if self.histograms else None, self._divisor, later)
            )

    def _record_activation(self, layer: Layer, t: Tensor, input_mask: Tensor | None) -> None:
        if layer.order is None:
            layer.order, self._seen = self._seen, self._seen + 1
        bins = layer.act_bins if self.histograms else None
        add = functools.partial(self._add_activation, layer, input_mask)
        dtype = _recorded_dtype(t)  # a held copy is made in it: one copy, not two
        if self._persistent or not self._later.hold(t, bins, None, add, dtype):
            t = t.to(dtype)
            add(t, stats.tensor_record(t, bins))

    def _add_activation(self, layer: Layer, input_mask: Tensor | None, t: Tensor, record: Tensor) -> None:
        """Add the ``record`` of the activation ``t`` to its layer's, with the saturation counts."""
        extra: list[Tensor] = []  # the saturated count
        if layer.rule is not None:
            mask = input_mask if layer.rule.on_input else layer.rule.of(t)
            finite = stats.finite_mask(t, record)
            units = unit_dim_of(t, self.unit_dim)
            saturated, alive = stats.saturation_extra(mask, finite, units, record[stats.COUNT])  # type: ignore[arg-type]
            extra.append(saturated)
            if layer.alive is None:
                layer.alive = alive
            else:
                layer.alive.add_(alive)
        stats.add_record(layer.act, record, extra)  # type: ignore[arg-type]

    def _enter(self, module: nn.Module, inputs: object) -> None:
        if id(module) not in self._names or _PAUSED[0]:
            return
        self._stack.append(module)
        self._entered[id(module)] = self._entered.get(id(module), 0) + 1
        if self.phase == BACKWARD and self._mode not in _get_current_function_mode_stack():
            # A forward recomputed by reentrant checkpointing runs inside an autograd node, where the
            # engine does not carry the function mode: enter it again. The engine restores its
            # thread-local state when the node ends, which leaves the mode there.
            self._mode.__enter__()  # type: ignore[union-attr]

    def _leave(self, module: nn.Module, inputs: object, output: object) -> None:
        if self._stack and self._stack[-1] is module:
            self._stack.pop()

    def _function_call(self, func: Callable, short: str, kind_of: Callable, args: tuple, kwargs: dict) -> object:
        """A functional activation call, seen by :class:`_CallCapture`."""
        # Outside any module's forward (training_step, or a recomputation that starts in a method): the
        # model's own, as in the first forward, where the model's call is on the stack.
        owner = self._stack[-1] if self._stack else self._root
        x = activations.call_input(args, kwargs)
        if self.phase == IDLE or id(owner) in self._activation_modules or not isinstance(x, Tensor):
            return func(*args, **kwargs)
        k = self._call_index(("f", id(owner), short))
        key = ("f", id(owner), short, k)
        layer = self._by_key.get(key)
        if layer is None and key not in self._skipped and self.phase == FORWARD:
            owner_name = self._names[id(owner)]
            base = f"{owner_name}/{short}" if owner_name else short
            name = base if k == 1 else f"{base}-{k}"
            if name in self._by_name and self._by_name[name].type_name != "function":
                name += "-fn"  # a module of that name exists: keep the two apart
            if self.watch_call(owner_name, owner, name):  # type: ignore[misc]  # set whenever calls are captured
                layer = self._layer(key, name, kind_of(args, kwargs), "function")
            else:
                self._skipped.add(key)
        if layer is None:
            return func(*args, **kwargs)
        input_mask = _input_mask(layer, x) if self.phase == FORWARD and layer.kind.on_input else None
        output = func(*args, **kwargs)
        if isinstance(output, Tensor):
            self._observe(layer, output, input_mask)
        return output


class OutputProbe:
    """The model's output in the forward of one step, read as a classifier's logits.

    The output is the last tensor made by a module with parameters of its own (``lm_head``, ``fc``, a last
    BatchNorm) in a forward: classes along the last dimension (dim 1 for an (N, C, H, W) output). Its record
    is additive over micro-batches and ranks: ``[rows, sum over rows of (logsumexp(z) - mean(z)), rows *
    classes, losses, sum of the losses, sum over rows of logsumexp(z)]``; ``logsumexp(z) - mean(z)`` is the
    cross-entropy of that row against a label drawn uniformly at random, ``ln(classes)`` for a uniform output
    (the lecture's "loss at init": 3.30 for 27 characters), the losses are those the backward started from,
    and ``logsumexp(z)`` is the row's log Z. ``peak`` holds the largest logit (reduced by max, not summed).

    A global forward hook, registered from :meth:`start` to :meth:`stop` only (one step); a resource like
    :class:`HookHandles`.
    """

    def __init__(self) -> None:
        self.handles = HookHandles()
        self.record: Tensor | None = None
        self.peak: Tensor | None = None  # the largest logit
        self.name: str | None = None  # the module that made the output
        self._names: dict[int, str] = {}
        self._last: tuple[str, Tensor] | None = None

    def reset(self) -> None:
        self.record, self.peak, self.name, self._last = None, None, None, None

    def start(self, model: nn.Module) -> None:
        """A forward begins: watch it (the record adds up until :meth:`reset`)."""
        if not len(self.handles):
            self._names = {id(m): name for name, m in model.named_modules()}
            self.handles.add(register_module_forward_hook(self._hook))

    def _hook(self, module: nn.Module, inputs: object, output: object) -> None:
        if _PAUSED[0] or not isinstance(output, Tensor) or next(module.parameters(recurse=False), None) is None:
            return
        with own_work():  # a user's function mode sees only the model's calls, not these checks
            if output.is_floating_point() and output.dim() >= 2:
                self._last = (self._names.get(id(module), type(module).__name__), output)

    def backward(self, loss: Tensor | None) -> None:
        """A forward ended and its backward starts from ``loss`` (unscaled; None if unknown): add their record."""
        if self._last is None:
            return
        name, z = self._last
        self._last = None
        with torch.no_grad(), own_work():
            z = z.detach().float()
            z = z.movedim(1, -1) if z.dim() >= 4 else z
            rows = z.reshape(-1, z.shape[-1])
            log_z = torch.logsumexp(rows, dim=-1)
            excess = log_z - rows.mean(dim=-1)
            n, classes = rows.shape
            full = excess.new_full
            losses, total = (0, excess.new_zeros(())) if loss is None else (1, loss.detach().float().reshape(()))
            sums = [full((), n), excess.sum(), full((), n * classes), full((), losses), total, log_z.sum()]
            record, peak = torch.stack(sums).double(), rows.amax().double().reshape(1)
        self.record = record if self.record is None else self.record + record
        self.peak = peak if self.peak is None else torch.maximum(self.peak, peak)
        self.name = name

    def forget_loss(self) -> None:
        """The losses seen are not the step's (micro-batches whose losses were scaled for accumulation)."""
        if self.record is not None:
            self.record[3:5] = 0

    def add_loss(self, loss: Tensor) -> None:
        """A loss told after its backward (when the backward began, it was unknown)."""
        if self.record is not None:
            with torch.no_grad():
                self.record[3:5] += torch.stack([loss.new_ones(()), loss.detach().reshape(())]).to(self.record)

    def stop(self) -> None:
        """Stop watching (the record stays)."""
        self.handles.remove()
        self._last = None


def _input_mask(layer: Layer, x: Tensor) -> Tensor:
    """An input-side rule's saturation mask, taken before an in-place activation overwrites its input."""
    with torch.no_grad():
        return layer.rule.of(x.detach().to(_recorded_dtype(x)))  # type: ignore[union-attr]


def _recorded_dtype(t: Tensor) -> torch.dtype:
    """The dtype an activation's record reads it in: its own on a GPU, where half precision is half the bytes to read
    (its saturation mask compared as in float32 all the same: :meth:`~lightning_netdiag.activations.SaturationRule.of`);
    float32 on a CPU, where a bf16 compare or sum takes about twice a float32 one and the copy much less (a bf16 ReLU
    output of 3.1M values: its mask 2.7 against 1.4 ms, its record 1.2 against 0.7, the copy 0.4)."""
    return t.dtype if stats.launch_bound(t.device) else torch.float32


class _CallCapture(TorchFunctionMode):
    """Hands every functional activation call to :meth:`ActivationHooks._function_call`; passes the rest."""

    def __init__(self, hooks: ActivationHooks) -> None:
        super().__init__()
        self.hooks = hooks

    def __torch_function__(self, func: Callable, types: object, args: tuple = (), kwargs: dict | None = None) -> object:
        kwargs = kwargs or {}
        try:
            found = activations.FUNCTIONS.get(func)
        except TypeError:  # an unhashable callable is no activation of ours
            found = None
        if found is None or _PAUSED[0] or torch.compiler.is_compiling():
            return func(*args, **kwargs)
        return self.hooks._function_call(func, found[0], found[1], args, kwargs)


class ModeExit:
    """Leaving a function mode, as a removable handle: safe to call twice."""

    def __init__(self, mode: TorchFunctionMode) -> None:
        self._mode: TorchFunctionMode | None = mode

    def remove(self) -> None:
        mode, self._mode = self._mode, None
        if mode is not None:
            mode.__exit__(None, None, None)


def _grad_hook(
    total: Tensor, bins: stats.Bins | None, divisor: Tensor | float | None, later: _Later | None
) -> Callable[[Tensor], None]:
    """A hook adding the record of an output's gradient to ``total``, with its fp16 counts (as computed: a
    loss-scaled gradient is scaled here); a small one's put off to be taken with others (``later``).

    Without ``later`` it captures tensors and mutates only ``total``, in place: dynamo traces such a hook into the
    compiled graph, where one that assigned to an object's attribute would break the graph.
    """

    def add(grad: Tensor, record: Tensor) -> None:
        stats.add_record(total, record, stats.half_counts(grad))

    def hook(grad: Tensor) -> None:
        with torch.no_grad(), own_work():
            grad = grad.detach()
            if later is None or not later.hold(grad, bins, divisor, add):
                add(grad, stats.tensor_record(grad, bins, divisor=divisor))  # in float32, chunk by chunk

    return hook


class _Later:
    """The small records of a pass, put off to be taken together at its end (:func:`stats.tensor_records`): alone, a
    record is about 20 launches on a GPU (31 with an activation's saturation counts) and a dozen ops of Python on a CPU;
    a group of any number of them, about 25. Each holds a copy of its tensor made at once (an in-place op after it
    does not reach the record), up to a group's worth of values (:func:`stats.group_limits`: 1M values on a CPU, 8M on
    a GPU, 32 MB in float32), then they are taken at once."""

    def __init__(self) -> None:
        self._held: list[tuple[Tensor, stats.Bins | None, Tensor | float | None, Callable[[Tensor, Tensor], None]]] = []
        self._values = 0

    def hold(
        self,
        t: Tensor,
        bins: stats.Bins | None,
        divisor: Tensor | float | None,
        done: Callable[[Tensor, Tensor], None],
        dtype: torch.dtype | None = None,
    ) -> bool:
        """Hold a copy of ``t`` (in ``dtype``, else its own) whose record (over ``bins``, divided by ``divisor``) is
        handed to ``done(copy, record)`` at :meth:`take`; False where it is not held (too large to be taken with
        others, or in a compiled graph): the caller takes it now."""
        if torch.compiler.is_compiling():
            return False
        alone, group = stats.group_limits(t)
        if t.numel() > alone:
            return False
        if self._values + t.numel() > group:
            self.take()
        copy = t.to(dtype=dtype or t.dtype, memory_format=torch.contiguous_format, copy=True)  # as it is read
        self._held.append((copy, bins, divisor, done))
        self._values += t.numel()
        return True

    def take(self) -> None:
        """Take the held records, those over the same bins and divisor together, and hand each to its ``done``."""
        held, self._held, self._values = self._held, [], 0
        together: dict[tuple, list[int]] = {}
        for i, (_, bins, divisor, _) in enumerate(held):
            together.setdefault((bins, id(divisor) if isinstance(divisor, Tensor) else divisor), []).append(i)
        for members in together.values():
            _, bins, divisor, _ = held[members[0]]
            records = stats.tensor_records([held[i][0] for i in members], bins, divisor)
            for i, record in zip(members, records, strict=True):
                held[i][3](held[i][0], record)

    def drop(self) -> None:
        """Forget the held records (a new step's records start from zero)."""
        self._held, self._values = [], 0
