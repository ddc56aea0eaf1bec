"""The health report on real training runs with a known outcome: the diagnosis suite's quick subset
(benchmarks/diagnosis), the instability suite's among them. Healthy recipes get no warning at all; each injected
fault is named by its own check."""

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("sklearn")  # the digits data
pytest.importorskip("transformers")
pytest.importorskip("timm")
SUITE = Path(__file__).parents[1] / "benchmarks" / "diagnosis"
sys.path.insert(0, str(SUITE))
import score  # noqa: E402
from suite import HEALTHY  # noqa: E402

FLIGHT_RIGHT = "Flight runs right (step within one, layer first where injected, the cause said): 4 of 4."


def run_quick(tmp_path_factory, front: str):
    out = tmp_path_factory.mktemp("suite") / "quick.json"
    done = subprocess.run(
        [sys.executable, str(SUITE / "score.py"), "--quick", "--front", front, "--json", str(out)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())["rows"], done.stdout


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return run_quick(tmp_path_factory, "lightning")


@pytest.mark.slow
def test_quick_suite_healthy_runs_get_no_warning_and_each_fault_its_own_check(quick):
    rows, printed = quick
    wrong = [(r["name"], r["wrong"]) for r in rows if not r["ok"]]
    assert not wrong, printed
    healthy = [r for r in rows if r["expect"] == HEALTHY]
    faults = {r["expect"] for r in rows if r["expect"] != HEALTHY and not r["fault"]}
    assert len(healthy) >= 4 and all(not r["warned"] and not r["final"] for r in healthy)
    assert faults >= {"over-confident output", "saturation", "vanishing gradient", "exploding gradient", "dead units",
                      "not learning", "gradient underflow", "non-finite", "learning rate too high",
                      "learning rate too low", "attention logits growing", "loss diverged"}  # fmt: skip
    faulty = len(rows) - len(healthy) - len(flights := [r for r in rows if r["fault"]])
    assert f"Faults named by their own check: {faulty} of {faulty}. Healthy runs with any warning: 0 of" in printed
    # the flight recorder: a layer's rate or weight jumping, garbage labels, a division by zero in one block (named
    # by the replay of its forward); each named at its step (and layer)
    assert len(flights) == 4 and FLIGHT_RIGHT in printed


@pytest.mark.slow
def test_quick_suite_rescored_from_its_histories_gives_the_same_verdicts(quick):
    rows, _ = quick
    for row in rows:
        warned, final = score.replay(row)
        assert warned == row["warned"] and [v["check"] for v in final] == [v["check"] for v in row["final"]]


@pytest.mark.slow
def test_quick_suite_through_the_plain_loop_gives_the_lightning_verdicts(quick, tmp_path_factory):
    rows, printed = run_quick(tmp_path_factory, "loop")
    faulty = sum(r["expect"] != HEALTHY and not r["fault"] for r in rows)
    assert f"Faults named by their own check: {faulty} of {faulty}. Healthy runs with any warning: 0 of" in printed
    assert FLIGHT_RIGHT in printed
    lightning = {r["name"]: r for r in quick[0]}
    for row in rows:  # the same model, batches, optimizer and schedule: the same training and the same report
        other = lightning[row["name"]]
        assert row["loss"] == pytest.approx(other["loss"], rel=1e-3, nan_ok=True), row["name"]
        assert [c for c, _ in row["warned"]] == [c for c, _ in other["warned"]], row["name"]


@pytest.mark.slow
def test_quick_suite_through_the_hugging_face_trainer_gives_the_lightning_verdicts(quick, tmp_path_factory):
    pytest.importorskip("accelerate")
    rows, printed = run_quick(tmp_path_factory, "hf")
    left_out = {r["name"] for r in quick[0]} - {r["name"] for r in rows}
    assert left_out == {"relu-mlp fp16 scaled"}  # on the CPU the Trainer's fp16 has no GradScaler (it says so)
    assert "not run through the Hugging Face Trainer: relu-mlp fp16 scaled" in printed
    faulty = sum(r["expect"] != HEALTHY and not r["fault"] for r in rows)
    assert f"Faults named by their own check: {faulty} of {faulty}. Healthy runs with any warning: 0 of" in printed
    assert FLIGHT_RIGHT in printed
    lightning = {r["name"]: r for r in quick[0]}
    for row in rows:  # the same model, batches, optimizer, schedule and random stream: the same report
        other = lightning[row["name"]]
        assert row["loss"] == pytest.approx(other["loss"], rel=1e-3, nan_ok=True), row["name"]
        assert [c for c, _ in row["warned"]] == [c for c, _ in other["warned"]], row["name"]


def sweep(losses: dict[float, float]) -> list[dict]:
    return [{"name": f"m lr={lr}", "sweep": "m", "seed": 0, "lr": lr, "loss": loss} for lr, loss in losses.items()]


def test_sweep_points_are_labelled_from_the_best_final_loss_of_their_sweep():
    rows = sweep({1e-4: 2.6, 3e-4: 2.2, 1e-3: 2.1, 3e-3: 2.0, 1e-2: 2.05, 3e-2: 2.09, 1e-1: float("inf")})
    score.labels(rows)
    got = {r["lr"]: (r["expect"], r["allowed"]) for r in rows}
    assert got == {
        1e-4: (score.TOO_LOW, []),  # 30x below the best and clearly worse
        3e-4: (score.TOO_LOW, []),  # 10x below, 10 % worse
        1e-3: (HEALTHY, []), 3e-3: (HEALTHY, []), 1e-2: (HEALTHY, []),  # within 3x
        3e-2: (HEALTHY, [score.TOO_HIGH]),  # 10x above but within 5 %: that advice or none
        1e-1: (score.TOO_HIGH, []),  # diverged
    }  # fmt: skip


def test_a_run_is_right_only_with_its_own_check_and_advice_toward_the_best():
    def judged(expect, fired, advice="", lr=0.1, best=0.003, loss=2.0):
        row = {"expect": expect, "allowed": [], "lr": lr, "best_lr": best, "warned": [[c, 0] for c in fired],
               "final": [{"check": c, "advice": advice} for c in fired], "loss": loss}  # fmt: skip
        score.judge(row)
        return row["ok"], row["wrong"]

    assert judged(HEALTHY, []) == (True, [])
    assert judged(HEALTHY, ["saturation"]) == (False, ["saturation"])
    assert judged("dead units", ["saturation", "dead units"]) == (True, [])
    assert judged("dead units", ["saturation"]) == (False, ["missed dead units"])
    assert judged(score.TOO_HIGH, [score.TOO_HIGH], "divide the learning rate by about 20") == (True, [])
    assert judged(score.TOO_HIGH, [score.TOO_HIGH], "divide the learning rate by about 1e+03") == (
        False, ["factor not toward the best"])  # fmt: skip
    # a rate too high whose run diverged: named by the non-finite check (which says to lower the rate), not otherwise
    assert judged(score.TOO_HIGH, ["non-finite"], loss=float("inf")) == (True, [])
    assert judged(score.TOO_HIGH, ["non-finite"]) == (False, ["missed learning rate too high"])
    assert judged(score.TOO_LOW, ["non-finite"], loss=float("inf")) == (False, ["missed learning rate too low"])


def train_tiny_lm(recipe, state=None, steps=None):
    """tiny-lm trained with ``recipe`` (from ``state`` if given) for ``steps`` of its schedule (all by default),
    seed 0, watched by NetDiag every 50 steps: its trained weights and NetDiag."""
    import itertools
    import warnings

    from models import BUILDERS

    from lightning_netdiag import NetDiag

    module, loader = BUILDERS["tiny-lm"](recipe, 0)
    if state is not None:
        module.net.load_state_dict(state)
    conf = module.configure_optimizers()
    optimizer, schedule = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    with warnings.catch_warnings(), NetDiag(module, optimizer, every_n_steps=50, flight=False) as diag:
        warnings.simplefilter("ignore")  # `self.log` outside a Trainer
        for i, batch in zip(range(steps or recipe.steps), batches, strict=False):
            loss = module.training_step(batch, i)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return module.net.state_dict(), diag


@pytest.mark.slow
def test_attentions_sharp_from_the_start_are_not_a_collapse():
    """The entropy rule on real training: tiny-lm trained at 10x its best rate, no warm-up, collapses its softmaxes,
    and is named from its entropy alone (its largest logit holds above ATTN_LOGIT_HIGH on some CPUs, not on
    others). Trained on from there at its best rate with a fresh NetDiag, as one fine-tunes a model whose
    attentions are sharp from the start, its entropy is low from the first logged step and is not a collapse."""
    from models import Recipe

    from lightning_netdiag import report
    from lightning_netdiag.rules import RULES, instability

    state, diag = train_tiny_lm(Recipe("tiny-lm", 200, 3e-2, {"warmup": False}))
    hot = {"logits": diag.logits.record}
    collapsed = [s for s in hot["logits"].steps if instability.collapsed_attentions_at(hot, s)]
    assert collapsed and collapsed[0] <= 100

    def growing(rules=RULES):
        return [v for v in report.evaluate(**hot, rules=rules) if v.check == "attention logits growing"]

    assert growing()  # from its largest logits or from its entropy: which holds first depends on the CPU
    # the entropy alone names it: the logit rule's lines out of reach
    logits_off = tuple(replace(r, line=math.inf, at_once=math.inf) if r.id == "instability.attention_logits" else r
                       for r in RULES)  # fmt: skip
    warned = growing(logits_off)
    assert warned and "entropy" in warned[0].cause and warned[0].rule == "instability.attention_entropy"
    _, diag = train_tiny_lm(Recipe("tiny-lm", 200, 3e-3, {"warmup": False}), state)
    fine = {"logits": diag.logits.record}
    first = instability.attention_entropy_at(fine, 0)
    assert first is not None and first[1] < instability.ATTN_ENTROPY_LOW  # sharp from the start
    assert not any(instability.collapsed_attentions_at(fine, s) for s in fine["logits"].steps)
    assert not report.evaluate(**fine)


@pytest.mark.slow
def test_a_signal_far_past_its_line_is_named_at_the_first_logging_step():
    """tiny-lm at 100x its best rate without warm-up, stopped at step 50 (its schedule's, the second logging step):
    its largest attention logit is already past ATTN_LOGIT_AT_ONCE (2,200 to 13,000 on seeds 0-2) and Adam's
    normalised step below ADAM_STEP_AT_ONCE (0.006 to 0.012), so both rules name it there, 100 steps before a
    rule held over 3 logging steps could. At its best rate (logits below 10, steps about 0.2) neither does."""
    from models import Recipe

    from lightning_netdiag import report
    from lightning_netdiag.rules import RULES

    def said(recipe, rules=RULES):
        _, diag = train_tiny_lm(recipe, steps=51)
        logits, optimizer = diag.logits.record, diag.optimizer_state.record
        assert logits.steps == optimizer.steps == [0, 50]
        return {(v.check, v.step) for v in report.evaluate(logits=logits, optimizer=optimizer, rules=rules)}

    hot = Recipe("tiny-lm", 800, 0.3, {"warmup": False})
    assert said(hot) == {("attention logits growing", 50), ("learning rate too high", 50)}
    assert said(Recipe("tiny-lm", 800, 3e-3, {"warmup": False})) == set()
    held_only = tuple(replace(r, at_once=None) for r in RULES)
    assert said(hot, held_only) == set()  # two logging steps: the held rules cannot speak yet
