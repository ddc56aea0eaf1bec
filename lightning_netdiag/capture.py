"""What is watched and how: module and parameter selection, hooks as resources with a lifetime.

No Lightning here either: the callbacks decide *when* (by setting ``armed``), this module only measures.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_netdiag import stats

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch built without distributed support: no tensor is ever a DTensor
    _DTensor = ()  # type: ignore[assignment,misc]

Selection = Sequence[type | str]


def check_selection(name: str, value: object, *, allow_types: bool = True) -> tuple[type | str, ...]:
    """Validate a selection argument: a sequence of module types and name globs.

    Raises:
        ValueError: if ``value`` is not a sequence, or holds something that is neither a string nor
            (where allowed) an ``nn.Module`` subclass.
    """
    if isinstance(value, (str, type)) or not isinstance(value, Iterable):
        value = [value]
    items = tuple(value)  # type: ignore[arg-type]
    for item in items:
        is_type = isinstance(item, type) and issubclass(item, nn.Module)
        if not (isinstance(item, str) or (allow_types and is_type)):
            what = "module types or name globs" if allow_types else "name globs"
            raise ValueError(f"Expected `{name}` to hold {what}, got {item!r} of type {type(item).__name__}")
    return items


def _matches(name: str, module: nn.Module, selection: Sequence[type | str]) -> bool:
    return any(
        fnmatch.fnmatchcase(name, item) if isinstance(item, str) else isinstance(module, item) for item in selection
    )


def select_modules(model: nn.Module, include: Selection, exclude: Selection = ()) -> list[tuple[str, nn.Module]]:
    """Submodules matching any item of ``include`` and none of ``exclude``, in registration order."""
    return [
        (name, m) for name, m in model.named_modules() if _matches(name, m, include) and not _matches(name, m, exclude)
    ]


def select_parameters(
    model: nn.Module, include: Selection | None, exclude: Selection = (), ndims: Sequence[int] | None = (2,)
) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters whose name glob or owning module type is in ``include`` (None: all), none of
    ``exclude``, and whose number of dimensions is in ``ndims`` (None: any)."""
    chosen = []
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            name = f"{module_name}.{pname}" if module_name else pname
            if not p.requires_grad or (ndims is not None and p.dim() not in ndims):
                continue
            if (include is None or _matches(name, module, include)) and not _matches(name, module, exclude):
                chosen.append((name, p))
    return chosen


