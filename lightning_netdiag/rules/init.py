"""The rules about the network at initialisation (step 0): the lecture's rules of thumb. Calibration:
``docs/diagnosis.md#the-rules-at-init-and-during-training``."""

from __future__ import annotations

import math
from collections.abc import Mapping

from lightning_netdiag.rules.base import Found, Records, Rule, at_init

__all__ = [
    "DEAD_STD", "FAMILY_NAMES", "GRAD_SPREAD", "OVERCONFIDENT", "RULES", "SATURATED_PCT", "UNEARNED", "by_family",
    "gradient_ratio_at_init",
]  # fmt: skip

#: % of values in the flat region at step 0 above which a layer is saturated, per activation family (tanh;
#: gates, sigmoid: stuck open or shut; ReLU-like: a mostly dead layer, half is normal; GELU-like, judged on the
#: input: for unit-variance inputs 0.1 % lie below -3).
SATURATED_PCT = {"tanh": 40.0, "sigmoid": 25.0, "relu": 90.0, "gelu": 10.0}
DEAD_STD = 0.05  # a tanh-like layer whose outputs at step 0 barely move from 0 passes almost no signal
GRAD_SPREAD = 10.0  # first vs last layer's activation-gradient std at step 0, either way
#: The output at step 0 is over-confident when its cross-entropy against random labels exceeds this many
#: times ln(classes) (a uniform output gives exactly ln(classes))...
OVERCONFIDENT = 2.0
#: ... and the real loss of step 0 is at least this share of it (a trained model fine-tuned is confident
#: *and* right: its loss is far below; a bad init is confident and wrong).
UNEARNED = 0.5

_SECTION = "the-rules-at-init-and-during-training"  # in docs/diagnosis.md
FAMILY_NAMES = {"tanh": "tanh-like", "sigmoid": "gates (sigmoid-like)", "relu": "ReLU-like", "gelu": "GELU-like"}

_SATURATION_TEXT = {
    "tanh": (
        "pre-activations too large at init: the weights before it are scaled too big, or no normalization",
        "init the weights before it with gain/sqrt(fan_in) (5/3 for tanh), or add BatchNorm/LayerNorm before the "
        "nonlinearity",
    ),
    "sigmoid": (
        "the gate is stuck open or shut at init for most values: its input is too large",
        "scale down the weights that feed the gate (1/sqrt(fan_in)), or normalize its input",
    ),
    "relu": (
        "almost every output is 0 at init: the layer starts mostly dead",
        "check the init and the bias before it; use a leaky variant",
    ),
    "gelu": (
        "many inputs lie in the flat negative tail at init: the pre-activations are too large or shifted",
        "normalize before the nonlinearity (LayerNorm/BatchNorm), or scale the init down",
    ),
}


def by_family(records: Records, values: Mapping[str, float]) -> dict[str | None, dict[str, float]]:
    """family -> the layers of ``values`` in it (None: unknown)."""
    saturation = records.get("saturation")
    out: dict[str | None, dict[str, float]] = {}
    for name, v in values.items():
        out.setdefault(None if saturation is None else saturation.family(name), {})[name] = v
    return out


def _saturated(family: str) -> Rule:
    def at_zero(records: Records) -> dict[str, float]:
        """The family's saturated % at init, but of a layer whose every value is the same: all 0 after a gain
        initialised to 0 before it (a residual branch's last norm, as timm's CSP networks make it) or after inputs
        all below 0, which a constant cannot tell apart (a layer that stays dead is named during training)."""
        saturation = records.get("saturation")
        constant = {n for n, v in at_init(saturation, "act_std").items() if v == 0}
        pct = at_init(saturation, "act_saturated_pct")
        return by_family(records, {n: v for n, v in pct.items() if n not in constant}).get(family, {})

    def flag(records: Records, step: int, line: float) -> dict[str, float]:
        return {n: v for n, v in at_zero(records).items() if v > line}

    return Rule(
        id=f"init.saturation.{family}", check="saturation", reads=("saturation",), when="init",
        line=SATURATED_PCT[family], above=True, flag=flag,
        signal=lambda records, step: max(at_zero(records).values(), default=None),
        signal_name=f"saturation at init, {family}", constant=f"SATURATED_PCT[{family}]",
        healthy=f"{FAMILY_NAMES[family]}: < {SATURATED_PCT[family]:g} % at init",
        cause=_SATURATION_TEXT[family][0], advice=_SATURATION_TEXT[family][1], section=_SECTION,
    )  # fmt: skip


def _tanh_stds(records: Records) -> dict[str, float]:
    return by_family(records, at_init(records.get("saturation"), "act_std")).get("tanh", {})


