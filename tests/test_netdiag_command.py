"""The ``netdiag`` command reads what real runs logged (TensorBoard and CSV) back into the numbers, the
report, the plots and a comparison, and names what is wrong with logs it cannot read."""

import math
import subprocess
import sys

import pytest
import torch
from helpers import TinyNet, all_callbacks, loader, trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_netdiag import HealthReport, cli
from lightning_netdiag.cli import compare
from lightning_netdiag.logs import LogError, find_runs, load_run


class LoggedLoss(TinyNet):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss)
        return loss


def fit(tmp_path, name: str, lr: float = 0.01, saturate: bool = True, **kw):
    """A run with TensorBoard and CSV logs; its callbacks and live report."""
    model = LoggedLoss(lr=lr, **kw)
    if saturate:
        with torch.no_grad():
            model.net[-3].weight.mul_(10.0)  # the second Tanh saturated at init: a verdict to read back
    callbacks, health = all_callbacks(2), HealthReport(print_table=False)
    loggers = [TensorBoardLogger(tmp_path, name=name, version="tb"), CSVLogger(tmp_path, name=name, version="csv")]
    trainer(tmp_path, [*callbacks, health], logger=loggers, max_steps=7, limit_val_batches=0, log_every_n_steps=1).fit(
        model, loader()
    )
    return callbacks, health, tmp_path / name


def netdiag(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_netdiag.cli", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    return fit(tmp, "lr_0.01", 0.01), fit(tmp, "lr_0.1", 0.1, saturate=False)


@pytest.mark.parametrize("log", ["tb", "csv"])
def test_the_logs_give_back_the_live_numbers_and_the_live_report(two_runs, log):
    callbacks, live, root = two_runs[0]
    run = load_run(root / log)
    for cb in callbacks:
        meter = run.record(cb.kind)
        assert meter.described and meter.prefix == "netdiag"
        assert set(meter.tagged) == set(cb.history)
        for tag in cb.history:
            for (s1, v1), (s2, v2) in zip(meter.tagged[tag], cb.history[tag], strict=True):
                assert s1 == s2 and math.isclose(v1, v2, rel_tol=1e-6, abs_tol=1e-30), tag  # float32 in TensorBoard
        if log == "tb":
            assert set(meter.tagged.histograms) == set(cb.history.histograms)
            for tag, points in cb.history.histograms.items():
                for (_, ours), (_, kept) in zip(meter.tagged.histograms_of(tag), points, strict=True):
                    assert sorted(c for c in ours.counts if c) == sorted(c for c in kept.counts if c), tag
    assert run.record("saturation").layer_families == callbacks[0].layer_families
    assert [(v.check, v.layer, v.hits) for v in live.verdicts] == [
        (v.check, v.layer, v.hits) for v in cli.health(run).verdicts
    ] and live.verdicts
    assert run.final_loss()[0] == "train_loss"


def test_report_plots_and_compare_from_the_command(two_runs, tmp_path):
    (_, health, root), (_, _, other) = two_runs
    done = netdiag("report", str(root / "tb"))
    assert done.returncode == 0, done.stderr
    assert "netdiag health report at step 6" in done.stdout and health.verdicts[0].check in done.stdout
    done = netdiag("plots", str(root / "tb"), "--out", str(tmp_path / "png"))
    assert done.returncode == 0, done.stderr
    names = {p.stem for p in (tmp_path / "png").glob("*.png")}
    assert names == {"activations", "activation_gradients", "activations_over_time", "weight_gradients", "update_ratio"}
    done = netdiag("compare", str(root / "tb"), str(other / "tb"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 4 and "final loss" in lines[0] and "saturation" in lines[2] and lines[3].endswith("| none |")
    runs = [load_run(r) for r in find_runs([root, other])]  # a folder above runs stands for them all
    assert len(runs) == 4 and compare(runs).count("\n") == 5


def test_logs_it_cannot_read_get_a_clear_error(two_runs, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(tmp_path / "plain")
    writer.add_scalar("loss", 1.0, 0)
    writer.close()
    done = netdiag("report", str(tmp_path / "plain"))
    assert done.returncode == 2 and "hold no netdiag tags" in done.stderr
    done = netdiag("report", str(tmp_path / "nothing here"))
    assert done.returncode == 2 and "no such file or directory" in done.stderr
    with pytest.raises(LogError, match="nothing here: no such directory of logs"):  # and from Python
        load_run(str(tmp_path / "nothing here"))
    (tmp_path / "empty").mkdir()
    done = netdiag("report", str(tmp_path / "empty"))
    assert done.returncode == 2 and "no TensorBoard event file, metrics.csv or netdiag record" in done.stderr

    (event,) = (two_runs[0][2] / "tb").glob("events.out.tfevents.*")
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / event.name).write_bytes(event.read_bytes()[:-7])
    done = netdiag("report", str(cut))
    assert done.returncode == 2 and "truncated" in done.stderr and event.name in done.stderr

    other = fit(tmp_path, "no_batchnorm", batchnorm=False, saturate=False)[2]
    done = netdiag("compare", str(two_runs[0][2] / "tb"), str(other / "tb"))
    assert done.returncode == 2 and "watched different layers" in done.stderr

    (tmp_path / "a file").write_text("")
    done = netdiag("plots", str(two_runs[0][2] / "tb"), "--out", str(tmp_path / "a file" / "png"))
    assert done.returncode == 2 and "a file" in done.stderr and "Traceback" not in done.stderr


def test_a_plain_loops_final_loss_is_the_flight_recorders(tmp_path):
    """A plain loop logs no loss of its own: ``compare`` reads the flight recorder's (the mean of its last 5 steps)."""
    from torch.nn import functional as F
    from torch.utils.tensorboard import SummaryWriter

    from lightning_netdiag import NetDiag

    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    with NetDiag(model, optimizer, SummaryWriter(tmp_path / "loop"), every_n_steps=4) as diag:
        for x, y in loader():
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            diag.loss(loss)
            optimizer.step()
            losses.append(loss.item())
    tag, value = load_run(tmp_path / "loop").final_loss()
    assert tag == "flight_loss" and value == pytest.approx(sum(losses[-5:]) / 5, rel=1e-6)
    assert f"| {value:.4f} |" in compare([load_run(tmp_path / "loop")])


def test_every_metric_the_meters_log_is_named_once_in_tags():
    import re
    from pathlib import Path

    from lightning_netdiag import meters, tags
    from lightning_netdiag.record import ActivationRecord

    source = "".join(p.read_text() for p in Path(meters.__file__).parent.glob("*.py"))
    logged = set(re.findall(r'\[\(\s*"(\w+)",', source))  # scalars[("metric", name)] = ...
    assert logged and logged <= set(tags.KIND_OF), logged - set(tags.KIND_OF)
    with pytest.raises(ValueError, match="Expected a metric of 'saturation'"):  # and a record takes no other
        ActivationRecord().add(0, {("grad_std", "w"): 1.0}, {})
