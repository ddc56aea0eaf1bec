"""The health report: rules on the records (:mod:`lightning_netdiag.record`), each calibrated on runs with a
known outcome. It reads records only, so the report of a live run and of its logs is one and the same.

Every constant below was set on the diagnosis suite (``benchmarks/diagnosis``): healthy recipes, learning-rate
sweeps and runs with one injected fault, on MLPs, CNNs, a GRU, GPT and ViT, trained with SGD and AdamW. The
README's health-report section gives each constant with the values the suite measured on both sides of it.
Precision first: a rule speaks only where the suite shows it separates healthy runs from faulty ones; where
the statistics cannot tell, it stays silent (and the README says where that is).

Two phases, as the lecture's rules of thumb are about the network at initialisation:

- **at init**: judged on step 0 (the first optimizer step, before any update): saturation, dead layers,
  gradients vanishing or exploding through the layers, an over-confident output;
- **during training**: a condition must hold at :data:`PERSIST` consecutive *logging* steps (measured steps,
  ``every_n_steps`` apart, the cadence each record carries) before it counts: dead units, a weight that is not
  learning, fp16 gradients underflowing, the learning rate. The suite was calibrated at every 50 steps. A signal
  far past its line (an attention logit above :data:`ATTN_LOGIT_AT_ONCE`, Adam's normalised step below
  :data:`ADAM_STEP_AT_ONCE`) counts at the first logging step it is seen: the hold is for values that one batch
  can push across a line, and waiting would cost the warning 2 logging steps.

Non-finite values are fatal at once (under a loss scaler, which skips the steps whose gradients overflow,
only when they persist). Each rule gives **one** verdict naming how many layers break it and the worst few.

:func:`evaluate` judges the latest step; :func:`summarize` is the report of a whole run, the one that every
front end and ``netdiag report`` print: the rules replayed at every logged step (:func:`replay`), so that a
warning that held during training and cleared is kept, with the steps where it held.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from lightning_netdiag import spikes
from lightning_netdiag.record import (
    ActivationRecord,
    FlightRecord,
    GradDataRecord,
    Key,
    LogitRecord,
    OptimizerRecord,
    Record,
    UpdateRecord,
)

__all__ = [
    "ADAM_EPS_PCT", "ADAM_SHRINK_HIGH", "ADAM_SHRINK_OK", "ADAM_STEP_AT_ONCE", "ADAM_STEP_LOW", "ATTN_ENTROPY_FALL",
    "ATTN_ENTROPY_LOW", "ATTN_LOGIT_AT_ONCE", "ATTN_LOGIT_HIGH", "COLUMNS", "DEAD_STD", "DEAD_UNITS_PCT", "FLAT_PCT",
    "GRAD_SPREAD", "OVERCONFIDENT", "PERSIST",
    "SATURATED_PCT", "SGD_FALL", "SGD_LOW", "SGD_OK", "UNDERFLOW_PCT", "UNEARNED", "WORST", "Report", "Verdict",
    "adam_eps_at", "adam_shrink_at", "adam_step_at", "as_table", "at_init", "attention_entropy_at",
    "attention_logits_at", "checks", "collapsed_attentions_at", "dead_units_at", "evaluate", "fallen_entropy_at",
    "flat_at", "format_markdown", "format_table", "fp16_tiny_at", "gradient_ratio_at_init", "has_warmup",
    "learning_rate_note", "flight_notes", "logit_notes", "replay", "sgd_died_at", "sgd_fall_at", "sgd_update_at",
    "summarize",
]  # fmt: skip

#: Logging steps in a row (not optimizer steps) at which a during-training condition must hold before it counts:
#: at every_n_steps=n, a window of (PERSIST - 1) * n optimizer steps.
PERSIST = 3
#: % of values in the flat region at step 0 above which a layer is saturated, per activation family. tanh:
#: the healthy recipes reach 21 % (kaiming init, gain 5/3), the saturated inits 68 % and more; gates
#: (sigmoid): stuck open or shut; ReLU-like: a mostly dead layer (half is normal); GELU-like, judged on the
#: input: for unit-variance inputs 0.1 % lie below -3.
SATURATED_PCT = {"tanh": 40.0, "sigmoid": 25.0, "relu": 90.0, "gelu": 10.0}
DEAD_STD = 0.05  # a tanh-like layer whose outputs at step 0 barely move from 0 passes almost no signal
#: % of units saturated for every example of a step, in a row, above which a layer has dead units: ReLU
#: and GELU layers only (healthy recurrent and gated layers keep many units saturated by design).
DEAD_UNITS_PCT = {"relu": 25.0, "gelu": 25.0}
GRAD_SPREAD = 10.0  # first vs last layer's activation-gradient std at step 0, either way
#: The output at step 0 is over-confident when its cross-entropy against random labels exceeds this many
#: times ln(classes) (a uniform output gives exactly ln(classes))...
OVERCONFIDENT = 2.0
#: ... and the real loss of step 0 is at least this share of it (a trained model fine-tuned is confident
#: *and* right: its loss is far below; a bad init is confident and wrong).
UNEARNED = 0.5
#: Median % of the layers' fp16 activation-gradient values below fp16's normal range above which the
#: gradients underflow (no loss scaling).
UNDERFLOW_PCT = 5.0
#: Adam-family optimizers: at their first step every element moves by about the learning rate, so the update
#: relative to the weight is ``lr / std(weight at init)``; later it is smaller by the *update shrink*
#: ``log10(lr / std(weight at init)) - update:data``, as steps start to cancel (noise, oscillation) and the
#: weights grow. Its median over the weights stays below 1.9 in every healthy run of the suite and rises above
#: it from 10x the best rate on: the learning rate is too high above :data:`ADAM_SHRINK_HIGH`.
ADAM_SHRINK_HIGH = 1.9
ADAM_SHRINK_OK = 1.5  # the shrink of the good rates; the advice aims for it (about one decade per decade of rate)
#: SGD: the median update:data (log10, scaled back to the schedule's highest rate so far) below which the learning
#: rate is too low: the lecture's -3, set on the suite halfway between the healthy runs (never held below -2.97
#: after step 0, whose momentum is not built up yet and is not judged) and the runs 10x too slow (held at -3.17
#: and below), but for a network with BatchNorm after every weight (see the README).
SGD_LOW = -3.07
SGD_OK = -2.3  # the middle of the healthy runs: the advice aims for it
#: The *fall*: decades by which the update per unit of learning rate dropped below its value at the second
#: logged step (the first after step 0, whose SGD momentum is empty). Beyond this the gradients died or
#: vanished: with a layer all in its flat region (:data:`FLAT_PCT`: no gradient passes it) that is a network
#: killed by too large steps; without, a network that fits its data (its loss near 0). A fall rules out the
#: too-low advice either way (a higher rate is no cure, or no need).
SGD_FALL = 1.0
FLAT_PCT = 99.0  # % of a layer's values in the flat region: the layer passes no gradient
#: The largest pre-softmax attention logit (the largest over the attentions, held over PERSIST logging steps)
#: above which an attention is collapsing toward a one-hot softmax (attention-logit growth, Wortsman et al.
#: 2023). Held values on the suites: healthy runs 45 at most (the GPT example at its best rate), but 174 for the
#: GPT example at 3x its best rate with warm-up (2.8 % worse than the best: healthy by the label); the runs
#: 30x too fast 276 to 6,600; runs 10x too fast 85 to 2,750, on both sides of the line.
ATTN_LOGIT_HIGH = 200.0
#: The largest attention logit above which one logging step is enough (no PERSIST hold). At any single logged
#: step on the suites: healthy runs 242 at most (the GPT example at 3x its best rate; 315 for the ViT at 3x, 5 %
#: worse than its best); the runs 30x too fast without warm-up 1,700 to 3,900 at step 50 (tiny-lm, eager and fused).
ATTN_LOGIT_AT_ONCE = 5 * ATTN_LOGIT_HIGH
#: The median over the attentions of their softmax's mean normalised entropy (1: uniform, 0: one-hot; held over
#: PERSIST logging steps) below which, fallen below ATTN_ENTROPY_FALL times its first logged value, the softmaxes
#: have collapsed toward one-hot (entropy collapse, Zhai et al. 2023): the failure attention-logit growth leads to,
#: seen where the logits' spread, not their largest value, grew. Held values on the suites: healthy runs 0.20 at
#: least (the GPT example at 1e-2, 3x its best rate, seed 1: its attentions collapse one by one and it ends 2.8 %
#: worse); tiny-lm 10x too fast without warm-up 0.10 and 0.12 (its largest logit held at 170 and 242), with
#: warm-up 0.25 and 0.34 (not named); runs 30x too fast 0.03 to 0.31 (named by their largest logit).
ATTN_ENTROPY_LOW = 0.15
#: A median entropy that has not fallen to half its first value is how the attentions started (pretrained, or
#: local by design): not a collapse.
ATTN_ENTROPY_FALL = 0.5
#: Adam family: the median over the weights of the RMS of the normalised step ``m_hat / (sqrt(v_hat) + eps)``
#: (held over PERSIST logging steps) below which the learning rate is too high: each element's gradient flips
#: sign from step to step, so its average ``m`` is small next to its size ``sqrt(v)``. Held values on the suites:
#: healthy runs 0.078 and up, but 0.060 for the GPT example at 3x its best rate; runs 30x too fast 0.004 to
#: 0.051, runs 10x too fast 0.025 to 0.10.
ADAM_STEP_LOW = 0.045
#: The normalised step's median below which one logging step is enough (no PERSIST hold). At any single logged
#: step (after step 0) on the suites: healthy runs 0.042 and up (0.028 for the ViT at 3x, 5 % worse than its
#: best); tiny-lm 30x too fast with qk-layernorm 0.016 at step 50, the GPT example at 3x 0.007 at step 100.
ADAM_STEP_AT_ONCE = 0.02
#: Adam family: % of a weight's elements with ``sqrt(v_hat) < eps`` (median over the weights) above which eps,
#: not the gradient, sets the step: Adam turns into a slowed SGD (Wortsman et al. 2023).
ADAM_EPS_PCT = 50.0
WORST = 3  # layers named per verdict

_FAMILY_NAMES = {"tanh": "tanh-like", "sigmoid": "gates (sigmoid-like)", "relu": "ReLU-like", "gelu": "GELU-like"}


@dataclass(frozen=True)
class Verdict:
    """One broken rule. ``severity`` is ``"fatal"`` (training cannot recover) or ``"warning"``.

    ``layer`` names the worst few layers that break it (and how many more), ``value`` is the worst layer's,
    ``hits`` the number of layers, ``worst`` the worst few as (name, value) pairs, worst first; ``step`` the
    logging step it was judged at (0 for the rules about the network at initialisation). In a run's summary
    (:func:`summarize`): ``since``, the first logging step of the run of steps at which it held up to
    ``step``; ``cleared``, whether it no longer held at the end (then ``step`` is the last step it held).
    """

    severity: str
    check: str
    layer: str
    value: float
    healthy: str
    cause: str
    advice: str
    hits: int = 1
    worst: tuple[tuple[str, float], ...] = ()
    step: int | None = None
    since: int | None = None
    cleared: bool = False

    @property
    def steps(self) -> str:
        """Where it held, in words: ``at init``, ``since 150``, ``150-600, cleared since``."""
        if self.step is None:
            return "-"
        span = f"{self.since}-{self.step}" if self.since is not None and self.since != self.step else f"{self.step}"
        if self.cleared:
            return f"{span}, cleared since"
        if self.step == 0:
            return "at init"
        return f"since {self.since}" if self.since is not None else f"{self.step}"


# --- reading the records ---------------------------------------------------------------------------------


def _steps(record: Record | None, n: int = PERSIST) -> list[int]:
    """The latest ``n`` steps of ``record`` (the rules look no further back)."""
    return [] if record is None else record.recent_steps(n)


def _at(record: Record | None, metric: str, step: int) -> dict[str, float]:
    """name -> value of every layer's ``metric`` at ``step``."""
    return {} if record is None else record.at(metric, step)


