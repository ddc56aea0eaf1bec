"""Every registered rule, by construction: a healthy and a faulty synthetic record for each, the rule silent on one
and naming the other, alone and through the registry; its signal (what the diagnosis suite's scorer reads) on the
same side of its line as its verdict. A rule added without its cases fails here. Whether the rules are *right* is
shown on real training runs with a known outcome (tests/test_diagnosis.py)."""

import math
import re
from dataclasses import replace
from pathlib import Path

import pytest

from lightning_netdiag import report
from lightning_netdiag.record import KINDS
from lightning_netdiag.rules import BY_ID, RULES, Rule, evaluate
from lightning_netdiag.rules.base import Records

STEPS = (0, 50, 100, 150)


def record(kind: str, points: dict[int, dict[tuple[str, str], float]], **description):
    """A record of ``kind`` holding ``points`` (step -> {(metric, name): value}) and ``description``'s fields."""
    out = KINDS[kind](every_n_steps=50, **description)
    for step in sorted(points):
        out.add(step, points[step], {})
    return out


def steady(values: dict[tuple[str, str], float], steps=STEPS, first: dict | None = None):
    """The same values at every step; ``first`` at step 0 instead, where given."""
    return {s: (first if first is not None and s == 0 else values) for s in steps}


def activations(values, family: str = "tanh", **kw) -> Records:
    points = steady(values, **kw)
    names = {name for step in points.values() for (_, name) in step if name}
    return {"saturation": record("saturation", points, layer_families=dict.fromkeys(names, family))}


def one_metric(kind: str, metric: str, value: float, **description) -> Records:
    return {kind: record(kind, steady({(metric, "w"): value}), **description)}


def adam(shrink: float) -> Records:
    """Weights of std 0.02 at init under Adam at a rate of 1e-3, whose update shrinks by ``shrink`` decades."""
    grad_data = record("grad_data", {0: {("grad_std", "w"): 2e-4, ("grad_data_ratio", "w"): 1e-2}})
    ud = math.log10(1e-3 / 0.02)
    points = {s: {("update_data_log10", "w"): ud - (0.0 if s == 0 else shrink), ("lr", ""): 1e-3} for s in STEPS}
    return {"grad_data": grad_data, "update": record("update", points, optimizer_family="adam")}


def sgd(points: list[tuple[int, float, float]], flat: float | None = None) -> Records:
    """SGD's update:data ``(step, lr, ud)``; a tanh layer ``flat`` % in its flat region at each step after step 0
    (20 % there: not saturated at init)."""
    out = {"update": record("update", {s: {("update_data_log10", "w"): ud, ("lr", ""): lr} for s, lr, ud in points},
                            optimizer_family="sgd")}  # fmt: skip
    if flat is not None:
        steps, key = [s for s, _, _ in points], ("act_saturated_pct", "a")
        out.update(activations({key: flat}, steps=steps, first={key: 20.0}))
    return out


def saturated(family: str, pct: float) -> Records:
    return activations({("act_saturated_pct", "a"): pct}, family, steps=(0,))


def losses(rise: float, steps=STEPS) -> Records:
    """SaturationMonitor's median loss of each logging step's window: 2.3 at step 0, ``2.3 * rise`` after it."""
    key = ("loss_median", "")
    return {"saturation": record("saturation", steady({key: 2.3 * rise}, steps=steps, first={key: 2.3}))}


def entropy(now: float) -> Records:
    points = steady({("attn_entropy", "h.0.attn"): now}, first={("attn_entropy", "h.0.attn"): 0.9})
    return {"logits": record("logits", points)}


