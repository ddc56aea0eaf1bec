"""What counts as an activation, and where each kind is flat (saturated). Pure torch, no Lightning.

Three ways in, one table of kinds:

- ``torch.nn`` activation modules, by type;
- any other module (transformers' ``*Activation`` classes, timm's layers, a user's ``Swish``) that is a
  parameter-free leaf: it is run once on fixed points and its function is matched against the known kinds.
  Class names would need a list per library and would still miss a user's class, and a probe tells an
  identity (a "linear" activation) or a scaled copy from a real nonlinearity, which a name cannot;
  an elementwise function that matches no kind is still watched, without a saturation rule;
  :func:`register_activation` names the kind of a class outright;
- functional calls (``F.relu``, ``torch.tanh``, ``x.relu_()``, ...): :data:`FUNCTIONS`.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_netdiag.stats import DEFAULT_THRESHOLD, Bins, linear_bins, log2_bins

__all__ = [
    "FAMILIES", "FLAT_SLOPE", "FUNCTIONS", "KINDS", "TORCH_ACTIVATION_TYPES", "UNKNOWN", "Kind", "SaturationRule",
    "call_input", "clamp", "elu", "in_place", "leaky", "module_kind", "one_sided", "probe", "register_activation",
    "softplus",
]  # fmt: skip

#: Families, each judged by its own health rules (``report``): zero-centred bounded (``tanh``), gates in
#: [0, 1] (``sigmoid``), a flat side by design (``relu``), a flat tail judged on the input (``gelu``).
FAMILIES = ("tanh", "sigmoid", "relu", "gelu")


@dataclass(frozen=True)
class SaturationRule:
    """Where one kind is flat, for a given threshold. ``on_input`` rules read the input, the others the output."""

    kind: str
    region: str
    mask: Callable[[Tensor], Tensor]
    bins: Bins
    on_input: bool = False
    #: The half-precision dtypes in which ``mask`` gives what it gives a float32 copy (its limits representable there:
    #: ReLU's 0, GELU's -3; not tanh's 0.97 in fp16), found by :meth:`Kind.rule`.
    exact_in: frozenset[torch.dtype] = frozenset()

    def of(self, t: Tensor) -> Tensor:
        """The mask of ``t`` as in float32 or wider: in fp16/bf16, ``t > 0.97`` would compare against 0.97 rounded to
        half precision, so ``t`` is compared as a float32 copy, unless its dtype is one the mask is exact in."""
        copy = t.dtype in _HALF and t.dtype not in self.exact_in
        return self.mask(t.float() if copy else t)


_HALF = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=256)
def _exact_in(kind: Kind, threshold: float) -> frozenset[torch.dtype]:
    """The half-precision dtypes on each of whose 65,536 values ``kind``'s saturation test at ``threshold`` is the same
    computed in the dtype as in float32: once per kind and threshold, however many layers share them."""
    test = kind.saturated
    assert test is not None
    exact = []
    for dtype in _HALF:
        every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
        try:
            same = torch.equal(test(every, threshold), test(every.float(), threshold))
        except (RuntimeError, TypeError):  # a registered kind's test that a half tensor on the CPU cannot run
            same = False
        if same:
            exact.append(dtype)
    return frozenset(exact)


@dataclass(frozen=True)
class Kind:
    """An activation function. ``saturated(values, threshold)`` marks the flat region (None: no rule).

    Args:
        name: e.g. ``"tanh"``, ``"gelu_tanh"``, ``"leaky_relu(0.01)"``.
        family: one of :data:`FAMILIES`, or None for an unknown function.
        region: the flat region in words; ``{thr}`` is replaced by the threshold.
        saturated: the mask of flat values, from the values and the threshold.
        bounds: the output range of a bounded kind (histograms over evenly spaced bins), else None.
        on_input: whether ``saturated`` reads the input (the output does not tell the flat tail apart).
    """

    name: str
    family: str | None
    region: str = ""
    saturated: Callable[[Tensor, float], Tensor] | None = None
    bounds: tuple[float, float] | None = None
    on_input: bool = False

    def __post_init__(self) -> None:
        if self.family is not None and self.family not in FAMILIES:
            raise ValueError(f"Expected `family` to be one of {FAMILIES} or None, got {self.family!r}")
        if self.bounds is not None and not self.bounds[0] < self.bounds[1]:
            raise ValueError(f"Expected `bounds` to be (low, high) with low < high, got {self.bounds!r}")

    def bins(self) -> Bins:
        return log2_bins() if self.bounds is None else linear_bins(*self.bounds)

    def rule(self, threshold: float = DEFAULT_THRESHOLD) -> SaturationRule | None:
        if self.saturated is None:
            return None
        test = self.saturated
        return SaturationRule(
            self.name,
            self.region.format(thr=f"{threshold:g}"),
            lambda t: test(t, threshold),
            self.bins(),
            self.on_input,
            _exact_in(self, threshold),
        )


def _tanh_like(name: str) -> Kind:
    return Kind(name, "tanh", "|t| > {thr}", lambda t, thr: t.abs() > thr, (-1.0, 1.0))


def clamp(low: float, high: float) -> Kind:
    """Hardtanh and ReLU6: flat at and beyond the clamp bounds."""
    family = "tanh" if low < 0 < high else "relu"
    return Kind(
        f"clamp({low:g}, {high:g})", family, f"t <= {low:g} or t >= {high:g}",
        lambda t, thr: (t <= low) | (t >= high), (low, high),
    )  # fmt: skip


def one_sided(name: str) -> Kind:
    """ReLU and its variants whose negative side is nearly flat: flat (or on the low-slope side) where t <= 0."""
    return Kind(name, "relu", "t <= 0", lambda t, thr: t <= 0)


#: The largest slope of a leaky ReLU's negative side that counts as flat: the derivative below which GELU's,
#: QuickGELU's, SiLU's and Mish's tails count as flat. Above it a unit on that side passes a good share of its gradient
#: (GANs' LeakyReLU(0.2): a fifth; PReLU's 0.25 at init; RReLU's 1/8 to 1/3): no flat region, no dead units.
FLAT_SLOPE = 0.03


def leaky(slope: float) -> Kind:
    """A leaky ReLU of ``slope``: its negative side as ReLU's flat one (:func:`one_sided`) up to :data:`FLAT_SLOPE`,
    else no flat region (mean, std and histograms, no saturation)."""
    name = f"leaky_relu({slope:.3g})"
    return one_sided(name) if slope <= FLAT_SLOPE else Kind(name, "relu")


_SELU_LIMIT = 1.0507009873554805 * 1.6732632423543772  # SELU's negative asymptote, scale * alpha


def elu(name: str, alpha: float) -> Kind:
    """ELU, CELU (limit alpha) and SELU (limit scale * alpha): flat near the negative asymptote."""
    return Kind(name, "relu", f"t < -{{thr}} * {alpha:.4g}", lambda t, thr: t < -thr * alpha)


def softplus(beta: float) -> Kind:
    # softplus' derivative is 1 - exp(-beta * t): below 1 - thr where t < -ln(thr) / beta.
    return Kind(
        "softplus" if beta == 1 else f"softplus({beta:g})", "relu", f"t < -ln({{thr}}) / {beta:g}",
        lambda t, thr: t < -math.log(thr) / beta,
    )  # fmt: skip


def _input_below(name: str, limit: float) -> Kind:
    """GELU-like kinds: the output does not tell the flat tail from the origin, so the input is read."""
    return Kind(name, "gelu", f"input x < {limit:g}", lambda x, thr: x < limit, on_input=True)


#: Every kind by name. GELU's derivative is below 0.012 in magnitude for x < -3, QuickGELU's below 0.03,
#: Hardswish is exactly flat there; SiLU's and Mish's are below 0.03 for x < -5.
KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        _tanh_like("tanh"),
        _tanh_like("softsign"),
        Kind("sigmoid", "sigmoid", "t < 1 - {thr} or t > {thr}", lambda t, thr: (t < 1 - thr) | (t > thr), (0.0, 1.0)),
        Kind("hardsigmoid", "sigmoid", "t <= 0 or t >= 1", lambda t, thr: (t <= 0) | (t >= 1), (0.0, 1.0)),
        one_sided("relu"),
        one_sided("relu2"),
        elu("elu", 1.0),
        elu("selu", _SELU_LIMIT),
        softplus(1.0),
        Kind("logsigmoid", "relu", "t > ln({thr})", lambda t, thr: t > math.log(thr)),
        Kind("shrink", "relu", "t == 0", lambda t, thr: t == 0),
        _input_below("gelu", -3),
        _input_below("gelu_tanh", -3),
        _input_below("quick_gelu", -3),
        _input_below("hardswish", -3),
        _input_below("silu", -5),
        _input_below("mish", -5),
    )
}

#: An elementwise nonlinearity that matches no known kind: mean, std and histograms, no saturation.
UNKNOWN = Kind("unknown", None)


def _torch_kind(module: nn.Module) -> Kind | None:
    """The kind of a ``torch.nn`` activation module, by type (subclasses first: ReLU6 is a Hardtanh)."""
    if isinstance(module, nn.Hardtanh):
        return clamp(float(module.min_val), float(module.max_val))
    if isinstance(module, (nn.ELU, nn.CELU)):
        return elu(type(module).__name__.lower(), float(module.alpha))
    if isinstance(module, nn.Softplus):
        return softplus(float(module.beta))
    if isinstance(module, nn.GELU):
        return KINDS["gelu_tanh" if module.approximate == "tanh" else "gelu"]
    if isinstance(module, nn.LeakyReLU):
        return leaky(float(module.negative_slope))
    if isinstance(module, nn.RReLU):  # its smallest slope in training
        return leaky(float(module.lower))
    if isinstance(module, nn.PReLU):  # its slopes are learned, from 0.25: no flat region
        return Kind("prelu", "relu")
    for types, name in _TORCH_TYPES:
        if isinstance(module, types):
            return KINDS[name]
    return None


_TORCH_TYPES: tuple[tuple[tuple[type[nn.Module], ...], str], ...] = (
    ((nn.Tanh,), "tanh"), ((nn.Softsign,), "softsign"), ((nn.Sigmoid,), "sigmoid"),
    ((nn.Hardsigmoid,), "hardsigmoid"), ((nn.ReLU,), "relu"),
    ((nn.SELU,), "selu"), ((nn.LogSigmoid,), "logsigmoid"), ((nn.Hardshrink, nn.Softshrink), "shrink"),
    ((nn.Hardswish,), "hardswish"), ((nn.SiLU,), "silu"), ((nn.Mish,), "mish"),
)  # fmt: skip

#: The ``torch.nn`` activation types recognised by type (every other module is probed).
TORCH_ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.Hardtanh, nn.ELU, nn.CELU, nn.Softplus, nn.GELU, nn.LeakyReLU, nn.RReLU, nn.PReLU,
    *(t for types, _ in _TORCH_TYPES for t in types),
)  # fmt: skip

_REGISTERED: dict[type, Kind] = {}


def register_activation(cls: type[nn.Module], kind: str | Kind) -> None:
    """Name the activation kind of a module class (and its subclasses), instead of probing it.

    Args:
        cls: the module class.
        kind: a name of :data:`KINDS` (``"tanh"``, ``"gelu"``, ...) or a :class:`Kind` of your own.

    Raises:
        ValueError: if ``cls`` is not an ``nn.Module`` subclass or ``kind`` is not a known name or a Kind.

    Example::

        register_activation(MyScaledTanh, Kind("scaled_tanh", "tanh", "|t| > 1.7", lambda t, thr: t.abs() > 1.7 * thr,
                                               bounds=(-1.75, 1.75)))
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"Expected `cls` to be an nn.Module subclass, got {cls!r}")
    if isinstance(kind, str):
        if kind not in KINDS:
            raise ValueError(f"Expected `kind` to be one of {sorted(KINDS)} or a Kind, got {kind!r}")
        kind = KINDS[kind]
    if not isinstance(kind, Kind):
        raise ValueError(f"Expected `kind` to be one of {sorted(KINDS)} or a Kind, got {kind!r}")
    _REGISTERED[cls] = kind


