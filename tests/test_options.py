"""The options every callback shares: cadence, histograms on/off, prefix, bounded history."""

import pytest
import torch
from helpers import TinyNet, all_callbacks, loader, read_csv, read_tensorboard, trainer
from lightning.pytorch.loggers import CSVLogger

from lightning_netdiag import GradDataRatio, SaturationMonitor, UpdateRatio


def test_cadence_defaults_to_trainer_log_every_n_steps(tmp_path):
    cbs = [SaturationMonitor(), GradDataRatio(), UpdateRatio()]
    trainer(tmp_path, cbs, max_steps=8, log_every_n_steps=3, logger=False).fit(TinyNet(), loader())
    for cb in cbs:
        assert {step for points in cb.history.values() for step, _ in points} == {0, 3, 6}


def test_histograms_off_writes_no_histogram_and_no_quantile(tmp_path):
    cbs = [SaturationMonitor(every_n_steps=1, histograms=False), GradDataRatio(every_n_steps=1, histograms=False)]
    t = trainer(tmp_path, cbs, max_steps=2, limit_val_batches=0)
    t.fit(TinyNet(), loader())
    scalars, hists, _ = read_tensorboard(t.logger.log_dir)
    assert hists == {} and not any(tag.endswith("/q50") for tag in scalars)
    assert "netdiag/act_saturated_pct/net.2" in scalars and cbs[0].history.histograms == {}

    csv = CSVLogger(tmp_path, name="csv")
    trainer(tmp_path, [SaturationMonitor(every_n_steps=1, histograms=False)], logger=csv, max_steps=1).fit(
        TinyNet(), loader()
    )
    assert not any(tag.endswith("/q50") for tag in read_csv(f"{csv.log_dir}/metrics.csv"))


def test_prefix_and_bounded_history(tmp_path):
    sat = SaturationMonitor(every_n_steps=1, prefix="diag/run1", history_size=2)
    up = UpdateRatio(every_n_steps=1, prefix="diag/run1")
    t = trainer(tmp_path, [sat, up], max_steps=5, limit_val_batches=0)
    t.fit(TinyNet(), loader())
    scalars, _, acc = read_tensorboard(t.logger.log_dir)
    ours = [tag for tag in scalars if not tag.startswith(("epoch", "hp_metric"))]
    assert ours and all(tag.startswith("diag/run1/") for tag in ours)
    assert [step for step, _ in sat.history["diag/run1/act_std/net.2"]] == [3, 4]  # only the latest two
    assert len(sat.history.histograms["diag/run1/act/net.2"]) == 5
    assert len(up.history["diag/run1/update_skipped"]) == 5
    assert sat.state_key != SaturationMonitor(prefix="other").state_key  # two instances can share a Trainer


def test_validate_test_and_predict_after_fit_add_nothing(tmp_path):
    model = TinyNet()
    cbs = all_callbacks(1)
    t = trainer(tmp_path, cbs, max_steps=2, logger=False)
    t.fit(model, loader())
    before = [{tag: list(points) for tag, points in cb.history.items()} for cb in cbs]
    t.validate(model, loader())
    t.test(model, loader())
    assert len(t.predict(model, loader())) == 16
    assert [{tag: list(points) for tag, points in cb.history.items()} for cb in cbs] == before
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


@pytest.mark.parametrize("cls", [SaturationMonitor, GradDataRatio, UpdateRatio])
def test_log_every_n_steps_zero_needs_an_explicit_cadence(tmp_path, cls):
    with pytest.raises(ValueError, match="log_every_n_steps"):
        trainer(tmp_path, [cls()], max_steps=1, log_every_n_steps=0, logger=False).fit(TinyNet(), loader())
    cb = cls(every_n_steps=1)
    trainer(tmp_path, [cb], max_steps=1, log_every_n_steps=0, logger=False).fit(TinyNet(), loader())
    assert len(cb.history) > 0


def test_netdiag_callbacks_gives_every_callback_with_shared_options_and_the_three_callback_numbers(tmp_path):
    from lightning_netdiag import (
        DiagnosticPlots,
        FlightRecorder,
        HealthReport,
        LogitMonitor,
        OptimizerState,
        netdiag_callbacks,
    )

    every = netdiag_callbacks(every_n_steps=2, prefix="diag")
    kinds = [SaturationMonitor, GradDataRatio, UpdateRatio, LogitMonitor, OptimizerState, FlightRecorder,
             DiagnosticPlots, HealthReport]  # fmt: skip
    assert [type(cb) for cb in every] == kinds
    monitors = every[:5]
    assert all(cb.every_n_steps == 2 and cb.prefix == "diag" for cb in monitors) and every[5].prefix == "diag"
    three = all_callbacks(2)
    for callbacks, name in ((every, "all"), (three, "three")):
        torch.manual_seed(0)  # the same init and batches
        trainer(tmp_path / name, callbacks, max_steps=5, limit_val_batches=0, logger=False).fit(TinyNet(), loader())
    for ours, theirs in zip(every[:3], three, strict=True):  # the same numbers as the three-callback pattern
        assert ours.record.steps == theirs.record.steps == [0, 2, 4]
        assert {k: [v for _, v in p] for k, p in ours.record.series.items()} == {
            k: [v for _, v in p] for k, p in theirs.record.series.items()
        }
    assert every[3].record.steps == [0, 2, 4] and every[5].record.steps == list(range(5))  # the logits; every step
    assert every[7].report is not None  # the report at the end of fit

    left_out = netdiag_callbacks(flight=None, plots=False, report=HealthReport(warn=False))
    assert FlightRecorder not in map(type, left_out) and DiagnosticPlots not in map(type, left_out)
    assert left_out[-1].warn is False  # the one given
    with pytest.raises(ValueError, match="among"):
        netdiag_callbacks(saturations=True)
    with pytest.raises(ValueError, match="Expected `update` to be True, None or an UpdateRatio"):
        netdiag_callbacks(update=GradDataRatio())
    with pytest.raises(ValueError, match="`every_n_steps`"):
        netdiag_callbacks(every_n_steps=0)
