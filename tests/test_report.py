"""The health report's rules, on real callbacks' histories, and the HealthReport callback in a Trainer."""

import logging
import math
import re
import statistics
import warnings

import pytest
import torch
from helpers import TinyNet, loader, read_tensorboard, trainer
from torch import nn

from lightning_netdiag import (
    DiagnosticPlots,
    GradDataRatio,
    HealthReport,
    NetDiag,
    SaturationMonitor,
    UpdateRatio,
    report,
)


def recorded(cls, scalars: dict[str, float], steps=(0,), **kw):
    """A callback whose history holds ``scalars`` at each of ``steps`` (the rules' mechanics; whether they are
    right is shown on real training runs: tests/test_diagnosis.py); its activation layers are tanh-like, as a
    live meter would describe the lecture's layers."""
    cb = cls(**kw)
    for step in steps:
        cb.history.add(step, scalars, {})
    if isinstance(cb, SaturationMonitor):
        cb.layer_families = {t.split("/")[-1]: "tanh" for t in scalars if t.count("/") == 2}
    return cb


def evaluate(*callbacks, **by_kind):
    """The report's rules on the records of ``callbacks`` (None where left out)."""
    records = [None if cb is None else cb.record for cb in callbacks]
    return report.evaluate(*records, **{kind: cb.record for kind, cb in by_kind.items()})


def checks(verdicts) -> set[tuple[str, str]]:
    return {(v.check, v.layer) for v in verdicts}


def test_healthy_numbers_pass():
    sat = recorded(SaturationMonitor, {
        "netdiag/act_saturated_pct/a": 3.0, "netdiag/act_std/a": 0.6, "netdiag/act_dead_pct/a": 0.0,
        "netdiag/act_grad_std/a": 1e-3, "netdiag/act_grad_std/b": 2e-3, "netdiag/act_nonfinite/a": 0.0,
    }, steps=(0, 50, 100))  # fmt: skip
    upd = recorded(UpdateRatio, {"netdiag/update_data_log10/w1": -3.1, "netdiag/update_data_log10/w2": -2.8})
    assert evaluate(sat, None, upd) == []
    assert "every check within its healthy range" in report.format_table([], step=5)


def test_init_rules_read_step_0_only():
    sat = SaturationMonitor()
    sat.layer_families = {"a": "tanh", "b": "tanh"}
    sat.history.add(0, {"netdiag/act_saturated_pct/a": 80.0, "netdiag/act_std/b": 0.01}, {})
    sat.history.add(50, {"netdiag/act_saturated_pct/a": 2.0, "netdiag/act_std/b": 0.5}, {})
    (saturated, dead) = evaluate(sat)
    assert (saturated.check, saturated.value, saturated.step) == ("saturation", 80.0, 0)
    assert saturated.healthy == "tanh-like: < 40 % at init" and (dead.check, dead.layer) == ("dead layer", "b")
    later = SaturationMonitor()  # saturated later in training only: not what the lecture's rule is about
    later.layer_families = {"a": "tanh"}
    later.history.add(0, {"netdiag/act_saturated_pct/a": 2.0}, {})
    later.history.add(50, {"netdiag/act_saturated_pct/a": 80.0}, {})
    assert evaluate(later) == []


def test_during_training_a_condition_must_hold_at_persist_logging_steps():
    sat = SaturationMonitor()
    sat.layer_families = {"r": "relu"}
    for step, dead in ((0, 0.0), (50, 60.0), (100, 60.0)):
        sat.history.add(step, {"netdiag/act_dead_pct/r": dead}, {})
    assert evaluate(sat) == []  # two steps in a row: not yet
    sat.history.add(150, {"netdiag/act_dead_pct/r": 55.0}, {})
    (v,) = evaluate(sat)
    assert (v.check, v.layer, v.value, v.step) == ("dead units", "r", 55.0, 150)
    sat.history.add(200, {"netdiag/act_dead_pct/r": 3.0}, {})  # recovered: judged on the latest steps
    assert evaluate(sat) == []