def module_kind(module: nn.Module) -> Kind | None:
    """The activation kind of ``module``, or None if it is not an activation.

    Registered classes first, then ``torch.nn``'s types; any other parameter-free leaf module is probed.
    """
    for cls in type(module).__mro__:
        if cls in _REGISTERED:
            return _REGISTERED[cls]
    if isinstance(module, TORCH_ACTIVATION_TYPES):
        return _torch_kind(module)
    return probe(module)


# --- probing: which function is this module? -------------------------------------------------------


#: Where a module is evaluated: both tails, the origin's neighbourhood densely, no point exactly at a kink.
_POINTS = torch.cat([torch.linspace(-8.0, 8.0, 129), torch.linspace(-1.5, 1.5, 61) + 1 / 512])

_REFERENCES: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "softsign": F.softsign,
    "sigmoid": torch.sigmoid,
    "hardsigmoid": F.hardsigmoid,
    "relu": torch.relu,
    "relu2": lambda x: torch.relu(x).square(),
    "elu": F.elu,
    "selu": torch.selu,
    "softplus": F.softplus,
    "logsigmoid": F.logsigmoid,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "hardswish": F.hardswish,
    "silu": F.silu,
    "mish": F.mish,
}


def probe(module: nn.Module) -> Kind | None:
    """Run a parameter-free leaf module on fixed points and match its function against the known kinds.

    Returns None for anything that is not an elementwise nonlinearity: a module with children or with
    parameters other than scalars, one from ``torch`` itself (its activations are known by type), one that
    fails on a plain tensor, gives another shape, is not elementwise (a norm), or is affine (an identity, a
    dropout in eval).
    The module runs in eval mode and without its hooks; its mode is restored.
    """
    if (
        next(module.children(), None) is not None
        or any(p.numel() != 1 for p in module.parameters(recurse=False))  # learnable scalars (xIELU) are fine
        or type(module).__module__.split(".")[0] == "torch"
    ):
        return None
    buffer = next(itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False)), None)
    x = _POINTS.to(buffer.device) if buffer is not None else _POINTS
    training = module.training
    module.train(False)
    try:
        with torch.no_grad():
            flat, column, row = (module.forward(v.clone()) for v in (x, x[:, None], x[None, :]))
    except Exception:  # not callable on one tensor: not an elementwise activation
        return None
    finally:
        module.train(training)
    if not all(isinstance(y, Tensor) and y.is_floating_point() for y in (flat, column, row)):
        return None
    if flat.shape != x.shape or column.shape != (len(x), 1) or row.shape != (1, len(x)):
        return None
    flat, x = flat.double().cpu(), x.double().cpu()
    if not (_close(column.reshape(-1).double().cpu(), flat) and _close(row.reshape(-1).double().cpu(), flat)):
        return None  # depends on the other values: not elementwise
    if not torch.isfinite(flat).all():
        return None
    slope = (flat[-1] - flat[0]) / (x[-1] - x[0])
    if _close(flat, flat[0] + slope * (x - x[0])):
        return None  # affine: no nonlinearity
    return _match(x, flat)