def at_init(record: Record | None, metric: str) -> dict[str, float]:
    """name -> value of every layer's ``metric`` at step 0 (the network at initialisation), if recorded."""
    return {} if record is None else record.at_init(metric)


def _persistent(
    record: Record | None,
    rule: Callable[[int], dict[str, float]],
    at_once: Callable[[int], dict[str, float]] | None = None,
) -> tuple[int | None, dict[str, float]]:
    """The latest step and the layers ``rule`` flags at each of the last :data:`PERSIST` logged steps, or those
    ``at_once`` flags at the latest step alone (a signal so far past its line that one logging step is enough)."""
    steps = _steps(record)
    if at_once is not None and steps and (now := at_once(steps[-1])):
        return steps[-1], now
    if len(steps) < PERSIST:
        return None, {}
    flagged = [rule(step) for step in steps]
    common = set.intersection(*(set(f) for f in flagged))
    return steps[-1], {name: flagged[-1][name] for name in flagged[-1] if name in common}


def _by_family(saturation: ActivationRecord | None, values: Mapping[str, float]) -> dict[str | None, dict[str, float]]:
    out: dict[str | None, dict[str, float]] = {}
    for name, v in values.items():
        out.setdefault(None if saturation is None else saturation.family(name), {})[name] = v
    return out