def test_gradient_flow_at_init_leaves_out_loop_layers_and_layers_without_gradient():
    sat = recorded(SaturationMonitor, {
        "netdiag/act_grad_std/a": 1e-5, "netdiag/act_grad_std/b": 1e-3, "netdiag/act_grad_std/c": 0.0,
    })  # fmt: skip
    (v,) = evaluate(sat)
    assert (v.check, v.layer, v.step) == ("vanishing gradient", "a / b", 0) and v.value == pytest.approx(0.01)
    sat.layers_in_loop = {"a"}  # a cell's calls over time steps: not depth
    assert evaluate(sat) == []
    sat.layers_in_loop = set()
    sat.layer_sizes = {"a": 4096.0, "b": 512.0}  # a CNN's stages: a value's gradient is not comparable
    assert evaluate(sat) == []
    sat.layer_sizes = {"a": 512.0, "b": 512.0}
    assert [v.check for v in evaluate(sat)] == ["vanishing gradient"]
    exploding = recorded(SaturationMonitor, {"netdiag/act_grad_std/a": 1.0, "netdiag/act_grad_std/b": 0.01})
    assert checks(evaluate(exploding)) == {("exploding gradient", "a / b")}


def test_an_over_confident_output_at_init_is_named_unless_the_loss_shows_it_is_earned():
    def run(loss: float):
        return recorded(SaturationMonitor, {
            "netdiag/init_output_ce/head": 25.4, "netdiag/init_output_classes/head": 27.0, "netdiag/init_loss": loss,
        })  # fmt: skip

    (v,) = evaluate(run(27.9))  # the lecture's original: confident and wrong
    assert (v.check, v.layer, v.value) == ("over-confident output", "head", 25.4) and "3.30" in v.healthy
    assert evaluate(run(2.1)) == []  # a trained model, fine-tuned: confident and right
    unseen = recorded(SaturationMonitor, {"netdiag/init_output_ce/head": 25.4, "netdiag/init_output_classes/head": 27})
    assert evaluate(unseen) == []  # the loss unknown (a plain loop with an optimizer): cannot tell
    uniform = recorded(SaturationMonitor, {"netdiag/init_output_ce/head": 3.31, "netdiag/init_output_classes/head": 27})
    assert evaluate(uniform) == []


def test_nonfinite_is_fatal_at_once_and_first():
    sat = recorded(SaturationMonitor, {"netdiag/act_nonfinite/a": 3.0, "netdiag/act_saturated_pct/a": 50.0})
    gd = recorded(GradDataRatio, {"netdiag/grad_nonfinite/w": 9.0})
    got = evaluate(sat, gd)
    assert [(v.severity, v.check, v.layer) for v in got] == [
        ("fatal", "non-finite", "a"), ("fatal", "non-finite", "w"), ("warning", "saturation", "a"),
    ]  # fmt: skip
    assert "FATAL" in report.format_table(got) and "| fatal |" in report.format_markdown(got)


def test_under_a_loss_scaler_non_finite_gradients_must_persist():
    gd = GradDataRatio()  # the scaler skips a step whose gradients overflowed, and lowers its scale
    for step, bad in ((0, 9.0), (1, 0.0), (2, 0.0)):
        gd.history.add(step, {"netdiag/grad_nonfinite/w": bad, "netdiag/loss_scale": 65536.0 / 2 ** (step > 0)}, {})
    assert evaluate(grad_data=gd) == []
    for step in (3, 4, 5):
        gd.history.add(step, {"netdiag/grad_nonfinite/w": 9.0, "netdiag/loss_scale": 1.0}, {})
    assert checks(evaluate(grad_data=gd)) == {("non-finite", "w")}


def test_a_weight_that_never_moves_is_not_learning():
    upd = UpdateRatio()
    for step in (0, 50, 100):
        scalars = {"netdiag/update_zero/head.weight": 1.0, "netdiag/update_data_log10/body.weight": -3.0}
        upd.history.add(step, scalars, {})
    (v,) = evaluate(update=upd)
    assert (v.check, v.layer, v.step) == ("not learning", "head.weight", 100) and "left out of the optimizer" in v.cause


