"""What counts as an activation: torch.nn types, probed modules of other libraries and of users, functional
calls; and each kind's saturation rule against autograd's derivative."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_netdiag import activations
from lightning_netdiag.activations import FUNCTIONS, KINDS, Kind, module_kind, register_activation

TORCH_MODULES = [
    nn.Tanh(), nn.Softsign(), nn.Hardtanh(), nn.ReLU6(), nn.Sigmoid(), nn.Hardsigmoid(), nn.ReLU(), nn.LeakyReLU(),
    nn.ELU(), nn.CELU(alpha=2.0), nn.SELU(), nn.Softplus(beta=2.0), nn.LogSigmoid(), nn.Hardshrink(),
    nn.Softshrink(), nn.GELU(), nn.GELU(approximate="tanh"), nn.Hardswish(), nn.SiLU(), nn.Mish(),
]  # fmt: skip


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class SquaredReLU(nn.Module):
    def forward(self, x):
        return torch.relu(x) ** 2


class Sine(nn.Module):  # SIREN: elementwise, no known kind
    def forward(self, x):
        return torch.sin(x)


class Scale(nn.Module):  # affine: no nonlinearity
    def forward(self, x):
        return 2 * x + 1


class RowNorm(nn.Module):  # not elementwise
    def forward(self, x):
        return x / x.norm(dim=-1, keepdim=True)


class TwoInputs(nn.Module):
    def forward(self, x, positions):
        return x + positions


class Leaky(nn.Module):
    def forward(self, x):
        return torch.where(x > 0, x, 0.2 * x)


class Clip(nn.Module):
    def forward(self, x):
        return x.clamp(-2.0, 2.0)


def slope_where_saturated(kind: Kind, f) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.linspace(-40, 40, 80001, requires_grad=True)
    t = f(x)
    (slope,) = torch.autograd.grad(t.sum(), x)
    rule = kind.rule()
    assert rule is not None
    return slope, rule.mask(x.detach() if rule.on_input else t.detach())


@pytest.mark.parametrize("module", TORCH_MODULES, ids=lambda m: repr(m))
def test_saturated_means_nearly_zero_derivative(module):
    """Wherever a rule says saturated, autograd's derivative is at most 0.06 (tanh at |t| = 0.97 has 0.059)."""
    kind = module_kind(module)
    assert kind is not None and kind.family in activations.FAMILIES
    slope, mask = slope_where_saturated(kind, module)
    assert 0 < mask.float().mean() < 1, "the rule marks part of the range"
    assert slope[mask].abs().max() <= 0.06
    assert slope[~mask].abs().max() > 0.1  # and what it leaves out is not flat (Hardsigmoid: 1/6)


@pytest.mark.parametrize("name", ["relu2", "quick_gelu", "gelu_tanh"])
def test_saturated_means_nearly_zero_derivative_for_kinds_without_a_torch_module(name):
    f = {
        "relu2": lambda x: torch.relu(x) ** 2,
        "quick_gelu": QuickGELU(),
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    }
    slope, mask = slope_where_saturated(KINDS[name], f[name])
    assert 0 < mask.float().mean() < 1 and slope[mask].abs().max() <= 0.06


def test_tanh_rule_is_the_lectures():
    t = torch.tensor([-0.99, -0.97, 0.0, 0.969, 0.971])
    assert KINDS["tanh"].rule().mask(t).tolist() == [True, False, False, False, True]
    assert KINDS["tanh"].rule(threshold=0.5).mask(t).tolist() == [True, True, False, True, True]
    assert KINDS["tanh"].rule().region == "|t| > 0.97"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", [n for n, k in KINDS.items() if k.rule() is not None])
def test_half_precision_masks_compare_as_in_float32(name, dtype):
    """A half-precision activation is masked as its float32 copy would be, on every value of its dtype, and without
    the copy where the rule's limits are representable (ReLU's 0, GELU's -3: the common case on a GPU in bf16)."""
    rule = KINDS[name].rule()
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    assert torch.equal(rule.of(every), rule.mask(every.float()))
    rounded = ("tanh", "softsign", "sigmoid", "elu", "softplus", "logsigmoid")  # fp16 rounds their limits the wrong way
    assert (dtype not in rule.exact_in) == (dtype == torch.float16 and name in rounded)


def test_a_test_that_cannot_run_in_half_precision_is_run_on_a_float32_copy():
    def only_float32(t, thr):
        if t.dtype != torch.float32:
            raise RuntimeError(f"not implemented for {t.dtype}")
        return t > thr

    rule = Kind("only_float32", "relu", "t > {thr}", only_float32).rule(0.5)
    assert rule.exact_in == frozenset()
    assert rule.of(torch.tensor([0.25, 0.75], dtype=torch.bfloat16)).tolist() == [False, True]