def gradient_ratio_at_init(records: Records) -> tuple[str, float] | None:
    """("first / last", the ratio of their activation-gradient std at init), or None with fewer than two layers or
    where the two differ in size.

    Within the family with the most layers (a gate's gradient is not comparable with a tanh's). Layers made in a
    module that runs several times per forward (a recurrent cell: its calls are time steps, not depth), and layers
    that get exactly no gradient (a gate multiplying a zero state), say nothing about depth: left out. Nor does a
    value's gradient in tensors of different sizes: a CNN's stages (56 x 56 against 7 x 7 positions), a classifier's
    head after pooled features (torchvision's ResNet-50 at init: 80x from its stem to its last block, ConvNeXt 0.09x,
    MobileNetV3 0.007x, all healthy): said only where the first and last layers made as many values (the lecture's
    MLPs, a transformer's blocks; sizes unknown in logs written before they were recorded: compared)."""
    saturation = records.get("saturation")
    loop = set() if saturation is None else saturation.layers_in_loop
    stds = {n: v for n, v in at_init(saturation, "act_grad_std").items() if v > 0 and n not in loop}
    families = by_family(records, stds)
    if not families:
        return None
    layers = max(families.values(), key=len)
    if len(layers) < 2:
        return None
    names = list(layers)  # depth order: the order the layers were first logged in
    first, last = names[0], names[-1]
    sizes = {} if saturation is None else saturation.layer_sizes
    if first in sizes and last in sizes and sizes[first] != sizes[last]:
        return None
    return f"{first} / {last}", layers[first] / layers[last]


def _flow(records: Records, step: int) -> float | None:
    flow = gradient_ratio_at_init(records)
    return None if flow is None else flow[1]


def _flow_flag(records: Records, step: int, line: float, above: bool) -> dict[str, float]:
    flow = gradient_ratio_at_init(records)
    if flow is None:
        return {}
    span, ratio = flow
    return {span: ratio} if (ratio > line if above else ratio < line) else {}


def _output_ratio(records: Records, step: int) -> float | None:
    """The output's cross-entropy at init against random labels over ln(classes) (the last output's)."""
    ce, classes = (at_init(records.get("saturation"), m) for m in ("init_output_ce", "init_output_classes"))
    ratios = [value / math.log(classes[name]) for name, value in ce.items() if classes.get(name, 1) > 1]
    return ratios[-1] if ratios else None


def _overconfident(records: Records, step: int, line: float) -> dict[str, float]:
    """The output at step 0 against a uniform guess (the lecture's first fix: 27.9 instead of ln 27 = 3.30)."""
    saturation = records.get("saturation")
    ce, classes = at_init(saturation, "init_output_ce"), at_init(saturation, "init_output_classes")
    loss = None if saturation is None else saturation.init_value("init_loss")
    hits = {}
    for name, value in ce.items():
        uniform = math.log(classes.get(name, 1.0))
        unearned = loss is not None and loss >= UNEARNED * value  # no loss seen: cannot tell, say nothing
        if uniform > 0 and value > line * uniform and unearned:
            hits[name] = value
    return hits


def _uniform(found: Found) -> str:
    classes = at_init(found.records.get("saturation"), "init_output_classes")[next(iter(found.hits))]
    return f"about ln({classes:g}) = {math.log(classes):.2f} at init (a uniform guess)"


RULES: tuple[Rule, ...] = (
    Rule(
        id="init.overconfident",
        check="over-confident output",
        reads=("saturation",),
        when="init",
        line=OVERCONFIDENT,
        above=True,
        flag=_overconfident,
        signal=_output_ratio,
        signal_name="output at init / ln(classes)",
        constant="OVERCONFIDENT",
        healthy=_uniform,
        cause="the output layer's logits are large at init: the network is confidently wrong and spends its first "
        "steps undoing it",
        advice="scale the output layer's init down (e.g. by 0.01) and zero its bias",
        section=_SECTION,
    ),
    *(_saturated(family) for family in SATURATED_PCT),
    Rule(
        id="init.dead_layer",
        check="dead layer",
        reads=("saturation",),
        when="init",
        line=DEAD_STD,
        above=False,
        flag=lambda records, step, line: {n: v for n, v in _tanh_stds(records).items() if v < line},
        signal=lambda records, step: min(_tanh_stds(records).values(), default=None),
        signal_name="tanh std at init (least)",
        constant="DEAD_STD",
        healthy=f"tanh-like: std > {DEAD_STD:g} at init",
        cause="activations all near 0 at init: the weights before it are scaled far too small, or the gain is 0",
        advice="use a larger init scale (gain/sqrt(fan_in))",
        section=_SECTION,
    ),
    Rule(
        id="init.vanishing_gradient",
        check="vanishing gradient",
        reads=("saturation",),
        when="init",
        line=1 / GRAD_SPREAD,
        above=False,
        flag=lambda records, step, line: _flow_flag(records, step, line, False),
        signal=_flow,
        signal_name="gradient ratio at init",
        constant="1 / GRAD_SPREAD",
        healthy=f"{1 / GRAD_SPREAD:g} .. {GRAD_SPREAD:g} at init",
        cause="the gradient shrinks toward the input: saturated, dead or badly scaled layers",
        advice="use gain/sqrt(fan_in) init, normalization, or residual connections",
        section=_SECTION,
    ),
    Rule(
        id="init.exploding_gradient",
        check="exploding gradient",
        reads=("saturation",),
        when="init",
        line=GRAD_SPREAD,
        above=True,
        flag=lambda records, step, line: _flow_flag(records, step, line, True),
        signal=_flow,
        signal_name="gradient ratio at init",
        constant="GRAD_SPREAD",
        healthy=f"{1 / GRAD_SPREAD:g} .. {GRAD_SPREAD:g} at init",
        cause="the gradient grows toward the input: the weights are scaled too large",
        advice="use gain/sqrt(fan_in) init (He for ReLU), normalization, or gradient clipping",
        section=_SECTION,
    ),
)