def adam_run(shrink: float) -> tuple[GradDataRatio, UpdateRatio]:
    """Weights of std 0.02 at init under Adam at a rate of 1e-3, whose update shrinks by ``shrink`` decades."""
    gd = recorded(GradDataRatio, {"netdiag/grad_std/w": 2e-4, "netdiag/grad_data_ratio/w": 1e-2})
    upd = UpdateRatio()
    upd.optimizer_family = "adam"
    for step in (0, 50, 100, 150):
        ud = math.log10(1e-3 / 0.02) - (0.0 if step == 0 else shrink)
        upd.history.add(step, {"netdiag/update_data_log10/w": ud, "netdiag/lr": 1e-3}, {})
    return gd, upd


def test_adam_learning_rate_too_high_from_the_update_shrink_with_a_factor_toward_the_good_rates():
    assert evaluate(*((None, *adam_run(1.6)))) == []  # the suite's good rates shrink by 1.0 to 1.8
    (v,) = evaluate(None, *adam_run(2.5))
    assert (v.check, v.value, v.step) == ("learning rate too high", pytest.approx(2.5), 150)
    assert v.advice == "divide the learning rate by about 10"  # to a shrink of 1.5


def test_sgd_learning_rate_too_low_is_judged_at_the_schedules_top_rate():
    upd = UpdateRatio()
    upd.optimizer_family = "sgd"
    for step, lr, ud in ((0, 0.1, -2.5), (50, 0.1, -2.6), (100, 0.01, -3.6), (150, 0.01, -3.6), (200, 0.01, -3.5)):
        upd.history.add(step, {"netdiag/update_data_log10/w": ud, "netdiag/lr": lr}, {})
    assert evaluate(update=upd) == []  # the drop follows the schedule: -2.6 at its top rate
    slow = UpdateRatio()
    slow.optimizer_family = "sgd"
    for step in (0, 50, 100, 150):  # the first step is not judged (an SGD momentum starts empty)
        slow.history.add(step, {"netdiag/update_data_log10/w": -4.3, "netdiag/lr": 0.003}, {})
    (v,) = evaluate(update=slow)
    assert v.check == "learning rate too low" and v.advice.startswith("multiply the learning rate by about 1e+02 (")
    assert "calibrated on training from scratch" in v.advice
    slow.optimizer_family = None  # an optimizer the suite did not calibrate: no advice
    assert evaluate(update=slow) == []


class Diverges(TinyNet):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * math.nan if self.trainer.global_step >= 3 else loss