def local_shard(name: str, t: Tensor, world_size: int) -> tuple[Tensor, int]:
    """The part of ``t`` this rank holds, and how many of the ``world_size`` ranks hold that same part.

    A plain tensor is whole on every rank. A DTensor (FSDP2, tensor parallelism) holds a shard, copied on
    each replicated mesh dimension and on every rank outside its mesh: a sum over all ranks of each
    rank's record divided by its copies counts every element exactly once, and nothing is gathered.

    Raises:
        ValueError: if ``t`` is a DTensor with a placement other than sharded or replicated (a pending sum).
    """
    if not isinstance(t, _DTensor):
        return t, world_size
    mesh = t.device_mesh
    copies = max(world_size // mesh.size(), 1)
    for dim, placement in enumerate(t.placements):
        if placement.is_replicate():
            copies *= mesh.size(dim)
        elif not placement.is_shard():
            raise ValueError(f"Expected `{name}` to be sharded or replicated, got placements {t.placements}")
    return t.to_local(), copies


def is_sharded(t: Tensor) -> bool:
    return isinstance(t, _DTensor)


class HookHandles:
    """Hook handles with one lifetime: ``remove()`` detaches them all and is safe to call again."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def add(self, handle: RemovableHandle) -> None:
        self._handles.append(handle)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __len__(self) -> int:
        return len(self._handles)

    def __enter__(self) -> HookHandles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class Layer:
    """One watched activation module: its rule, its bins, and the records summed over the armed step.

    The records are buffers allocated once and then zeroed and added to in place, so that a compiled
    graph keeps reading and writing the same tensors: no recompilation, and a gradient hook that only
    mutates a tensor traces into the graph without a break.
    """

    def __init__(self, name: str, module: nn.Module, rule: stats.SaturationRule | None, grad_bins: stats.Bins) -> None:
        self.name, self.module, self.rule = name, module, rule
        self.act_bins = rule.bins if rule is not None else stats.log2_bins()
        self.grad_bins = grad_bins
        self.act: Tensor | None = None  # [moments, saturated, *histogram]
        self.grad: Tensor | None = None  # [moments, *histogram]
        self.alive: Tensor | None = None  # per unit: examples in which it is not saturated; sized by the first run
        self.pending_mask: Tensor | None = None  # input-side saturation, from the pre-hook to the hook

    def reset(self) -> None:
        for record in (self.act, self.grad, self.alive):
            if record is not None:
                record.zero_()
        self.pending_mask = None


class ActivationHooks:
    """Forward hooks on the watched modules and, for gradients, a tensor hook on each output.

    The hooks stay registered for the whole fit and return at once unless ``armed`` is set; armed, they
    add on-device records to their :class:`Layer` (never a host sync, never a kept activation).

    Args:
        layers: the watched modules.
        histograms: whether records carry histogram counts.
        track_grad: whether to hook the output's gradient (D2).
        unit_dim: the dimension of an activation that indexes units, for dead units.
        grad_divisor: called at each armed forward; what the output's gradient will be divided by (the AMP
            loss scale times the data-parallel world size), or None.
    """

    def __init__(
        self,
        layers: Sequence[Layer],
        histograms: bool,
        track_grad: bool,
        unit_dim: int,
        grad_divisor: Callable[[], Tensor | float | None],
    ) -> None:
        self.layers = list(layers)
        self.histograms, self.track_grad, self.unit_dim = histograms, track_grad, unit_dim
        self.grad_divisor = grad_divisor
        self.armed = False
        self.handles = HookHandles()
        for layer in self.layers:
            if layer.rule is not None and layer.rule.on_input:
                self.handles.add(layer.module.register_forward_pre_hook(self._pre_hook(layer)))
            self.handles.add(layer.module.register_forward_hook(self._hook(layer)))

    def prepare(self, device: torch.device) -> None:
        """Zeroed records on ``device``, before the first armed forward of a step; allocated only once."""
        for layer in self.layers:
            if layer.act is not None and layer.act.device == device:
                layer.reset()
                continue
            layer.act_bins, layer.grad_bins = layer.act_bins.to(device), layer.grad_bins.to(device)
            bins = layer.act_bins if self.histograms else None
            layer.act = torch.zeros(
                stats.record_size(bins, int(layer.rule is not None)), dtype=torch.float64, device=device
            )
            bins = layer.grad_bins if self.histograms else None
            layer.grad = (
                torch.zeros(stats.record_size(bins), dtype=torch.float64, device=device) if self.track_grad else None
            )
            layer.alive = layer.pending_mask = None

    def _pre_hook(self, layer: Layer) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[object, ...]) -> None:
            if self.armed and inputs and isinstance(inputs[0], Tensor):
                with torch.no_grad():  # before an in-place activation overwrites its input
                    layer.pending_mask = layer.rule.mask(inputs[0].detach().float())  # type: ignore[union-attr]

        return hook

    def _hook(self, layer: Layer) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[object, ...], output: object) -> None:
            if not self.armed or not isinstance(output, Tensor) or layer.act is None:
                return
            with torch.no_grad():
                # In fp16/bf16, `t > 0.97` would compare against 0.97 rounded to half precision.
                self._record_activation(layer, output.detach().float())
            if layer.grad is not None and output.requires_grad:
                output.register_hook(
                    _grad_hook(layer.grad, layer.grad_bins if self.histograms else None, self.grad_divisor())
                )

        return hook

    def _record_activation(self, layer: Layer, t: Tensor) -> None:
        extra: list[Tensor] = []
        if layer.rule is not None:
            mask = layer.pending_mask if layer.rule.on_input else layer.rule.mask(t)
            layer.pending_mask = None
            saturated, alive = stats.saturation_extra(mask, torch.isfinite(t), self.unit_dim)  # type: ignore[arg-type]
            extra.append(saturated)
            if layer.alive is None:
                layer.alive = alive
            else:
                layer.alive.add_(alive)
        layer.act.add_(stats.tensor_record(t, layer.act_bins if self.histograms else None, extra))  # type: ignore[union-attr]

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    def remove(self) -> None:
        self.armed = False
        self.handles.remove()
        for layer in self.layers:
            layer.act = layer.grad = layer.alive = layer.pending_mask = None


def _grad_hook(total: Tensor, bins: stats.Bins | None, divisor: Tensor | float | None) -> Callable[[Tensor], None]:
    """A hook adding the record of an output's gradient to ``total``.

    It captures tensors and mutates only ``total``, in place: dynamo traces such a hook into the compiled
    graph, where one that assigned to an object's attribute would break the graph.
    """

    def hook(grad: Tensor) -> None:
        with torch.no_grad():
            g = grad.detach().float()
            total.add_(stats.tensor_record(g if divisor is None else g / divisor, bins))

    return hook
