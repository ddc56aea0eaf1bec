"""The learning-rate rules. Adam family: too high, from the update shrink (needs GradDataRatio: the weights' std at
init), else from the normalised step (needs OptimizerState). SGD: too low, from update:data at the schedule's highest
rate; too high when the network died. Nothing else: the suites show no statistic here that tells the other cases
apart. Each yields to a fault at init (it explains small updates better than the rate) and to the ones before it:
one learning-rate verdict at most. Calibration: ``docs/diagnosis.md#the-learning-rate``."""

from __future__ import annotations

import math
from collections.abc import Callable

from lightning_netdiag.rules.base import AT_INIT, Found, Records, Rule, at, median, nearest_step, steps_of

__all__ = [
    "ADAM_SHRINK_HIGH", "ADAM_SHRINK_OK", "ADAM_STEP_AT_ONCE", "ADAM_STEP_LOW", "FLAT_PCT", "RULES", "SGD_FALL",
    "SGD_LOW", "SGD_OK", "adam_shrink_at", "adam_step_at", "flat_at", "learning_rate_note", "rates", "sgd_died_at",
    "sgd_fall_at", "sgd_update_at",
]  # fmt: skip

#: Adam-family optimizers: at their first step every element moves by about the learning rate, so the update
#: relative to the weight is ``lr / std(weight at init)``; later it is smaller by the *update shrink*
#: ``log10(lr / std(weight at init)) - update:data``, as steps start to cancel (noise, oscillation) and the
#: weights grow. Too high above this.
ADAM_SHRINK_HIGH = 1.9
ADAM_SHRINK_OK = 1.5  # the shrink of the good rates; the advice aims for it (about one decade per decade of rate)
#: Adam family: the median over the weights of the RMS of the normalised step ``m_hat / (sqrt(v_hat) + eps)``
#: below which the learning rate is too high: each element's gradient flips sign from step to step, so its average
#: ``m`` is small next to its size ``sqrt(v)``.
ADAM_STEP_LOW = 0.045
ADAM_STEP_AT_ONCE = 0.02  # the normalised step's median below which one logging step is enough
#: SGD: the median update:data (log10, scaled back to the schedule's highest rate so far) below which the learning
#: rate is too low: the lecture's -3.
SGD_LOW = -3.07
SGD_OK = -2.3  # the middle of the healthy runs: the advice aims for it
#: The *fall*: decades by which the update per unit of learning rate dropped below its value at the second
#: logged step (the first after step 0, whose SGD momentum is empty). Beyond this the gradients died or
#: vanished: with a layer all in its flat region (:data:`FLAT_PCT`: no gradient passes it) that is a network
#: killed by too large steps; without, a network that fits its data (its loss near 0). A fall rules out the
#: too-low advice either way (a higher rate is no cure, or no need).
SGD_FALL = 1.0
FLAT_PCT = 99.0  # % of a layer's values in the flat region: the layer passes no gradient


def rates(records: Records) -> dict[int, float]:
    """step -> the learning rate logged there."""
    update = records.get("update")
    return {} if update is None else dict(update.points("lr"))


def _median_over_weights(records: Records, step: int, value: Callable[[str, float], float]) -> float | None:
    """The median over the weights of ``value(name, update:data)`` at ``step``, leaving out NaN."""
    updates = at(records.get("update"), "update_data_log10", step)
    return median({name: v for name, ud in updates.items() if not math.isnan(v := value(name, ud))})


def adam_shrink_at(records: Records, step: int) -> float | None:
    """The median over the weights of ``log10(lr / std(weight at init)) - update:data`` at ``step`` (see
    :data:`ADAM_SHRINK_HIGH`), under an Adam-family optimizer; None where it cannot be read."""
    update, grad_data = records.get("update"), records.get("grad_data")
    if update is None or update.optimizer_family != "adam" or (lr := update.value("lr", step) or 0.0) <= 0:
        return None
    std0 = {} if grad_data is None else grad_data.init_std()
    return _median_over_weights(records, step, lambda n, ud: math.log10(lr / std0[n]) - ud if n in std0 else math.nan)