def _close(a: Tensor, b: Tensor) -> bool:
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5))


def _match(x: Tensor, y: Tensor) -> Kind:
    for name, reference in _REFERENCES.items():
        if _close(y, reference(x.float()).double()):
            return KINDS[name]
    low, high = float(y.min()), float(y.max())
    if _close(y, x.clamp(low, high)):
        return clamp(low, high)
    slope = float(y[0] / x[0])  # the value at -8 over -8
    if 0 < slope < 1 and _close(y, torch.where(x > 0, x, slope * x)):
        return leaky(slope)
    return UNKNOWN


# --- functional calls ------------------------------------------------------------------------------


def _arg(args: tuple, kwargs: Mapping, index: int, name: str, default: object) -> object:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _fixed(name: str) -> Callable[[tuple, Mapping], Kind]:
    return lambda args, kwargs: KINDS[name]


def _gelu(args: tuple, kwargs: Mapping) -> Kind:
    return KINDS["gelu_tanh" if _arg(args, kwargs, 1, "approximate", "none") == "tanh" else "gelu"]


def _hardtanh(args: tuple, kwargs: Mapping) -> Kind:
    return clamp(float(_arg(args, kwargs, 1, "min_val", -1.0)), float(_arg(args, kwargs, 2, "max_val", 1.0)))  # type: ignore[arg-type]