def _verdict(
    severity: str, check: str, hits: Mapping[str, float], badness: Callable[[float], float], healthy: str,
    cause: str, advice: str, step: int | None,
) -> list[Verdict]:  # fmt: skip
    """One verdict over the layers that break a rule (none if none does), the worst first."""
    if not hits:
        return []
    ranked = sorted(hits.items(), key=lambda item: -badness(item[1]))
    worst = tuple(ranked[:WORST])
    names = ", ".join(name for name, _ in worst) + (f" and {len(hits) - WORST} more" if len(hits) > WORST else "")
    return [Verdict(severity, check, names, worst[0][1], healthy, cause, advice, len(hits), worst, step)]


# --- fatal: non-finite values ---------------------------------------------------------------------------


_NONFINITE = {
    "act_nonfinite": "activations", "act_grad_nonfinite": "activation gradients", "grad_nonfinite": "weight gradients"
}  # fmt: skip


def _nonfinite(saturation: ActivationRecord | None, grad_data: GradDataRecord | None) -> list[Verdict]:
    out = []
    gd_steps = _steps(grad_data)
    scaled = grad_data is not None and bool(gd_steps) and grad_data.value("loss_scale", gd_steps[-1]) is not None
    for metric in _NONFINITE:
        cb = grad_data if metric == "grad_nonfinite" else saturation
        steps = _steps(cb)
        if not steps:
            continue
        if scaled and metric != "act_nonfinite":  # the scaler skips a step whose gradients overflowed

            def counts(s: int, cb: Record | None = cb, metric: str = metric) -> dict[str, float]:
                return _positive(_at(cb, metric, s))

            step, hits = _persistent(cb, counts)
        else:
            step, hits = steps[-1], _positive(_at(cb, metric, steps[-1]))
        # In depth order, not by count: the first layer that goes non-finite is where to look.
        out += _verdict(
            "fatal", "non-finite", hits, lambda count: 0.0, f"0 NaN/Inf in the {_NONFINITE[metric]}",
            "NaN/Inf values: the loss or the weights have diverged, or a log(0) / 0 upstream; the first layer "
            "named is the earliest affected",
            "lower the learning rate, clip gradients, check the loss for log(0); under fp16 use a GradScaler", step,
        )  # fmt: skip
    return out


def _positive(values: Mapping[str, float]) -> dict[str, float]:
    return {name: v for name, v in values.items() if v > 0}


# --- at initialisation ----------------------------------------------------------------------------------

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


def _saturation(saturation: ActivationRecord | None) -> list[Verdict]:
    out = []
    for family, values in _by_family(saturation, at_init(saturation, "act_saturated_pct")).items():
        if family in SATURATED_PCT:
            limit = SATURATED_PCT[family]
            out += _verdict(
                "warning", "saturation", {n: v for n, v in values.items() if v > limit}, lambda v: v,
                f"{_FAMILY_NAMES[family]}: < {limit:g} % at init", *_SATURATION_TEXT[family], 0,
            )  # fmt: skip
    return out


def _dead_layers(saturation: ActivationRecord | None) -> list[Verdict]:
    stds = _by_family(saturation, at_init(saturation, "act_std")).get("tanh", {})
    return _verdict(
        "warning", "dead layer", {n: v for n, v in stds.items() if v < DEAD_STD}, lambda v: -v,
        f"tanh-like: std > {DEAD_STD:g} at init",
        "activations all near 0 at init: the weights before it are scaled far too small, or the gain is 0",
        "use a larger init scale (gain/sqrt(fan_in))", 0,
    )  # fmt: skip


def gradient_ratio_at_init(saturation: ActivationRecord | None) -> tuple[str, float] | None:
    """("first / last", the ratio of their activation-gradient std at init), or None with fewer than two layers."""
    loop = set() if saturation is None else saturation.layers_in_loop
    stds = {n: v for n, v in at_init(saturation, "act_grad_std").items() if v > 0 and n not in loop}
    families = _by_family(saturation, stds)
    if not families:
        return None
    layers = max(families.values(), key=len)
    if len(layers) < 2:
        return None
    names = list(layers)  # depth order: the order the layers were first logged in
    return f"{names[0]} / {names[-1]}", layers[names[0]] / layers[names[-1]]


def _gradient_flow(saturation: ActivationRecord | None) -> list[Verdict]:
    """First vs last layer's activation-gradient std at init, within the family with the most layers (a gate's
    gradient is not comparable with a tanh's). Layers made in a module that runs several times per forward
    (a recurrent cell: its calls are time steps, not depth), and layers that get exactly no gradient (a gate
    multiplying a zero state), say nothing about depth: left out."""
    flow = gradient_ratio_at_init(saturation)
    if flow is None:
        return []
    span, ratio = flow
    healthy = f"{1 / GRAD_SPREAD:g} .. {GRAD_SPREAD:g} at init"
    if ratio < 1 / GRAD_SPREAD:
        return _verdict(
            "warning", "vanishing gradient", {span: ratio}, lambda v: v, healthy,
            "the gradient shrinks toward the input: saturated, dead or badly scaled layers",
            "use gain/sqrt(fan_in) init, normalization, or residual connections", 0,
        )  # fmt: skip
    if ratio > GRAD_SPREAD:
        return _verdict(
            "warning", "exploding gradient", {span: ratio}, lambda v: v, healthy,
            "the gradient grows toward the input: the weights are scaled too large",
            "use gain/sqrt(fan_in) init (He for ReLU), normalization, or gradient clipping", 0,
        )  # fmt: skip
    return []


def _overconfident(saturation: ActivationRecord | None) -> list[Verdict]:
    """The output at step 0 against a uniform guess (the lecture's first fix: 27.9 instead of ln 27 = 3.30)."""
    ce, classes = at_init(saturation, "init_output_ce"), at_init(saturation, "init_output_classes")
    loss = None if saturation is None else saturation.init_value("init_loss")
    hits = {}
    for name, value in ce.items():
        uniform = math.log(classes.get(name, 1.0))
        unearned = loss is not None and loss >= UNEARNED * value  # no loss seen: cannot tell, say nothing
        if uniform > 0 and value > OVERCONFIDENT * uniform and unearned:
            hits[name] = value
    if not hits:
        return []
    name = next(iter(hits))
    uniform = math.log(classes[name])
    return _verdict(
        "warning", "over-confident output", hits, lambda v: v,
        f"about ln({classes[name]:g}) = {uniform:.2f} at init (a uniform guess)",
        "the output layer's logits are large at init: the network is confidently wrong and spends its first "
        "steps undoing it",
        "scale the output layer's init down (e.g. by 0.01) and zero its bias", 0,
    )  # fmt: skip