def test_a_leaky_variant_has_a_flat_side_only_where_its_slope_is_nearly_flat():
    """LeakyReLU's default slope, 0.01, is as flat as GELU's tail: its negative side counts as flat. GANs'
    LeakyReLU(0.2), PReLU (slopes learned from 0.25) and RReLU (1/8 to 1/3) pass a good share of the gradient there:
    no flat region, so no saturation and no dead units are said of them."""
    x = torch.tensor([-1.0, 0.0, 1.0])
    leaky_relu = FUNCTIONS[F.leaky_relu][1]
    for kind in (module_kind(nn.LeakyReLU()), module_kind(nn.LeakyReLU(0.03)), leaky_relu((x,), {})):
        assert kind.rule().mask(x).tolist() == [True, True, False], kind.name
    for kind in (
        *(module_kind(m) for m in (nn.LeakyReLU(0.2), nn.PReLU(), nn.RReLU(), Leaky())),
        leaky_relu((x, 0.2), {}),
    ):
        assert kind.rule() is None and kind.family == "relu", kind.name


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (Swish(), "silu"),
        (QuickGELU(), "quick_gelu"),
        (SquaredReLU(), "relu2"),
        (Sine(), "unknown"),
        (Leaky(), "leaky_relu(0.2)"),
        (Clip(), "clamp(-2, 2)"),
        (Scale(), None),
        (RowNorm(), None),
        (TwoInputs(), None),
        (nn.Identity(), None),
        (nn.Dropout(0.5), None),
        (nn.Softmax(dim=-1), None),
        (nn.Linear(3, 3), None),
        (nn.LayerNorm(4), None),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(v),
)
def test_user_modules_are_probed(module, expected):
    kind = module_kind(module)
    assert (None if kind is None else kind.name) == expected


def test_probing_restores_the_mode_and_ignores_hooks():
    m = Swish().train()
    calls = []
    m.register_forward_hook(lambda *a: calls.append(1))
    assert module_kind(m).name == "silu" and m.training and calls == []


def test_transformers_activation_classes_are_recognised():
    act = pytest.importorskip("transformers.activations")
    expected = {
        "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
        "quick_gelu": "quick_gelu", "silu": "silu", "swish": "silu", "relu": "relu", "relu2": "relu2",
        "mish": "mish", "tanh": "tanh", "sigmoid": "sigmoid", "relu6": "clamp(0, 6)",
        "leaky_relu": "leaky_relu(0.01)",
    }  # fmt: skip
    for name, kind in expected.items():
        module = act.ACT2FN[name]
        assert module_kind(module).name == kind, (name, type(module).__name__)
    assert module_kind(act.ACT2FN["linear"]) is None  # an identity is no activation


def test_timm_activation_layers_are_recognised():
    layers = pytest.importorskip("timm.layers")
    expected = {
        layers.GELU: "gelu", layers.GELUTanh: "gelu_tanh", layers.QuickGELU: "quick_gelu", layers.Swish: "silu",
        layers.HardSwish: "hardswish", layers.HardSigmoid: "hardsigmoid", layers.Mish: "mish",
        layers.Sigmoid: "sigmoid", layers.Tanh: "tanh",
    }  # fmt: skip
    for cls, kind in expected.items():
        assert module_kind(cls()).name == kind, cls.__name__


def test_register_activation_names_a_kind_for_a_class_and_its_subclasses():
    class Odd(nn.Module):  # would probe as unknown
        def forward(self, x):
            return torch.sin(x)

    class Odder(Odd):
        pass

    assert module_kind(Odd()).name == "unknown"
    mine = Kind("sine", "tanh", "|t| > {thr}", lambda t, thr: t.abs() > thr, bounds=(-1.0, 1.0))
    try:
        register_activation(Odd, mine)
        assert module_kind(Odder()) is mine
        register_activation(Odd, "tanh")
        assert module_kind(Odd()) is KINDS["tanh"]
    finally:
        activations._REGISTERED.pop(Odd, None)
    with pytest.raises(ValueError, match="`kind`"):
        register_activation(Odd, "tanhh")
    with pytest.raises(ValueError, match="`cls`"):
        register_activation(Odd(), "tanh")
    with pytest.raises(ValueError, match="`family`"):
        Kind("x", "bounded")


def reference_of(kind: Kind):
    if kind.name.startswith("clamp("):
        low, high = (float(v) for v in kind.name[6:-1].split(","))
        return lambda x: x.clamp(low, high)
    if kind.name.startswith("leaky_relu("):
        slope = float(kind.name[11:-1])
        return lambda x: torch.where(x > 0, x, slope * x)
    if kind.name in ("celu", "elu"):
        return F.elu
    return activations._REFERENCES[kind.name]


def test_every_functional_entry_gives_the_kind_of_what_it_computes():
    x = torch.linspace(-6, 6, 241)
    calls = {
        F.hardtanh: ((x.clone(), -2.0, 2.0), {}), F.hardtanh_: ((x.clone(),), {"min_val": -2.0, "max_val": 2.0}),
        F.leaky_relu: ((x.clone(), 0.1), {}), F.leaky_relu_: ((x.clone(),), {"negative_slope": 0.1}),
        F.gelu: ((x.clone(),), {"approximate": "tanh"}),
    }  # fmt: skip
    for func, (short, kind_of) in FUNCTIONS.items():
        args, kwargs = calls.get(func, ((x.clone(),), {}))
        kind = kind_of(args, kwargs)
        y = func(*args, **kwargs)
        assert torch.allclose(y, reference_of(kind)(x), atol=1e-5), (func, kind.name)
        assert activations.in_place(func, args, kwargs) == (y.data_ptr() == args[0].data_ptr()), func
        assert kind.family is not None and short.replace("_", "") in getattr(func, "__name__", "").replace("_", ""), (
            func,
            short,
        )
