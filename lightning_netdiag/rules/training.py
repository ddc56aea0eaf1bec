"""The rules during training: non-finite values (fatal, at once), dead units, a weight that is not learning, fp16
gradients underflowing, a loss that diverged. Calibration:
``docs/diagnosis.md#the-rules-at-init-and-during-training``."""

from __future__ import annotations

import statistics

from lightning_netdiag.rules.base import Found, Records, Rule, at, median, positive

__all__ = [
    "DEAD_UNITS_PCT", "DIVERGED", "DIVERGED_AT_ONCE", "NONFINITE", "RULES", "UNDERFLOW_PCT", "dead_units_at",
    "fp16_tiny_at", "loss_rise_at",
]  # fmt: skip

#: % of units saturated for every example of a step, in a row, above which a layer has dead units: ReLU
#: and GELU layers only (healthy recurrent and gated layers keep many units saturated by design).
DEAD_UNITS_PCT = {"relu": 25.0, "gelu": 25.0}
#: Median % of the layers' fp16 activation-gradient values below fp16's normal range above which the
#: gradients underflow (no loss scaling).
UNDERFLOW_PCT = 5.0
#: The median of the training losses of the last ``every_n_steps`` steps over the loss at step 0 above which the
#: training diverged; past :data:`DIVERGED_AT_ONCE`, one logging step is enough (a median over that many steps: no
#: single batch moves it). A training that learns stays below 1 after its first steps, however noisy its batches.
DIVERGED = 10.0
DIVERGED_AT_ONCE = 100.0

_FAMILY_NAMES = {"relu": "ReLU-like", "gelu": "GELU-like"}


def _nonfinite(metric: str, kind: str, what: str) -> Rule:
    return Rule(
        id=f"nonfinite.{metric}", check="non-finite", reads=(kind,), when="now", line=0.0, above=True,
        flag=lambda records, step, line: positive(at(records.get(kind), metric, step)),
        # named in depth order, not by count: the first layer that goes non-finite is where to look; under a loss
        # scaler the gradients' counts must persist (it skips a step whose gradients overflowed)
        badness=lambda count: 0.0, severity="fatal", held_under_scaler=metric != "act_nonfinite",
        healthy=f"0 NaN/Inf in the {what}",
        cause="NaN/Inf values: the loss or the weights have diverged, or a log(0) / 0 upstream; the first layer "
        "named is the earliest affected",
        advice="lower the learning rate, clip gradients, check the loss for log(0); under fp16 use a GradScaler",
        section="the-rules-at-init-and-during-training",
    )  # fmt: skip


NONFINITE: tuple[Rule, ...] = (
    _nonfinite("act_nonfinite", "saturation", "activations"),
    _nonfinite("act_grad_nonfinite", "saturation", "activation gradients"),
    _nonfinite("grad_nonfinite", "grad_data", "weight gradients"),
)


def dead_units_at(records: Records, step: int) -> dict[str, tuple[str, float]]:
    """name -> (family, % of dead units) at ``step``, for the families with a limit."""
    saturation = records.get("saturation")
    if saturation is None:
        return {}
    values = saturation.at("act_dead_pct", step)
    return {n: (f, v) for n, v in values.items() if (f := saturation.family(n)) is not None and f in DEAD_UNITS_PCT}


def fp16_tiny_at(records: Records, step: int) -> dict[str, float]:
    """name -> % of its fp16 gradient values below fp16's normal range, at ``step``."""
    return at(records.get("saturation"), "act_grad_fp16_tiny_pct", step)


def loss_rise_at(records: Records, step: int) -> float | None:
    """The median of the training losses of the last ``every_n_steps`` steps up to ``step`` (SaturationMonitor's
    ``loss_median``) over the loss at step 0; None where either is unknown or the loss at step 0 is not positive (a
    loss that can be negative: no ratio)."""
    saturation = records.get("saturation")
    if saturation is None:
        return None
    first, now = saturation.init_value("loss_median"), saturation.at("loss_median", step).get("")
    return None if first is None or now is None or not first > 0 else now / first