# --- during training ------------------------------------------------------------------------------------


# Each during-training rule compares a signal of one logged step with its constant; the signals are public so
# that the diagnosis suite can show where each healthy and faulty run stands against the constant.


def dead_units_at(saturation: ActivationRecord | None, step: int) -> dict[str, tuple[str, float]]:
    """name -> (family, % of dead units) at ``step``, for the families with a limit."""
    if saturation is None:
        return {}
    values = saturation.at("act_dead_pct", step)
    return {n: (f, v) for n, v in values.items() if (f := saturation.family(n)) is not None and f in DEAD_UNITS_PCT}


def fp16_tiny_at(saturation: ActivationRecord | None, step: int) -> dict[str, float]:
    """name -> % of its fp16 gradient values below fp16's normal range, at ``step``."""
    return _at(saturation, "act_grad_fp16_tiny_pct", step)


def _dead_units(saturation: ActivationRecord | None) -> list[Verdict]:
    def flagged(step: int) -> dict[str, float]:
        return {n: v for n, (f, v) in dead_units_at(saturation, step).items() if v > DEAD_UNITS_PCT[f]}

    step, hits = _persistent(saturation, flagged)
    limits = ", ".join(f"{_FAMILY_NAMES[f]} <= {v:g} %" for f, v in DEAD_UNITS_PCT.items())
    return _verdict(
        "warning", "dead units", hits, lambda v: v, limits,
        "units output 0 (their flat side) for every example: no gradient reaches their weights",
        "check the init and the bias before the layer (a large negative bias kills ReLUs); lower the learning rate; "
        "try a leaky variant",
        step,
    )  # fmt: skip


def _not_learning(update: UpdateRecord | None, grad_data: GradDataRecord | None) -> list[Verdict]:
    step, hits = _persistent(update, lambda s: _at(update, "update_zero", s))
    if not hits:
        return []
    latest = grad_data.last_step if grad_data is not None and grad_data.last_step is not None else -1
    no_grad = {n for n, v in _at(grad_data, "grad_std", latest).items() if v == 0}
    return _verdict(
        "warning", "not learning", hits, lambda v: 0.0, "changes at every step",
        "the weight has a gradient but never changes while the others do: left out of the optimizer, frozen, or "
        "its learning rate is 0" + (" (or its gradient is exactly 0)" if no_grad & set(hits) else ""),
        "pass every parameter to the optimizer (build it after the model is complete); check the parameter "
        "groups' learning rates",
        step,
    )  # fmt: skip


def _underflow(saturation: ActivationRecord | None) -> list[Verdict]:
    def flagged(step: int) -> dict[str, float]:
        tiny = fp16_tiny_at(saturation, step)
        return tiny if tiny and statistics.median(tiny.values()) > UNDERFLOW_PCT else {}

    step, hits = _persistent(saturation, flagged)
    return _verdict(
        "warning", "gradient underflow", {n: v for n, v in hits.items() if v > UNDERFLOW_PCT}, lambda v: v,
        f"fp16 gradients: median < {UNDERFLOW_PCT:g} % below fp16's normal range (6.1e-05)",
        "fp16 gradients are too small for fp16: they lose precision or flush to 0 (no loss scaling)",
        "use a GradScaler (Lightning's precision='16-mixed' has one), or bf16", step,
    )  # fmt: skip


def _median_over_weights(update: UpdateRecord | None, step: int, value: Callable[[str, float], float]) -> float | None:
    """The median over the weights of ``value(name, update:data)`` at ``step``, leaving out NaN."""
    updates = _at(update, "update_data_log10", step)
    values = [v for name, ud in updates.items() if not math.isnan(v := value(name, ud))]
    return statistics.median(values) if values else None


def _rates(update: UpdateRecord | None) -> dict[int, float]:
    return {} if update is None else dict(update.points("lr"))


def adam_shrink_at(update: UpdateRecord | None, grad_data: GradDataRecord | None, step: int) -> float | None:
    """The median over the weights of ``log10(lr / std(weight at init)) - update:data`` at ``step`` (see
    :data:`ADAM_SHRINK_HIGH`), under an Adam-family optimizer; None where it cannot be read."""
    if update is None or update.optimizer_family != "adam" or (lr := update.value("lr", step) or 0.0) <= 0:
        return None
    std0 = {} if grad_data is None else grad_data.init_std()
    return _median_over_weights(update, step, lambda n, ud: math.log10(lr / std0[n]) - ud if n in std0 else math.nan)


def sgd_fall_at(update: UpdateRecord | None, step: int) -> float | None:
    """The median over the weights of the fall of the update per unit of learning rate from the second logged
    step (the first after step 0, whose momentum is still empty) to ``step`` (see :data:`SGD_FALL`), under
    SGD; None where it cannot be read."""
    rates = _rates(update)
    lr = rates.get(step, 0.0)
    if update is None or update.optimizer_family != "sgd" or lr <= 0 or step == 0:
        return None
    second = {n: points[1] for n, points in update.first("update_data_log10", 2).items() if len(points) > 1}
    start = {n: ud - math.log10(rates[s]) for n, (s, ud) in second.items() if s <= step and rates.get(s, 0.0) > 0}
    return _median_over_weights(update, step, lambda n, ud: start.get(n, math.nan) + math.log10(lr) - ud)


def sgd_update_at(update: UpdateRecord | None, step: int) -> float | None:
    """The median over the weights of update:data at ``step`` (not the first), scaled back to the highest
    learning rate of the schedule so far (see :data:`SGD_LOW`), under SGD; None where it cannot be read or the
    gradients fell (see :data:`SGD_FALL`)."""
    fall = sgd_fall_at(update, step)
    if fall is None or fall > SGD_FALL:
        return None
    rates = _rates(update)
    top = max(v for s, v in rates.items() if s <= step)
    return _median_over_weights(update, step, lambda n, ud: ud + math.log10(top / rates[step]))


def flat_at(saturation: ActivationRecord | None, step: int) -> float | None:
    """The highest % of values in the flat region among the watched layers with a saturation rule."""
    values = _at(saturation, "act_saturated_pct", step)
    return max(values.values()) if values else None


