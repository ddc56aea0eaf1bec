"""The health report's rules, on real callbacks' histories, and the HealthReport callback in a Trainer."""

import logging
import math
import re
import statistics

import pytest
from helpers import TinyNet, loader, read_tensorboard, trainer
from torch import nn

from lightning_netdiag import DiagnosticPlots, GradDataRatio, HealthReport, SaturationMonitor, UpdateRatio, report


def recorded(cls, scalars: dict[str, float], steps=(0,), **kw):
    cb = cls(**kw)
    for step in steps:
        cb.history.add(step, scalars, {})
    return cb


def checks(verdicts) -> set[tuple[str, str]]:
    return {(v.check, v.layer) for v in verdicts}


def test_healthy_numbers_pass():
    sat = recorded(
        SaturationMonitor,
        {
            "netdiag/act_saturated_pct/a": 3.0,
            "netdiag/act_std/a": 0.6,
            "netdiag/act_dead_pct/a": 0.0,
            "netdiag/act_grad_std/a": 1e-3,
            "netdiag/act_grad_std/b": 2e-3,
            "netdiag/act_nonfinite/a": 0.0,
        },
    )
    upd = recorded(UpdateRatio, {"netdiag/update_data_log10/w1": -3.1, "netdiag/update_data_log10/w2": -2.8})
    assert report.evaluate(sat, None, upd) == []
    assert "every check within its healthy range" in report.format_table([], step=5)


def test_activation_rules():
    sat = recorded(SaturationMonitor, {
        "netdiag/act_saturated_pct/a": 42.0, "netdiag/act_std/a": 0.9, "netdiag/act_dead_pct/a": 12.5,
        "netdiag/act_saturated_pct/b": 1.0, "netdiag/act_std/b": 0.01, "netdiag/act_dead_pct/b": 0.0,
        "netdiag/act_grad_std/a": 1e-5, "netdiag/act_grad_std/b": 1e-3,
    })  # fmt: skip
    got = report.evaluate(sat)
    assert checks(got) == {("saturation", "a"), ("dead units", "a"), ("dead layer", "b"),
                           ("vanishing gradient", "a / b")}  # fmt: skip
    vanishing = next(v for v in got if v.check == "vanishing gradient")
    assert vanishing.value == pytest.approx(0.01) and vanishing.severity == "warning"
    saturation = next(v for v in got if v.check == "saturation")
    assert saturation.value == 42.0 and "init" in saturation.cause and "BatchNorm" in saturation.advice
    exploding = recorded(SaturationMonitor, {"netdiag/act_grad_std/a": 1.0, "netdiag/act_grad_std/b": 0.01})
    assert checks(report.evaluate(exploding)) == {("exploding gradient", "a / b")}


def test_only_the_latest_step_counts():
    sat = SaturationMonitor()
    sat.history.add(0, {"netdiag/act_saturated_pct/a": 80.0}, {})
    sat.history.add(10, {"netdiag/act_saturated_pct/a": 2.0}, {})
    assert report.evaluate(sat) == []


def test_grad_data_outlier_needs_three_and_names_the_factor():
    gd = recorded(GradDataRatio, {"netdiag/grad_data_ratio/w1": 1e-3, "netdiag/grad_data_ratio/w2": 2e-3,
                                  "netdiag/grad_data_ratio/w3": 5e-2})  # fmt: skip
    got = report.evaluate(grad_data=gd)
    assert checks(got) == {("grad:data outlier", "w3")} and got[0].value == pytest.approx(25)
    two = recorded(GradDataRatio, {"netdiag/grad_data_ratio/w1": 1e-3, "netdiag/grad_data_ratio/w2": 1.0})
    assert report.evaluate(grad_data=two) == []


def test_update_ratio_rules_and_learning_rate_factor():
    high = UpdateRatio()
    for step in range(20):  # the median of the latest 10 points is judged: the early -3 are forgotten
        value = -3.0 if step < 10 else -1.5
        high.history.add(step, {"netdiag/update_data_log10/w1": value, "netdiag/update_data_log10/w2": value - 0.2}, {})
    got = report.evaluate(update=high)
    assert checks(got) == {("update:data too high", "w1, w2")} and got[0].hits == 2
    # the median of the two layers' medians is -1.6: a learning rate 25x smaller brings it to -3
    assert got[0].advice == "divide the learning rate by about 25 to bring these layers' median (-1.60) to -3"

    low = recorded(UpdateRatio, {"netdiag/update_data_log10/w1": -5.0, "netdiag/update_data_log10/w2": -3.0},
                   target=-3.0)  # fmt: skip
    assert checks(report.evaluate(update=low)) == {("update:data too low", "w1"), ("update:data drift", "all")}