def _shrink_unread(records: Records, step: int) -> str:
    """Why :func:`adam_shrink_at` read nothing at ``step``."""
    grad_data = records.get("grad_data")
    if grad_data is None:
        return "needs GradDataRatio"
    if not grad_data.at_init("grad_std"):
        return "GradDataRatio did not measure step 0"
    if not grad_data.init_std():  # a weight's std is its gradient's over grad:data: neither may be 0 at step 0
        return "no weight's std at step 0: each was 0 there or had no gradient, as LoRA's zero-initialised pairs"
    return f"no learning rate at step {step}"


def adam_step_at(records: Records, step: int) -> float | None:
    """The median over the weights of the RMS of Adam's normalised step at ``step`` (after step 0, whose step is
    1 for every element), see :data:`ADAM_STEP_LOW`; None where it was not read."""
    return median(at(records.get("optimizer"), "adam_step_rms", step)) if step > 0 else None


def sgd_fall_at(records: Records, step: int) -> float | None:
    """The median over the weights of the fall of the update per unit of learning rate from the second logged
    step (the first after step 0, whose momentum is still empty) to ``step`` (see :data:`SGD_FALL`), under
    SGD; None where it cannot be read."""
    update, lrs = records.get("update"), rates(records)
    lr = lrs.get(step, 0.0)
    if update is None or update.optimizer_family != "sgd" or lr <= 0 or step == 0:
        return None
    second = {n: points[1] for n, points in update.first("update_data_log10", 2).items() if len(points) > 1}
    start = {n: ud - math.log10(lrs[s]) for n, (s, ud) in second.items() if s <= step and lrs.get(s, 0.0) > 0}
    return _median_over_weights(records, step, lambda n, ud: start.get(n, math.nan) + math.log10(lr) - ud)


def sgd_update_at(records: Records, step: int) -> float | None:
    """The median over the weights of update:data at ``step`` (not the first), scaled back to the highest
    learning rate of the schedule so far (see :data:`SGD_LOW`), under SGD; None where it cannot be read or the
    gradients fell (see :data:`SGD_FALL`)."""
    fall = sgd_fall_at(records, step)
    if fall is None or fall > SGD_FALL:
        return None
    lrs = rates(records)
    top = max(v for s, v in lrs.items() if s <= step)
    return _median_over_weights(records, step, lambda n, ud: ud + math.log10(top / lrs[step]))


def flat_at(records: Records, step: int) -> float | None:
    """The highest % of values in the flat region among the watched layers with a saturation rule."""
    values = at(records.get("saturation"), "act_saturated_pct", step)
    return max(values.values()) if values else None


def sgd_died_at(records: Records, step: int) -> float | None:
    """The SGD fall at ``step`` where a layer is all flat there (a dead network); None otherwise."""
    fall, flat = sgd_fall_at(records, step), flat_at(records, nearest_step(records.get("saturation"), step))
    return fall if fall is not None and flat is not None and flat > FLAT_PCT else None


def _shrink_text(found: Found) -> str:
    shrink = found.hits["median of the weights"]
    return (f"the updates are {10**shrink:.0f}x smaller than the learning rate relative to the weights' initial "
            "scale: the steps mostly cancel, or the weights grew")  # fmt: skip


def _step_text(found: Found) -> str:
    rms = found.hits["median of the weights"]
    return (f"Adam's normalised step m/(sqrt(v)+eps) has an RMS of {rms:.2g}: each weight's gradient keeps flipping "
            "sign from step to step, so the steps mostly cancel: typical of steps too large")  # fmt: skip


def _died_text(found: Found) -> str:
    fall = found.hits["median of the weights"]
    return (f"the network died: its updates per unit of learning rate fell {fall:.1f} decades since the first step "
            "and a layer sits all in its flat region, passing no gradient: typical of steps too large")  # fmt: skip


def _divide(found: Found) -> str:
    return f"divide the learning rate by about {10 ** (found.hits['median of the weights'] - ADAM_SHRINK_OK):.2g}"


_HIGH = "learning rate too high"