def sgd_died_at(saturation: ActivationRecord | None, update: UpdateRecord | None, step: int) -> float | None:
    """The SGD fall at ``step`` where a layer is all flat there (a dead network); None otherwise."""
    fall, flat = sgd_fall_at(update, step), flat_at(saturation, _nearest_step(saturation, step))
    return fall if fall is not None and flat is not None and flat > FLAT_PCT else None


def _nearest_step(record: Record | None, step: int) -> int:
    """``record``'s latest logged step up to ``step`` (the meters log the same steps, at moments apart)."""
    return max((s for s in _steps(record) if s <= step), default=-1)


def _learning_rate(
    saturation: ActivationRecord | None,
    grad_data: GradDataRecord | None,
    update: UpdateRecord | None,
    optimizer: OptimizerRecord | None = None,
) -> list[Verdict]:
    """Adam family: too high, from the update shrink (needs GradDataRatio: the weights' std at init), else from the
    normalised step (needs OptimizerState). SGD: too low, from update:data at the schedule's highest rate; too
    high when the network died. Nothing else: the suites show no statistic here that tells the other cases apart
    (see docs/diagnosis.md)."""

    def high(step: int) -> dict[str, float]:
        shrink = adam_shrink_at(update, grad_data, step)
        return {"median of the weights": shrink} if shrink is not None and shrink > ADAM_SHRINK_HIGH else {}

    def low(step: int) -> dict[str, float]:
        ud = sgd_update_at(update, step)
        return {"median of the weights": ud} if ud is not None and ud < SGD_LOW else {}

    step, hits = _persistent(update, high)
    if hits:
        shrink = hits["median of the weights"]
        return _verdict(
            "warning", "learning rate too high", hits, lambda v: v, f"Adam: update shrink < {ADAM_SHRINK_HIGH:g}",
            f"the updates are {10**shrink:.0f}x smaller than the learning rate relative to the weights' initial "
            "scale: the steps mostly cancel, or the weights grew",
            f"divide the learning rate by about {10 ** (shrink - ADAM_SHRINK_OK):.2g}", step,
        )  # fmt: skip

    def noisy(step: int, line: float = ADAM_STEP_LOW) -> dict[str, float]:
        rms = adam_step_at(optimizer, step)
        return {"median of the weights": rms} if rms is not None and rms < line else {}

    step, hits = _persistent(optimizer, noisy, lambda s: noisy(s, ADAM_STEP_AT_ONCE))
    if hits:
        rms = hits["median of the weights"]
        return _verdict(
            "warning", "learning rate too high", hits, lambda v: -v, f"Adam: normalised step RMS > {ADAM_STEP_LOW:g}",
            f"Adam's normalised step m/(sqrt(v)+eps) has an RMS of {rms:.2g}: each weight's gradient keeps flipping "
            "sign from step to step, so the steps mostly cancel: typical of steps too large",
            "divide the learning rate by about 3 to 10 (this signal does not say by how much), or add a warm-up",
            step,
        )  # fmt: skip

    def died(step: int) -> dict[str, float]:
        fall = sgd_died_at(saturation, update, step)
        return {"median of the weights": fall} if fall is not None and fall > SGD_FALL else {}

    step, hits = _persistent(update, died)
    if hits:
        fall = hits["median of the weights"]
        return _verdict(
            "warning", "learning rate too high", hits, lambda v: v,
            f"SGD: the update per unit of learning rate falls < {SGD_FALL:g} decades",
            f"the network died: its updates per unit of learning rate fell {fall:.1f} decades since the first step "
            f"and a layer sits all in its flat region, passing no gradient: typical of steps too large",
            "divide the learning rate by about 10 (a dead network does not tell by how much) and train again", step,
        )  # fmt: skip
    step, hits = _persistent(update, low)
    if hits:
        ud = hits["median of the weights"]
        return _verdict(
            "warning", "learning rate too low", hits, lambda v: -v, f"SGD: update:data > {SGD_LOW:g}",
            "the updates are tiny next to the weights: the network barely learns",
            f"multiply the learning rate by about {10 ** (SGD_OK - ud):.2g}", step,
        )  # fmt: skip
    return []


def learning_rate_note(
    update: UpdateRecord | None, grad_data: GradDataRecord | None, optimizer: OptimizerRecord | None = None
) -> str | None:
    """What the learning-rate check read at the latest step, and what it does not judge: said even when it finds
    nothing, so that a run at a good rate reads so."""
    steps = _steps(update)
    if not steps:
        return None
    step, family = steps[-1], update.optimizer_family  # type: ignore[union-attr]
    if family == "adam":
        shrink = adam_shrink_at(update, grad_data, step)
        read = "unread (needs GradDataRatio)" if shrink is None else f"{shrink:.2f} at step {step}"
        rms = adam_step_at(optimizer, _nearest_step(optimizer, step))
        noise = "" if rms is None else f"; normalised step RMS {rms:.2g}, too high below {ADAM_STEP_LOW:g}"
        return (f"learning rate (Adam): update shrink {read}, too high above {ADAM_SHRINK_HIGH:g}{noise}; "
                "too low is not judged under Adam")  # fmt: skip
    if family == "sgd":
        ud = sgd_update_at(update, step)
        read = "unread" if ud is None else f"{ud:.2f} at step {step}"
        return (f"learning rate (SGD): update:data at the schedule's top rate {read}, too low below {SGD_LOW:g}; "
                "too high is named only when the network dies")  # fmt: skip
    return "learning rate: not judged for this optimizer (the checks are calibrated for SGD and Adam)"


# --- instability: attention and output logits, Adam's state -----------------------------------------------


def attention_logits_at(logits: LogitRecord | None, step: int) -> dict[str, float]:
    """name -> the largest pre-softmax logit of each watched attention at ``step`` (inf where it was not finite:
    overflowed, or NaN)."""
    return {**_at(logits, "attn_logit_max", step), **dict.fromkeys(_at(logits, "attn_logit_nonfinite", step), math.inf)}


def has_warmup(update: UpdateRecord | None) -> bool:
    """Whether the learning rate rose after step 0 (a warm-up), as far as the logged rates tell."""
    rates = list(_rates(update).values())
    return len(rates) > 1 and rates[0] < 0.5 * max(rates)


def attention_entropy_at(logits: LogitRecord | None, step: int) -> tuple[float, float] | None:
    """The median over the attentions of their softmax's mean normalised entropy at ``step``, and the same at the
    first logged step (see :data:`ATTN_ENTROPY_LOW`); None where it was not read."""
    now = _at(logits, "attn_entropy", step)
    if logits is None or not now:
        return None
    first = [points[0][1] for points in logits.first("attn_entropy", 1).values() if points]
    return statistics.median(now.values()), statistics.median(first)


