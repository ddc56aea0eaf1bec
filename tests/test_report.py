"""The health report's rules, on real callbacks' histories, and the HealthReport callback in a Trainer."""

import logging
import math
import re

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
    assert checks(got) == {("grad:data outlier", "w3")} and "25x" in got[0].cause
    two = recorded(GradDataRatio, {"netdiag/grad_data_ratio/w1": 1e-3, "netdiag/grad_data_ratio/w2": 1.0})
    assert report.evaluate(grad_data=two) == []


def test_update_ratio_rules_and_learning_rate_factor():
    high = UpdateRatio()
    for step in range(20):  # the median of the latest 10 points is judged: the early -3 are forgotten
        value = -3.0 if step < 10 else -1.5
        high.history.add(step, {"netdiag/update_data_log10/w1": value, "netdiag/update_data_log10/w2": value - 0.2}, {})
    got = report.evaluate(update=high)
    assert checks(got) == {("update:data too high", "w1"), ("update:data too high", "w2")}
    median = -1.6  # median of the two layers' medians
    assert f"{10 ** (-3 - median):.2g}" in got[0].advice  # 0.04: a learning rate 25x smaller

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
    nonfinite = [w for w in record if "netdiag: non-finite (grad) in net.0.weight" in str(w.message)]
    assert len(nonfinite) == 1  # warned the first time only
    assert rep.verdicts[0].severity == "fatal"
    printed = [r.getMessage() for r in caplog.records if "netdiag health report" in r.getMessage()]
    assert len(printed) == 1 and re.search(r"FATAL +non-finite \(grad\) +net.0.weight", printed[0])
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