#: rule id -> (healthy records, faulty records)
CASES: dict[str, tuple[Records, Records]] = {
    "nonfinite.act_nonfinite": (activations({("act_nonfinite", "a"): 0.0}), activations({("act_nonfinite", "a"): 3.0})),
    "nonfinite.act_grad_nonfinite": (
        activations({("act_grad_nonfinite", "a"): 0.0}),
        activations({("act_grad_nonfinite", "a"): 2.0}),
    ),
    "nonfinite.grad_nonfinite": (
        one_metric("grad_data", "grad_nonfinite", 0.0),
        one_metric("grad_data", "grad_nonfinite", 9.0),
    ),
    "init.overconfident": tuple(  # type: ignore[dict-item]
        activations(
            {("init_output_ce", "head"): ce, ("init_output_classes", "head"): 27.0, ("init_loss", ""): 27.9}, steps=(0,)
        )  # fmt: skip
        for ce in (3.31, 25.4)
    ),
    **{
        f"init.saturation.{family}": (saturated(family, line / 2), saturated(family, min(line + 5, 100)))
        for family, line in (("tanh", 40), ("sigmoid", 25), ("relu", 90), ("gelu", 10))
    },
    "init.dead_layer": (activations({("act_std", "a"): 0.5}), activations({("act_std", "a"): 0.01})),
    "init.vanishing_gradient": (
        activations({("act_grad_std", "a"): 1e-3, ("act_grad_std", "b"): 2e-3}),
        activations({("act_grad_std", "a"): 1e-5, ("act_grad_std", "b"): 1e-3}),
    ),
    "init.exploding_gradient": (
        activations({("act_grad_std", "a"): 2e-3, ("act_grad_std", "b"): 1e-3}),
        activations({("act_grad_std", "a"): 1.0, ("act_grad_std", "b"): 1e-2}),
    ),
    "training.dead_units": (
        activations({("act_dead_pct", "r"): 3.0}, "relu"),
        activations({("act_dead_pct", "r"): 60.0}, "relu"),
    ),
    "training.not_learning": (
        one_metric("update", "update_data_log10", -3.0),
        {"update": record("update", steady({("update_zero", "head"): 1.0, ("update_data_log10", "w"): -3.0}))},
    ),
    "training.loss_diverged": (losses(0.6), losses(30.0)),
    "training.underflow": (
        activations({("act_grad_fp16_tiny_pct", "a"): 1.0}),
        activations({("act_grad_fp16_tiny_pct", "a"): 30.0}),
    ),
    "instability.attention_logits": (
        one_metric("logits", "attn_logit_max", 20.0),
        one_metric("logits", "attn_logit_max", 500.0),
    ),
    "instability.attention_entropy": (entropy(0.8), entropy(0.05)),
    "instability.adam_eps": (
        one_metric("optimizer", "adam_eps_pct", 0.0, eps=1e-8),
        one_metric("optimizer", "adam_eps_pct", 80.0, eps=1e-8),
    ),
    "lr.adam_shrink": (adam(1.6), adam(2.5)),
    "lr.adam_step": (
        {"optimizer": record("optimizer", steady({("adam_step_rms", "w"): 0.2}, first={("adam_step_rms", "w"): 1.0}))},
        {"optimizer": record("optimizer", steady({("adam_step_rms", "w"): 0.03}, first={("adam_step_rms", "w"): 1.0}))},
    ),
    "lr.sgd_died": (
        sgd([(0, 3.0, -2.0), (50, 3.0, -1.0), (100, 3.0, -1.2), (150, 3.0, -1.1), (200, 3.0, -1.3)], flat=100.0),
        sgd([(0, 3.0, -2.0), (50, 3.0, -1.0), (100, 3.0, -4.0), (150, 3.0, -5.0), (200, 3.0, -4.5)], flat=100.0),
    ),
    "lr.sgd_low": (
        sgd([(s, 0.1, -2.5) for s in STEPS]),
        sgd([(s, 0.003, -4.3) for s in STEPS]),
    ),
}

#: rule id -> records where its signal is past its ``at_once`` line at the second logging step (step 50) only
AT_ONCE: dict[str, Records] = {
    "training.loss_diverged": losses(500.0, steps=(0, 50)),
    "instability.attention_logits": {"logits": record("logits", {s: {("attn_logit_max", "w"): 3e3} for s in (0, 50)})},
    "lr.adam_step": {
        "optimizer": record("optimizer", {0: {("adam_step_rms", "w"): 1.0}, 50: {("adam_step_rms", "w"): 0.01}})
    },
}