def fallen_entropy_at(logits: LogitRecord | None, step: int) -> float | None:
    """The median over the attentions of their mean normalised entropy at ``step`` where it has fallen below
    :data:`ATTN_ENTROPY_FALL` times its first logged value; None elsewhere (or where it was not read)."""
    found = attention_entropy_at(logits, step)
    return found[0] if found is not None and found[0] < ATTN_ENTROPY_FALL * found[1] else None


def collapsed_attentions_at(logits: LogitRecord | None, step: int) -> dict[str, float]:
    """name -> the mean normalised entropy of each attention below :data:`ATTN_ENTROPY_LOW` at ``step``, where the
    median over the attentions has fallen (:func:`fallen_entropy_at`) below it (most softmaxes have collapsed
    toward one-hot); empty elsewhere."""
    median = fallen_entropy_at(logits, step)
    if median is None or median >= ATTN_ENTROPY_LOW:
        return {}
    return {name: v for name, v in _at(logits, "attn_entropy", step).items() if v < ATTN_ENTROPY_LOW}


def _attention_growth(logits: LogitRecord | None, update: UpdateRecord | None, fp16: bool) -> list[Verdict]:
    def highest(step: int, line: float = ATTN_LOGIT_HIGH) -> dict[str, float]:
        top = max(attention_logits_at(logits, step).values(), default=0.0)
        return {"largest of the attentions": top} if top > line else {}

    def collapsed(step: int) -> dict[str, float]:
        return {"median of the attentions": 0.0} if collapsed_attentions_at(logits, step) else {}

    # Either must hold over the steps (the attention that holds it may change); named: those that break it now.
    step, high = _persistent(logits, highest, lambda s: highest(s, ATTN_LOGIT_AT_ONCE))
    _, low = _persistent(logits, collapsed)
    if not (high or low) or logits is None or step is None:
        return []
    fixes = ["lower the learning rate"]
    if not has_warmup(update):
        fixes.append("add a warm-up")
    if high:
        hits = {n: v for n, v in attention_logits_at(logits, step).items() if v > ATTN_LOGIT_HIGH}
        worst = max(hits, key=hits.__getitem__)
        init = logits.at_init("attn_logit_max").get(worst)
        healthy, badness = f"largest attention logit < {ATTN_LOGIT_HIGH:g}", float.__pos__
        since = f" ({init:.2g} at init)" if init is not None else ""
        found = f"the largest pre-softmax logit in {worst} is {hits[worst]:.3g} at step {step}{since}: its softmax is "
        found += "close to one-hot and passes little gradient"
    else:
        hits = collapsed_attentions_at(logits, step)
        median, first = attention_entropy_at(logits, step) or (math.nan, math.nan)
        worst = min(hits, key=hits.__getitem__)
        healthy = f"entropy > {ATTN_ENTROPY_LOW:g} (or above {ATTN_ENTROPY_FALL:g}x its first) in half the attentions"
        badness = float.__neg__
        found = "the softmaxes are close to one-hot and pass little gradient: the median over the attentions of "
        found += f"their mean normalised entropy (1 uniform, 0 one-hot) is {median:.2f} at step {step} ({first:.2f} "
        found += f"at first), {hits[worst]:.2f} in {worst} (their logits grew apart)"
    if not set(hits) <= logits.qk_norm:
        fixes.append("normalise q and k (qk-layernorm)")
    overflow = " (in fp16, logits above 65504 overflow to inf)" if fp16 else ""
    return _verdict(
        "warning", "attention logits growing", hits, badness, healthy,
        f"{found}; runs like this end worse or diverge{overflow}. Typical of a learning rate too high for the model",
        ", ".join(fixes[:-1]) + f" or {fixes[-1]}" if len(fixes) > 1 else fixes[0], step,
    )  # fmt: skip


def adam_step_at(optimizer: OptimizerRecord | None, step: int) -> float | None:
    """The median over the weights of the RMS of Adam's normalised step at ``step`` (after step 0, whose step is
    1 for every element), see :data:`ADAM_STEP_LOW`; None where it was not read."""
    values = _at(optimizer, "adam_step_rms", step)
    return statistics.median(values.values()) if values and step > 0 else None


def adam_eps_at(optimizer: OptimizerRecord | None, step: int) -> dict[str, float]:
    """name -> % of the weight's elements where Adam's eps exceeds sqrt(v_hat), at ``step``."""
    return _at(optimizer, "adam_eps_pct", step)


def _adam_eps(optimizer: OptimizerRecord | None) -> list[Verdict]:
    def flagged(step: int) -> dict[str, float]:
        pct = adam_eps_at(optimizer, step)
        return (
            {n: v for n, v in pct.items() if v > ADAM_EPS_PCT}
            if pct and statistics.median(pct.values()) > ADAM_EPS_PCT
            else {}
        )

    step, hits = _persistent(optimizer, flagged)
    eps = None if optimizer is None else optimizer.eps
    return _verdict(
        "warning", "Adam epsilon dominating", hits, lambda v: v,
        f"Adam: median over the weights < {ADAM_EPS_PCT:g} % of elements with sqrt(v) < eps",
        f"in most elements the gradient's RMS is below Adam's eps ({eps:g}): eps, not the gradient, sets the step, "
        "so Adam moves them like a slow SGD" if eps is not None else "eps, not the gradient, sets the step",
        "lower eps (the default is 1e-8), or scale the loss up", step,
    )  # fmt: skip


def _fp16(saturation: ActivationRecord | None) -> bool:
    """Whether gradients were computed in fp16 (only then are the fp16 counts logged)."""
    return saturation is not None and bool(saturation.names("act_grad_fp16_tiny_pct"))