def _diverged_text(found: Found) -> str:
    first = found.records["saturation"].init_value("loss_median")
    rise = max(found.hits.values())
    return (
        f"the training diverged: its loss rose from {first:.3g} at step 0 to {first * rise:.3g} (the median of the "
        f"steps up to step {found.step}), {rise:.3g}x"
    )


def _underflow(records: Records, step: int, line: float) -> dict[str, float]:
    tiny = fp16_tiny_at(records, step)
    return tiny if tiny and statistics.median(tiny.values()) > line else {}


def _not_learning(found: Found) -> str:
    grad_data = found.records.get("grad_data")
    latest = grad_data.last_step if grad_data is not None and grad_data.last_step is not None else -1
    no_grad = {n for n, v in at(grad_data, "grad_std", latest).items() if v == 0}
    return (
        "the weight has a gradient but never changes while the others do: left out of the optimizer, frozen, or "
        "its learning rate is 0" + (" (or its gradient is exactly 0)" if no_grad & set(found.hits) else "")
    )


RULES: tuple[Rule, ...] = (
    Rule(
        id="training.dead_units",
        check="dead units",
        reads=("saturation",),
        when="training",
        line=max(DEAD_UNITS_PCT.values()),
        above=True,
        flag=lambda records, step, line: {
            n: v for n, (f, v) in dead_units_at(records, step).items() if v > DEAD_UNITS_PCT[f]
        },
        signal=lambda records, step: max((v for _, v in dead_units_at(records, step).values()), default=None),
        signal_name="dead units %",
        constant="DEAD_UNITS_PCT",
        healthy=", ".join(f"{_FAMILY_NAMES[f]} <= {v:g} %" for f, v in DEAD_UNITS_PCT.items()),
        cause="units output 0 (their flat side) for every example: no gradient reaches their weights",
        advice="check the init and the bias before the layer (a large negative bias kills ReLUs); lower the "
        "learning rate; try a leaky variant",
        section="the-rules-at-init-and-during-training",
    ),
    Rule(
        id="training.not_learning",
        check="not learning",
        reads=("update",),
        when="training",
        line=0.0,
        above=True,
        flag=lambda records, step, line: at(records.get("update"), "update_zero", step),
        badness=lambda v: 0.0,
        healthy="changes at every step",
        cause=_not_learning,
        advice="pass every parameter to the optimizer (build it after the model is complete); check the parameter "
        "groups' learning rates",
        section="the-rules-at-init-and-during-training",
    ),
    Rule(
        id="training.underflow",
        check="gradient underflow",
        reads=("saturation",),
        when="training",
        line=UNDERFLOW_PCT,
        above=True,
        flag=_underflow,
        signal=lambda records, step: median(fp16_tiny_at(records, step)),
        signal_name="fp16 tiny %, median",
        constant="UNDERFLOW_PCT",
        named=lambda found: {n: v for n, v in found.hits.items() if v > UNDERFLOW_PCT},
        healthy=f"fp16 gradients: median < {UNDERFLOW_PCT:g} % below fp16's normal range (6.1e-05)",
        cause="fp16 gradients are too small for fp16: they lose precision or flush to 0 (no loss scaling)",
        advice="use a GradScaler (Lightning's precision='16-mixed' has one), or bf16",
        section="the-rules-at-init-and-during-training",
    ),
    Rule(
        id="training.loss_diverged",
        check="loss diverged",
        reads=("saturation",),
        when="training",
        line=DIVERGED,
        above=True,
        at_once=DIVERGED_AT_ONCE,
        signal=loss_rise_at,
        signal_name="loss over its value at step 0",
        over="loss",
        constant="DIVERGED",
        at_once_constant="DIVERGED_AT_ONCE",
        healthy=f"the loss below {DIVERGED:g}x its value at step 0",
        cause=_diverged_text,
        advice="lower the learning rate (by 10 or more: a diverged run does not tell by how much), warm it up, or "
        "clip gradients; if the loss is a sum (over tokens, pixels), make it a mean",
        section="the-rules-at-init-and-during-training",
    ),
)