def _leaky(args: tuple, kwargs: Mapping) -> Kind:
    return leaky(float(_arg(args, kwargs, 1, "negative_slope", 0.01)))  # type: ignore[arg-type]


def _elu(name: str) -> Callable[[tuple, Mapping], Kind]:
    return lambda args, kwargs: elu(name, float(_arg(args, kwargs, 1, "alpha", 1.0)))  # type: ignore[arg-type]


def _softplus(args: tuple, kwargs: Mapping) -> Kind:
    return softplus(float(_arg(args, kwargs, 1, "beta", 1.0)))  # type: ignore[arg-type]


def _functions() -> dict[Callable, tuple[str, Callable[[tuple, Mapping], Kind]]]:
    """Every functional activation: the callable as ``__torch_function__`` sees it -> (short name, kind)."""
    table: dict[Callable, tuple[str, Callable[[tuple, Mapping], Kind]]] = {}

    def add(name: str, kind: Callable[[tuple, Mapping], Kind], *funcs: object) -> None:
        for func in funcs:
            if func is not None:
                table[func] = (name, kind)  # type: ignore[index]

    T = torch.Tensor
    add("relu", _fixed("relu"), F.relu, F.relu_, torch.relu, torch.relu_, T.relu, T.relu_)
    add("relu6", lambda a, k: clamp(0.0, 6.0), F.relu6)
    add("hardtanh", _hardtanh, F.hardtanh, F.hardtanh_)
    add("leaky_relu", _leaky, F.leaky_relu, F.leaky_relu_)
    add("elu", _elu("elu"), F.elu, F.elu_)
    add("celu", _elu("celu"), F.celu, getattr(F, "celu_", None))
    add("selu", _fixed("selu"), F.selu, torch.selu, getattr(torch, "selu_", None))
    add("gelu", _gelu, F.gelu)
    add("silu", _fixed("silu"), F.silu)
    add("mish", _fixed("mish"), F.mish)
    add("hardswish", _fixed("hardswish"), F.hardswish)
    add("hardsigmoid", _fixed("hardsigmoid"), F.hardsigmoid)
    add("tanh", _fixed("tanh"), torch.tanh, torch.tanh_, T.tanh, T.tanh_, F.tanh)
    add("sigmoid", _fixed("sigmoid"), torch.sigmoid, torch.sigmoid_, T.sigmoid, T.sigmoid_, F.sigmoid)
    add("softsign", _fixed("softsign"), F.softsign)
    add("softplus", _softplus, F.softplus)
    add("logsigmoid", _fixed("logsigmoid"), F.logsigmoid)
    return table


#: Functional activations: the callable -> (the short name used in layer names, its kind from the call's arguments).
FUNCTIONS = _functions()


def call_input(args: tuple, kwargs: Mapping) -> object:
    """The tensor a functional activation is applied to (its first argument)."""
    return args[0] if args else kwargs.get("input", kwargs.get("self"))


def in_place(func: Callable, args: tuple, kwargs: Mapping) -> bool:
    """Whether a functional call overwrites its input (``relu_``, ``F.silu(x, inplace=True)``, ...)."""
    name = getattr(func, "__name__", "")
    return (
        name.endswith("_")
        or bool(kwargs.get("inplace", False))
        or (len(args) > 1 and isinstance(args[-1], bool) and args[-1])
    )