def logit_notes(logits: LogitRecord | None) -> list[str]:
    """What the attention check read at the latest step, said even when it finds nothing; the output's logits (not
    judged: the suites hold no run where they drift); and the attentions it could not watch."""
    steps = _steps(logits)
    if logits is None:
        return []
    notes = []
    if steps and (found := attention_logits_at(logits, steps[-1])):
        worst = max(found, key=found.__getitem__)
        notes.append(f"attention logits: largest {found[worst]:.3g} ({worst}) at step {steps[-1]}, too high above "
                     f"{ATTN_LOGIT_HIGH:g}")  # fmt: skip
    if steps and (found_entropy := attention_entropy_at(logits, steps[-1])):
        entropies = _at(logits, "attn_entropy", steps[-1])
        low = min(entropies, key=entropies.__getitem__)
        line = f"attention entropy: median over the attentions {found_entropy[0]:.2f} at step {steps[-1]} "
        line += f"({found_entropy[1]:.2f} at first), smallest {entropies[low]:.2f} ({low}); collapsed where the median "
        line += f"is below {ATTN_ENTROPY_LOW:g} and {ATTN_ENTROPY_FALL:g}x its first"
        notes.append(line)
    out = logits.output
    log_z, top = (
        (_at(logits, m, steps[-1]).get(out or "") for m in ("output_logz", "output_logit_max"))
        if steps
        else (None, None)
    )
    if log_z is not None and top is not None:
        init = logits.at_init("output_logz").get(out or "")
        since = "" if init is None else f" ({init:.3g} at init)"
        notes.append(f"output logits: mean log Z {log_z:.3g}{since}, largest {top:.3g} at step {steps[-1]}, not judged")
    if logits.unwatched:
        notes.append(
            f"attention not watched in {', '.join(sorted(logits.unwatched))}: it runs in a kernel netdiag cannot see "
            "(flash-attn, xformers, a custom op), so the attention check says nothing about it"
        )
    return notes


# --- the flight recorder's events ----------------------------------------------------------------------

_EVENT_ADVICE = {
    "spike": "look at the first weights named, at that step: lower their learning rate (a parameter group of their "
             "own) or the rate overall, clip gradients, check the batch of that step; the full measurement of the "
             "next step is in the other checks",
    "non-finite": "the module or weights named first went first: look for a log(0), a division by zero or an "
                  "overflow there (fp16 without a loss scaler); lower the learning rate, clip gradients",
    "exception": "the last steps before the end are in the logs (netdiag plots draws them); the weights named were "
                 "out of their band when it ended",
    "calm end": "the last steps before the end are in the logs; no watched series was out of its band when it "
                "ended, so the error, not the training's numbers, is where to look",
    "unread": "the error left the device unreadable (on a GPU, a CUDA error: run again with CUDA_LAUNCH_BLOCKING=1 "
              "to see which kernel failed); the steps kept end at the last save of the window (save_interval)",
    "stopped": "the last steps before the stop are in the logs (netdiag plots draws them); the weights named were "
                 "out of their band when it was stopped",
}  # fmt: skip


def _flight(flight: FlightRecord | None) -> list[Verdict]:
    """One verdict per event of the flight recorder: the step, and where it began (the module whose forward made the
    non-finite values, where the step was replayed; the series that left their band first). A spike is a warning, a
    non-finite loss or gradient fatal; the end by an exception is said as it was. A run stopped from outside (Ctrl-C,
    SIGTERM) is no fault: a warning where a series was out of its band then, else only a note. Only the events up to the
    record's latest step (as the report replays a run)."""
    if flight is None or flight.last_step is None:
        return []
    last, out = flight.last_step, []
    # replayed: those so far; an error that left the device unreadable comes after the last steps that could be kept
    for event in [e for e in flight.events if e["step"] <= last or e.get("unread")]:
        cause = event["cause"]
        kind = "exception" if cause == "exception" else "non-finite" if "non-finite" in cause else "spike"
        began = event.get("began") or []
        names = spikes.named(event)
        stopped = spikes.stopped(event)
        if stopped and not names:
            continue  # said in the notes
        # the value that broke the band: the total gradient norm, a weight's score, else the loss
        value = {"gradient spike": event.get("grad_total"), "weight spike": began[0]["score"] if began else None}.get(
            cause, event.get("loss")
        )
        healthy = (
            "training runs to its end" if kind == "exception" else f"loss and total gradient norm within "
            f"{spikes.SPIKE:g} spreads of their median over the last {spikes.BAND} steps, each weight's update "
            f"and norm within {spikes.WEIGHT_SPIKE:g}"
        )  # fmt: skip
        check = "run stopped" if stopped else "run ended by an exception" if kind == "exception" else cause
        out.append(Verdict(
            "warning" if kind == "spike" or stopped else "fatal", check,
            ", ".join(names[:WORST]) + (f" and {len(names) - WORST} more" if len(names) > WORST else ""),
            float(value) if value is not None else math.nan, healthy, spikes.event_text(event),
            _EVENT_ADVICE[
                "unread" if event.get("unread") else "stopped" if stopped
                else "calm end" if kind == "exception" and not names else kind
            ],
            len(names), tuple((b["name"], float(b["score"])) for b in began[:WORST]), event["step"],
        ))  # fmt: skip
    return out


def flight_notes(flight: FlightRecord | None) -> list[str]:
    """What the flight recorder kept, said even when it saw no event."""
    if flight is None or not flight.steps:
        return []
    events = len(flight.events)
    stops = [spikes.event_text(e) for e in flight.events if spikes.stopped(e) and not spikes.named(e)]
    return [f"flight recorder: {len(flight.steps)} steps kept (every step, the last {flight.window} before each "
            f"event and the end), {events} event{'s' if events != 1 else ''}", *stops]  # fmt: skip


def evaluate(
    saturation: ActivationRecord | None = None,
    grad_data: GradDataRecord | None = None,
    update: UpdateRecord | None = None,
    logits: LogitRecord | None = None,
    optimizer: OptimizerRecord | None = None,
    flight: FlightRecord | None = None,
) -> list[Verdict]:
    """Every broken rule at the latest step recorded, fatal ones first (None for a record not made); the flight
    recorder's events so far."""
    verdicts = [
        *_flight(flight),
        *_nonfinite(saturation, grad_data),
        *_overconfident(saturation),
        *_saturation(saturation),
        *_dead_layers(saturation),
        *_gradient_flow(saturation),
        *_dead_units(saturation),
        *_not_learning(update, grad_data),
        *_underflow(saturation),
        *_attention_growth(logits, update, _fp16(saturation)),
        *_adam_eps(optimizer),
    ]
    if not any(v.step == 0 for v in verdicts):  # a fault at init explains small updates better than the rate
        verdicts += _learning_rate(saturation, grad_data, update, optimizer)
    return sorted(verdicts, key=lambda v: v.severity != "fatal")