RULES: tuple[Rule, ...] = (
    Rule(
        id="lr.adam_shrink",
        check=_HIGH,
        reads=("update", "grad_data"),
        when="training",
        line=ADAM_SHRINK_HIGH,
        above=True,
        signal=adam_shrink_at,
        signal_name="Adam update shrink",
        constant="ADAM_SHRINK_HIGH",
        healthy=f"Adam: update shrink < {ADAM_SHRINK_HIGH:g}",
        cause=_shrink_text,
        advice=_divide,
        yields_to=(AT_INIT,),
        section="the-learning-rate",
    ),  # fmt: skip
    Rule(
        id="lr.adam_step",
        check=_HIGH,
        reads=("optimizer",),
        when="training",
        line=ADAM_STEP_LOW,
        above=False,
        at_once=ADAM_STEP_AT_ONCE,
        signal=adam_step_at,
        signal_name="Adam step RMS, median",
        constant="ADAM_STEP_LOW",
        at_once_constant="ADAM_STEP_AT_ONCE",
        healthy=f"Adam: normalised step RMS > {ADAM_STEP_LOW:g}",
        cause=_step_text,
        advice="divide the learning rate by about 3 to 10 (this signal does not say by how much), or add a warm-up",
        yields_to=(AT_INIT, "lr.adam_shrink"),
        section="the-learning-rate",
    ),
    Rule(
        id="lr.sgd_died",
        check=_HIGH,
        reads=("update", "saturation"),
        when="training",
        line=SGD_FALL,
        above=True,
        signal=sgd_died_at,
        signal_name="SGD fall, a layer flat",
        constant="SGD_FALL",
        healthy=f"SGD: the update per unit of learning rate falls < {SGD_FALL:g} decades",
        cause=_died_text,
        advice="divide the learning rate by about 10 (a dead network does not tell by how much) and train again",
        yields_to=(AT_INIT, "lr.adam_shrink", "lr.adam_step"),
        section="the-learning-rate",
    ),
    Rule(
        id="lr.sgd_low",
        check="learning rate too low",
        reads=("update",),
        when="training",
        line=SGD_LOW,
        above=False,
        signal=sgd_update_at,
        signal_name="SGD update:data at top rate",
        constant="SGD_LOW",
        healthy=f"SGD: update:data > {SGD_LOW:g}",
        cause="the updates are tiny next to the weights: the network barely learns",
        advice=lambda f: (
            f"multiply the learning rate by about {10 ** (SGD_OK - f.hits['median of the weights']):.2g}"
            " (calibrated on training from scratch: a fine-tune of pretrained weights may run lower on purpose)"
        ),
        yields_to=(AT_INIT, "lr.adam_shrink", "lr.adam_step", "lr.sgd_died"),
        section="the-learning-rate",
    ),
)


def learning_rate_note(records: Records) -> str | None:
    """What the learning-rate rules read at the latest step, and what they do not judge: said even when they find
    nothing, so that a run at a good rate reads so."""
    update = records.get("update")
    steps = steps_of(update)
    if update is None or not steps:
        return None
    step, family = steps[-1], update.optimizer_family
    if family == "adam":
        shrink = adam_shrink_at(records, step)
        read = f"unread ({_shrink_unread(records, step)})" if shrink is None else f"{shrink:.2f} at step {step}"
        rms = adam_step_at(records, nearest_step(records.get("optimizer"), step))
        noise = "" if rms is None else f"; normalised step RMS {rms:.2g}, too high below {ADAM_STEP_LOW:g}"
        return (f"learning rate (Adam): update shrink {read}, too high above {ADAM_SHRINK_HIGH:g}{noise}; "
                "too low is not judged under Adam")  # fmt: skip
    if family == "sgd":
        ud = sgd_update_at(records, step)
        read = "unread" if ud is None else f"{ud:.2f} at step {step}"
        return (f"learning rate (SGD): update:data at the schedule's top rate {read}, too low below {SGD_LOW:g}; "
                "too high is named only when the network dies")  # fmt: skip
    return "learning rate: not judged for this optimizer (the checks are calibrated for SGD and Adam)"
