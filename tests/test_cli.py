"""LightningCLI builds the callbacks from the example YAML (examples/cli.yaml) and trains a few steps."""

import sys
from pathlib import Path

import pytest
from helpers import read_tensorboard
from torch import nn

from lightning_netdiag import DiagnosticPlots, GradDataRatio, HealthReport, SaturationMonitor, UpdateRatio

pytest.importorskip("jsonargparse")
pytest.importorskip("names")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_lightning_cli_runs_the_example_config(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.chdir(tmp_path)
    from cli import CLI, CliMLP, NamesData

    args = [
        "fit",
        f"--config={EXAMPLES / 'cli.yaml'}",
        "--trainer.max_steps=21",
        "--trainer.log_every_n_steps=10",
        "--trainer.enable_progress_bar=false",
    ]
    cli = CLI(CliMLP, NamesData, args=args)
    cbs = {type(cb): cb for cb in cli.trainer.callbacks}
    sat, grad = cbs[SaturationMonitor], cbs[GradDataRatio]
    assert cbs[UpdateRatio].target == -3.0 and DiagnosticPlots in cbs and cbs[HealthReport].stop_on_fatal
    assert sat.modules == (nn.Tanh,) and sat.threshold == 0.97  # a type given by its import path
    assert grad.params == ("net.*",) and grad.ndims == (2,)
    scalars, hists, _ = read_tensorboard(cli.trainer.logger.log_dir)
    deep_tanhs = {f"netdiag/act_saturated_pct/net.{i}" for i in (2, 5, 8, 11, 14)}
    assert deep_tanhs <= set(scalars) and all(sorted(scalars[t]) == [0, 10, 20] for t in deep_tanhs)
    assert "netdiag/grad/net.0.weight" in hists and "netdiag/update_data_log10/net.0.weight" in scalars
    assert (tmp_path / "lightning_logs" / "cli").is_dir()
    sys.modules.pop("cli", None)