# --- the summary: what a run's report says -------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    """A run's health report: every rule that broke (those that hold at the end first, fatal ones first, then
    those that held during training and cleared), what the report read where it found nothing (``notes``), and
    the latest step recorded."""

    verdicts: list[Verdict]
    notes: list[str]
    step: int | None

    def table(self) -> str:
        return format_table(self.verdicts, self.step, self.notes)

    def markdown(self) -> str:
        return format_markdown(self.verdicts, self.step, self.notes)


def replay(**records: Record | None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Every step recorded, in order, with the records as they were at it (what had been recorded up to it):
    ``(step, {kind: record or None})``, to judge each step as while training ran. Live or read from logs, the
    same records replay alike. The records given are not changed; the ones yielded grow as it goes (the rules
    read the latest points of each series, so each step is judged in time independent of the run's length)."""
    full = records
    partial = {kind: None if record is None else record.empty() for kind, record in full.items()}
    by_step: dict[int, dict[str, dict[Key, float]]] = {}
    for kind, record in full.items():
        if record is not None:
            for key, points in record.series.items():
                for step, value in points:
                    by_step.setdefault(step, {}).setdefault(kind, {})[key] = value
    for step in sorted(by_step):
        for kind, scalars in by_step[step].items():
            partial[kind].add(step, scalars, {})  # type: ignore[union-attr]
        yield step, partial


def summarize(
    saturation: ActivationRecord | None = None,
    grad_data: GradDataRecord | None = None,
    update: UpdateRecord | None = None,
    logits: LogitRecord | None = None,
    optimizer: OptimizerRecord | None = None,
    flight: FlightRecord | None = None,
    notes: Iterable[str] = (),
) -> Report:
    """The report of a run, from its records: the one summary that every front end and ``netdiag report``
    print. Each verdict says since when it holds; a rule that broke during training and holds no longer
    stays in it, marked cleared, with the steps where it held (its last verdict then). ``notes``: what the
    caller knows besides the records (what a run's logs did not say), printed after the report's own."""
    # rule -> (the first and the last step of its latest run of steps, its verdict at the last)
    spans: dict[tuple[str, str], tuple[int, int, Verdict]] = {}
    previous: int | None = None
    records: dict[str, Any] = {"saturation": saturation, "grad_data": grad_data, "update": update,
                               "logits": logits, "optimizer": optimizer}  # fmt: skip
    for step, partial in replay(**records):  # the flight recorder's events are facts: they are not replayed
        for v in evaluate(**partial):
            rule = (v.check, v.healthy)
            first, last, _ = spans.get(rule, (step, None, v))
            spans[rule] = (first if last == previous else step, step, v)
        previous = step
    final = evaluate(**records)
    now = {(v.check, v.healthy) for v in final}
    verdicts = [*_flight(flight), *(replace(v, since=spans.get((v.check, v.healthy), (v.step,))[0]) for v in final)]
    verdicts.sort(key=lambda v: v.severity != "fatal")
    verdicts += [
        replace(v, step=last, since=first, cleared=True) for rule, (first, last, v) in spans.items() if rule not in now
    ]
    present = [r for r in (*records.values(), flight) if r is not None]
    last = max((r.last_step for r in present if r.last_step is not None), default=None)
    return Report(verdicts, [*_notes(records, verdicts), *flight_notes(flight), *notes], last)


def _notes(records: Mapping[str, Any], verdicts: list[Verdict]) -> list[str]:
    """What the report read where it found nothing, and what it could not read."""
    grad_data, update, logits = records["grad_data"], records["update"], records["logits"]
    present = [r for r in records.values() if r is not None]
    notes = []
    note = learning_rate_note(update, grad_data, records["optimizer"])
    notes += [*([] if note is None else [note]), *logit_notes(logits)]
    if any(v.step not in (0, None) for v in verdicts):
        every = next((r.every_n_steps for r in present if r.every_n_steps), None)
        window = f" (measured every {every} steps: over {every * (PERSIST - 1)} steps)" if every else ""
        notes.append(
            f"a rule during training counts once it holds at {PERSIST} logging steps in a row{window}, or at once "
            "where its signal is far past its line"
        )
    undescribed = [r.kind for r in present if not r.described]
    if undescribed:
        notes.append(
            f"note: these logs hold no description of {', '.join(undescribed)} (written by netdiag >= 0.1.0), so "
            "the rules that depend on a layer's activation kind or on the optimizer stay silent."
        )
    return notes


# --- formatting -----------------------------------------------------------------------------------------


def _value(v: Verdict) -> str:
    return f"{v.value:.4g}" if math.isfinite(v.value) else str(v.value)


def _layers(v: Verdict) -> str:
    # "-": no layer named (a run that ended by an exception with every series in its band)
    return "-" if not v.hits else v.layer if v.hits == 1 else f"{v.hits} layers: {v.layer}"


def format_table(verdicts: list[Verdict], step: int | None = None, notes: Iterable[str] = ()) -> str:
    """A plain-text table: one row per verdict, its cause and advice on the lines below; ``notes`` after it."""
    title = "netdiag health report" + (f" at step {step}" if step is not None else "")
    after = "".join(f"\n{note}" for note in notes)
    if not verdicts:
        return f"{title}: every check within its healthy range{after}"
    rows = [("", "check", "layer", "value", "healthy", "steps")]
    rows += [(v.severity.upper(), v.check, _layers(v), _value(v), v.healthy, v.steps) for v in verdicts]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [title]
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i:
            v = verdicts[i - 1]
            lines += [f"{'':{widths[0]}}  cause: {v.cause}", f"{'':{widths[0]}}  try:   {v.advice}"]
    return "\n".join(lines) + after


COLUMNS = ["severity", "check", "layers", "worst", "value", "healthy", "steps", "likely cause", "try"]


def as_table(verdicts: list[Verdict]) -> tuple[list[str], list[list[Any]]]:
    """Column names and one row per verdict (W&B's table)."""
    return COLUMNS, [
        [v.severity, v.check, v.hits, v.layer, v.value, v.healthy, v.steps, v.cause, v.advice] for v in verdicts
    ]


def format_markdown(verdicts: list[Verdict], step: int | None = None, notes: Iterable[str] = ()) -> str:
    """The same report as a markdown table (TensorBoard's text tab renders it)."""
    after = "".join(f"\n\n{note}" for note in notes)
    if not verdicts:
        return format_table(verdicts, step) + after
    head = f"| {' | '.join(COLUMNS)} |\n|{'---|' * len(COLUMNS)}\n"
    body = ""
    for v, row in zip(verdicts, as_table(verdicts)[1], strict=True):
        row[COLUMNS.index("value")] = _value(v)  # rounded for reading
        body += f"| {' | '.join(map(str, row))} |\n"
    return f"**netdiag health report{f' at step {step}' if step is not None else ''}**\n\n{head}{body}{after}"


def checks(verdicts: Iterable[Verdict]) -> list[str]:
    """The checks of ``verdicts``, each once, in order; ``(cleared)`` after one that held only during training."""
    return list(dict.fromkeys(v.check + (" (cleared)" if v.cleared else "") for v in verdicts))