def test_nonfinite_is_fatal_and_first():
    sat = recorded(SaturationMonitor, {"netdiag/act_nonfinite/a": 3.0, "netdiag/act_saturated_pct/a": 50.0})
    gd = recorded(GradDataRatio, {"netdiag/grad_nonfinite/w": 9.0})
    got = report.evaluate(sat, gd)
    assert [v.severity for v in got] == ["fatal", "fatal", "warning"]
    assert {v.layer for v in got[:2]} == {"a", "w"}
    assert "FATAL" in report.format_table(got) and "| fatal |" in report.format_markdown(got)


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
    nonfinite = [str(w.message) for w in record if "netdiag: non-finite (grad) in" in str(w.message)]
    assert len(nonfinite) == 1  # warned once per rule, naming the layers: the first in depth order first
    assert "in 3 layers, worst net.0.weight, net.3.weight, net.5.weight" in nonfinite[0]
    assert rep.verdicts[0].severity == "fatal"
    printed = [r.getMessage() for r in caplog.records if "netdiag health report" in r.getMessage()]
    assert len(printed) == 1 and re.search(r"FATAL +non-finite \(grad\) +3 layers: net.0.weight", printed[0])
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
    (v,) = report.evaluate(sat)
    assert (v.check, v.hits, v.value) == ("saturation", 114, 119.0)  # 6 .. 119 % are above 5 %
    assert v.layer == "blocks.119.act, blocks.118.act, blocks.117.act and 111 more"
    assert [name for name, _ in v.worst] == ["blocks.119.act", "blocks.118.act", "blocks.117.act"]
    table = report.format_table([v], step=3)
    assert len(table.splitlines()) == 5 and "114 layers: blocks.119.act" in table


def test_rules_are_calibrated_per_activation_family():
    sat = recorded(SaturationMonitor, {
        "netdiag/act_saturated_pct/relu": 55.0, "netdiag/act_std/relu": 0.01,  # half zeros: a healthy ReLU
        "netdiag/act_saturated_pct/gate": 3.0, "netdiag/act_std/gate": 0.02,  # an SE gate near 0.5: fine
        "netdiag/act_saturated_pct/tanh": 7.0, "netdiag/act_std/tanh": 0.01,  # the lecture's rules
        "netdiag/act_saturated_pct/dead_relu": 97.0, "netdiag/act_dead_pct/relu": 0.5,
        "netdiag/act_dead_pct/dead_relu": 40.0,
    })  # fmt: skip
    sat.layer_families = {"relu": "relu", "dead_relu": "relu", "gate": "sigmoid", "tanh": "tanh"}
    got = report.evaluate(sat)
    assert checks(got) == {("saturation", "tanh"), ("saturation", "dead_relu"), ("dead layer", "tanh"),
                           ("dead units", "dead_relu")}  # fmt: skip
    assert {v.healthy for v in got if v.check == "saturation"} == {"tanh-like: < 5 %", "ReLU-like: < 90 %"}


def test_grad_data_outliers_are_judged_among_comparable_weights():
    scalars = {f"netdiag/grad_data_ratio/conv{i}.weight": 1e-3 * (1 + i / 10) for i in range(4)}
    scalars |= {f"netdiag/grad_data_ratio/fc{i}.weight": 5e-2 * (1 + i / 10) for i in range(3)}
    gd = recorded(GradDataRatio, scalars)
    gd.param_classes = {n.split("/")[-1]: "conv kernel" if "conv" in n else "matrix" for n in scalars}
    assert report.evaluate(grad_data=gd) == []  # across kinds the matrices would read 40x the median
    gd.param_classes = {}
    assert {v.check for v in report.evaluate(grad_data=gd)} == {"grad:data outlier"}


def test_learning_rate_advice_agrees_with_its_verdict():
    # The example's contradiction: one layer far too high, the rest too low; the median of all is below -3.
    upd = recorded(UpdateRatio, {
        "netdiag/update_data_log10/net.2.weight": -1.216, "netdiag/update_data_log10/net.0.weight": -4.2,
        "netdiag/update_data_log10/net.4.weight": -4.4, "netdiag/update_data_log10/net.6.weight": -3.48,
    })  # fmt: skip
    got = {v.check: v for v in report.evaluate(update=upd)}
    high, low = got["update:data too high"], got["update:data too low"]
    assert high.layer == "net.2.weight" and high.advice.startswith("divide the learning rate by about 61")
    assert "median (-1.22) to -3" in high.advice
    assert low.hits == 2 and low.advice.startswith("multiply it by about 20")  # median -4.3 of the two
    for v in (high, low):  # the factor moves these layers' median onto the target
        factor = float(v.advice.split("about ")[1].split(" ")[0])
        moved = (1 / factor if v is high else factor) * 10 ** statistics.median(m for _, m in v.worst)
        assert math.log10(moved) == pytest.approx(-3, abs=0.02)