def test_every_registered_rule_has_its_cases():
    assert set(CASES) == set(BY_ID), "a rule needs a healthy and a faulty case here"
    assert set(AT_ONCE) == {r.id for r in RULES if r.at_once is not None}


def _judged(rule: Rule, records: Records) -> int:
    """The step the rule judges: 0 for a rule at init, else its record's latest."""
    return 0 if rule.when == "init" else records[rule.reads[0]].last_step


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.id)
def test_each_rule_is_silent_on_its_healthy_case_and_names_its_faulty_one(rule):
    healthy, faulty = CASES[rule.id]
    assert rule.judge(healthy) == [] and evaluate(**healthy) == []
    (v,) = rule.judge(faulty)
    assert (v.rule, v.check, v.severity, v.step) == (rule.id, rule.check, rule.severity, _judged(rule, faulty))
    assert v.hits >= 1 and v.layer and v.healthy and v.cause and v.advice
    assert rule.id in {x.rule for x in evaluate(**faulty)}  # through the registry: nothing before it silences it
    if rule.signal is not None:  # the scorer's signal is on the side of the line that the verdict says
        assert rule.past(rule.signal(faulty, _judged(rule, faulty)), rule.line)
        signal = rule.signal(healthy, _judged(rule, healthy))
        assert signal is None or not rule.past(signal, rule.line)
    assert rule.check in report.format_table([v])
    assert f"| {rule.severity} | {rule.check} |" in report.format_markdown([v])


@pytest.mark.parametrize("rule_id", sorted(AT_ONCE))
def test_a_signal_past_its_at_once_line_is_named_at_the_first_logging_step_it_is_seen(rule_id):
    rule = BY_ID[rule_id]
    (v,) = rule.judge(AT_ONCE[rule_id])
    assert (v.rule, v.step) == (rule_id, 50)
    assert replace(rule, at_once=None).judge(AT_ONCE[rule_id]) == []  # held: two logging steps are not enough


def test_a_training_rule_must_hold_at_persist_logging_steps():
    rule = BY_ID["training.dead_units"]
    _, faulty = CASES["training.dead_units"]
    two = {"saturation": record("saturation", {s: {("act_dead_pct", "r"): 60.0} for s in (0, 50)},
                                layer_families={"r": "relu"})}  # fmt: skip
    assert rule.judge(two) == [] and len(rule.judge(faulty)) == 1


def test_learning_rate_rules_yield_to_a_fault_at_init_and_to_each_other():
    _, slow = CASES["lr.sgd_low"]
    _, saturated_at_init = CASES["init.saturation.tanh"]
    assert {v.rule for v in evaluate(**slow)} == {"lr.sgd_low"}
    both = {**slow, "saturation": saturated_at_init["saturation"]}
    assert {v.rule for v in evaluate(**both)} == {"init.saturation.tanh"}  # a fault at init explains small updates
    assert all(BY_ID[y].check.startswith("learning rate") for r in RULES if r.id.startswith("lr.")
               for y in r.yields_to if y in BY_ID)  # fmt: skip


def test_a_rule_declared_wrong_is_refused():
    with pytest.raises(ValueError, match="`when`"):
        Rule(id="x", check="x", reads=("update",), when="later", line=0, above=True, healthy="", cause="",  # type: ignore[arg-type]
             advice="", flag=lambda records, step, line: {})  # fmt: skip
    with pytest.raises(ValueError, match="`signal` or a `flag`"):
        Rule(id="x", check="x", reads=("update",), when="now", line=0, above=True, healthy="", cause="", advice="")


def test_each_rule_points_to_where_its_calibration_is_told():
    docs = (Path(__file__).parents[1] / "docs" / "diagnosis.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
               for line in docs.splitlines() if line.startswith("#")}  # fmt: skip
    assert {rule.section for rule in RULES} <= anchors