def test_health_report_callback_warns_once_stops_on_fatal_and_logs_text(tmp_path, caplog):
    rep = HealthReport(stop_on_fatal=True)
    cbs = [SaturationMonitor(every_n_steps=1, modules=[nn.Tanh]), GradDataRatio(every_n_steps=1), rep]
    t = trainer(tmp_path, cbs, max_steps=20, limit_val_batches=0)
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    with pytest.warns(UserWarning, match="netdiag: non-finite") as record:
        t.fit(Diverges(init_gain=20.0), loader())
    assert t.global_step < 20  # stopped early on the fatal verdict
    nonfinite = [str(w.message) for w in record if "NaN/Inf in the weight gradients" in str(w.message)]
    assert len(nonfinite) == 1  # warned once per rule, naming the layers: the first in depth order first
    assert "in 3 layers, worst net.0.weight, net.3.weight, net.5.weight (at step 3," in nonfinite[0]
    assert rep.verdicts[0].severity == "fatal"
    assert {(v.check, v.step) for v in rep.warnings} >= {("non-finite", 3)}
    printed = [r.getMessage() for r in caplog.records if "netdiag health report" in r.getMessage()]
    assert len(printed) == 1 and re.search(r"FATAL +non-finite +3 layers: net.0.weight", printed[0])
    _, _, acc = read_tensorboard(t.logger.log_dir)
    text = acc.Tensors("netdiag/health_report/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| fatal | non-finite" in text


def test_plots_every_n_steps_into_a_chosen_directory(tmp_path):
    out = tmp_path / "figs"
    plots_cb = DiagnosticPlots(every_n_steps=2, save_dir=str(out))
    cbs = [SaturationMonitor(every_n_steps=1), GradDataRatio(every_n_steps=1), UpdateRatio(every_n_steps=1), plots_cb]
    trainer(tmp_path, cbs, max_steps=4, limit_val_batches=0, logger=False).fit(TinyNet(), loader())
    names = {"activations", "activation_gradients", "activations_over_time", "weight_gradients", "update_ratio"}
    expected = {f"{n}{suffix}.png" for n in names for suffix in ("_step2", "_step4", "")}
    assert {p.name for p in out.iterdir()} == expected
    assert sorted(p.name for p in plots_cb.saved) == sorted(expected)
    with pytest.raises(ValueError, match="`every_n_steps`"):
        DiagnosticPlots(every_n_steps=0)


def test_history_tail_is_the_latest_points_oldest_first():
    sat = SaturationMonitor(history_size=5)
    for step in range(8):
        sat.history.add(step, {"netdiag/act_std/a": float(step)}, {})
    assert sat.history.tail("netdiag/act_std/a", 3) == [(5, 5.0), (6, 6.0), (7, 7.0)]
    assert (
        sat.history.tail("netdiag/act_std/a", 50)
        == sat.history["netdiag/act_std/a"]
        == [(s, float(s)) for s in range(3, 8)]
    )


def test_a_rule_gives_one_verdict_naming_the_count_and_the_worst_few():
    scalars = {f"netdiag/act_saturated_pct/blocks.{i}.act": float(i) for i in range(120)}
    sat = recorded(SaturationMonitor, scalars)
    (v,) = evaluate(sat)
    assert (v.check, v.hits, v.value) == ("saturation", 79, 119.0)  # 41 .. 119 % are above 40 %
    assert v.layer == "blocks.119.act, blocks.118.act, blocks.117.act and 76 more"
    assert [name for name, _ in v.worst] == ["blocks.119.act", "blocks.118.act", "blocks.117.act"]
    table = report.format_table([v], step=3)
    assert len(table.splitlines()) == 5 and "79 layers: blocks.119.act" in table


def test_rules_are_calibrated_per_activation_family():
    sat = recorded(SaturationMonitor, {
        "netdiag/act_saturated_pct/relu": 55.0, "netdiag/act_std/relu": 0.01,  # half zeros: a healthy ReLU
        "netdiag/act_saturated_pct/gate": 3.0, "netdiag/act_std/gate": 0.02,  # an SE gate near 0.5: fine
        "netdiag/act_saturated_pct/tanh": 45.0, "netdiag/act_std/tanh": 0.01,
        "netdiag/act_saturated_pct/dead_relu": 97.0,
    })  # fmt: skip
    sat.layer_families = {"relu": "relu", "dead_relu": "relu", "gate": "sigmoid", "tanh": "tanh"}
    got = evaluate(sat)
    assert checks(got) == {("saturation", "tanh"), ("saturation", "dead_relu"), ("dead layer", "tanh")}
    healthy = {v.healthy for v in got if v.check == "saturation"}
    assert healthy == {"tanh-like: < 40 % at init", "ReLU-like: < 90 % at init"}


def test_sgd_learning_rate_too_high_when_the_network_dies():
    sat, upd = SaturationMonitor(), UpdateRatio()
    upd.optimizer_family = "sgd"
    for step, ud, flat in (
        (0, -2.0, 20.0),
        (50, -1.0, 40.0),
        (100, -4.0, 100.0),
        (150, -5.0, 100.0),
        (200, -4.5, 100.0),
    ):
        upd.history.add(step, {"netdiag/update_data_log10/w": ud, "netdiag/lr": 3.0}, {})
        sat.history.add(step, {"netdiag/act_saturated_pct/a": flat}, {})
    (v,) = evaluate(
        sat, None, upd
    )  # no "too low": the update per unit of rate fell 3.5 decades (from step 50: step 0 is not referenced)
    assert (v.check, v.value, v.step) == ("learning rate too high", pytest.approx(3.5), 200)
    assert v.advice.startswith("divide the learning rate by about 10")
    sat.history.add(250, {"netdiag/act_saturated_pct/a": 60.0}, {})  # a fit so good that gradients vanish: alive
    upd.history.add(250, {"netdiag/update_data_log10/w": -4.5, "netdiag/lr": 3.0}, {})
    assert evaluate(sat, None, upd) == []


class LoRALinear(nn.Module):
    """A frozen linear layer with LoRA's pair beside it (as peft makes it): ``A`` random, ``B`` zero at init."""

    def __init__(self, n: int, rank: int = 2) -> None:
        super().__init__()
        self.base = nn.Linear(n, n).requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(n, rank) / n**0.5)
        self.lora_B = nn.Parameter(torch.zeros(rank, n))

    def forward(self, x):
        return self.base(x) + x @ self.lora_A @ self.lora_B


