"""What is watched: module and parameter selection by name globs and module types. Pure torch."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

from torch import Tensor, nn

__all__ = ["WEIGHT_NDIMS", "Selection", "check_selection", "matches", "select_parameters", "weight_class"]

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


def matches(name: str, module: nn.Module, selection: Sequence[type | str]) -> bool:
    """Whether ``name`` matches a glob of ``selection`` or ``module`` is an instance of one of its types."""
    return any(
        fnmatch.fnmatchcase(name, item) if isinstance(item, str) else isinstance(module, item) for item in selection
    )


#: The ranks of the weights D3 and D4 watch by default: matrices and embeddings (2), conv kernels (3 to 5),
#: position embeddings and class tokens (3); not biases nor norm scales (1), as the lecture leaves them out.
WEIGHT_NDIMS = (2, 3, 4, 5)


def select_parameters(
    model: nn.Module, include: Selection | None, exclude: Selection = (), ndims: Sequence[int] | None = WEIGHT_NDIMS
) -> list[tuple[str, nn.Parameter, nn.Module]]:
    """Parameters whose name glob or owning module type is in ``include`` (None: all), none of ``exclude``, and
    whose number of dimensions is in ``ndims`` (None: any); with the module owning each.

    Frozen parameters are selected too: a backbone frozen when training begins and unfrozen later is watched from
    the step it trains (the meters skip a parameter without a gradient). A parameter shared by several modules (an
    LM head tied to the embedding) is selected once, under its first name.
    """
    chosen, seen = [], set()
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            name = f"{module_name}.{pname}" if module_name else pname
            if id(p) in seen or (ndims is not None and p.dim() not in ndims):
                continue
            seen.add(id(p))
            if (include is None or matches(name, module, include)) and not matches(name, module, exclude):
                chosen.append((name, p, module))
    return chosen


def weight_class(p: Tensor, owner: nn.Module) -> str:
    """Which weights are comparable: grad:data differs by kind (embedding rows not in a batch get no
    gradient; a conv kernel's fan-in is spread over its window)."""
    if isinstance(owner, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding"
    if p.dim() >= 3 and isinstance(owner, nn.modules.conv._ConvNd):
        return "conv kernel"
    return "matrix" if p.dim() == 2 else "other"