@pytest.mark.parametrize("grad_data", [True, None])
def test_the_adam_update_shrink_says_why_it_is_unread(grad_data):
    """LoRA's pairs have no std at step 0 to read (``B`` is 0 there, and ``A`` has no gradient while ``B`` is 0):
    the learning-rate line says so, not that GradDataRatio is missing when it is there."""
    torch.manual_seed(0)
    model = nn.Sequential(LoRALinear(8), nn.Tanh(), LoRALinear(8))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with NetDiag(model, optimizer, every_n_steps=1, grad_data=grad_data) as diag:
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(16, 8)).square().mean().backward()
            optimizer.step()
    note = report.summarize(**diag.records()).table()
    want = "no weight's std at step 0" if grad_data else "needs GradDataRatio"
    assert f"learning rate (Adam): update shrink unread ({want}" in note


@pytest.mark.parametrize(("gain", "bias", "said"), [(0.0, 0.0, False), (1.0, -3.0, True)])
def test_a_relu_layer_all_zero_at_init_is_not_said_saturated_one_mostly_below_zero_is(gain, bias, said):
    """A norm's gain initialised to 0 before the ReLU (a residual branch's last norm, as timm's CSP networks make
    it: every output 0, by design) says nothing at init; a bias of -3 after a norm leaves 99.9 % of the outputs 0."""
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(32)
    model = nn.Sequential(nn.Linear(8, 32), norm, nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        norm.weight.fill_(gain)
        norm.bias.fill_(bias)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with NetDiag(model, optimizer, every_n_steps=1) as diag:
        model(torch.randn(64, 8)).square().mean().backward()
        optimizer.step()
    records = diag.records()
    assert records["saturation"].value("act_saturated_pct", 0, "2") > 99
    assert ("saturation" in [v.check for v in report.summarize(**records).verdicts]) == said


def _sgd_mlp_run(lr: float, steps: int = 120):
    """A BatchNorm ReLU MLP under SGD with momentum at ``lr``, in a plain loop (the loss read from its backward)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(),
        nn.Linear(64, 4),
    )  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    batches = list(loader(batch_size=32))
    losses = []
    with warnings.catch_warnings(), NetDiag(model, optimizer, every_n_steps=10) as diag:
        warnings.simplefilter("ignore")  # the flight recorder's live warnings
        for step in range(steps):
            x, y = batches[step % len(batches)]
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return diag, losses


def test_a_loss_that_diverged_is_named_early_from_the_median_of_the_steps_between_and_a_healthy_run_is_not():
    diag, losses = _sgd_mlp_run(10.0)  # its loss 159 at step 20 (1.3 at step 0); finite, its BatchNorms hold it
    medians = dict(diag.saturation.history["netdiag/loss_median"])
    assert medians[0] == pytest.approx(losses[0], rel=1e-6)
    for step in range(10, 120, 10):  # the last every_n_steps steps, this one's included
        assert medians[step] == pytest.approx(statistics.median(losses[step - 9 : step + 1]), rel=1e-6), step
    (v,) = [v for v in diag.report(print_table=False) if v.rule == "training.loss_diverged"]
    assert v.since == 30 and v.value > 10  # the spikes' events come at step 101
    assert v.value == pytest.approx(medians[v.step] / losses[0], rel=1e-6)
    assert f"from {losses[0]:.3g} at step 0" in v.cause and "lower the learning rate" in v.advice
    healthy, _ = _sgd_mlp_run(0.1)
    assert healthy.report(print_table=False) == []
