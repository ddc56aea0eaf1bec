"""The record: what the meters fill and every view reads. Its JSON form is lossless on a real run; the report
of a run that warned and recovered keeps the cleared warning, live and from its logs alike; the cadence is
recorded and the persistence rule counts logging steps; logs from netdiag 0.1.0 read into the same record; a
record from a newer netdiag is refused with a clear error."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TinyNet, all_callbacks, loader, trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_netdiag import HealthReport, cli, report
from lightning_netdiag.logs import LogError, load_run
from lightning_netdiag.record import RECORD_VERSION, ActivationRecord, Record, RecordVersionError

OLD_LOGS = Path(__file__).parent / "data" / "logs_0.1.0"  # written by netdiag 0.1.0 (commit 996912c)


def netdiag(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_netdiag.cli", *args], capture_output=True, text=True)


class FrozenAtFirst(TinyNet):
    """The last layer's learning rate is 0 for the first 5 steps, then the others': it is "not learning" early
    on and recovers."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        last = list(self.net[-1].parameters())
        rest = [p for p in self.parameters() if all(p is not q for q in last)]
        opt = torch.optim.Adam([{"params": rest}, {"params": last}], lr=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 1.0, lambda s: 0.0 if s < 5 else 1.0])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@pytest.fixture(scope="module")
def recovered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recovered")
    callbacks, health = all_callbacks(1), HealthReport(print_table=False)
    loggers = [TensorBoardLogger(tmp, name="run", version="tb"), CSVLogger(tmp, name="run", version="csv")]
    with pytest.warns(UserWarning, match="netdiag: not learning"):
        trainer(tmp, [*callbacks, health], logger=loggers, max_steps=12, limit_val_batches=0).fit(
            FrozenAtFirst(), loader()
        )
    return callbacks, health, tmp / "run"


def test_the_json_form_gives_back_every_series_histogram_and_description(recovered):
    callbacks, _, _ = recovered
    for cb in callbacks:
        record = cb.record
        back = Record.from_json(json.loads(json.dumps(record.to_json())))
        assert type(back) is type(record) and back.describe() == record.describe()
        assert back.steps == record.steps and back.last_step == record.last_step
        assert list(back.series.items()) == list(record.series.items())  # every point, in order
        assert back.series.histograms == record.series.histograms
        assert (back.described, back.history_size, back.every_n_steps) == (True, 10_000, 1)
        assert back.to_json() == record.to_json()
        # later steps written with it (a new series among them) read back as if added, the record left as it was
        last, key = record.last_step, next(iter(record.series))
        later = [(last + 1, {key: 1.5, (key[0], "new.layer"): 2.0}), (last + 2, {key: 2.5})]
        before = record.to_json()
        added = Record.from_json(json.loads(json.dumps(record.to_json())))
        for step, scalars in later:
            added.add(step, scalars, {})
        assert record.to_json(later) == added.to_json() and record.to_json() == before
    activations = callbacks[0].record.describe()
    assert activations["layer_families"] == {"net.2": "tanh", "net.4": "tanh"}
    assert activations["layer_regions"]["net.2"] == "|t| > 0.97" and activations["version"] == RECORD_VERSION


def test_a_warning_that_cleared_stays_in_the_report_live_and_from_the_logs(recovered):
    _, health, root = recovered
    assert [(v.check, v.step) for v in health.warnings] == [("not learning", 2)]  # the third logging step
    (cleared,) = [v for v in health.verdicts if v.check == "not learning"]
    # at steps 0-4 the weight stood still: the rule held from the third of them, and not since step 5
    assert (cleared.cleared, cleared.since, cleared.step, cleared.layer) == (True, 2, 4, "net.5.weight")
    assert cleared.steps == "2-4, cleared since" and "2-4, cleared since" in health.report.table()
    assert "| 2-4, cleared since |" in health.report.markdown()
    live = [(v.check, v.layer, v.hits, v.steps) for v in health.verdicts]
    for log in ("tb", "csv"):
        assert [(v.check, v.layer, v.hits, v.steps) for v in cli.health(load_run(root / log)).verdicts] == live
        done = netdiag("report", str(root / log))
        assert done.returncode == 0, done.stderr
        assert "not learning" in done.stdout and "2-4, cleared since" in done.stdout
    done = netdiag("compare", str(root / "tb"), str(root / "csv"))
    assert done.returncode == 0 and done.stdout.count("| not learning (cleared) |") == 2, done.stdout + done.stderr


@pytest.mark.parametrize("every", [2, 5])
def test_the_cadence_is_recorded_and_persistence_counts_logging_steps(tmp_path, every):
    from test_report_inputs import LeftOut  # the last layer is in no optimizer: not learning from step 0

    callbacks, health = all_callbacks(every), HealthReport(print_table=False)
    with pytest.warns(UserWarning, match="netdiag: not learning"):
        trainer(tmp_path, [*callbacks, health], max_steps=3 * every + 1, limit_val_batches=0).fit(LeftOut(), loader())
    assert {cb.record.every_n_steps for cb in callbacks} == {every}
    # held at PERSIST logging steps in a row: steps 0, every, 2 * every
    assert [v.step for v in health.warnings if v.check == "not learning"] == [(report.PERSIST - 1) * every]
    window = f"a rule during training counts once it holds at 3 logging steps in a row (measured every {every} steps"
    assert any(note.startswith(window) for note in health.notes)
    (events,) = tmp_path.rglob("events.out.tfevents.*")
    run = load_run(events.parent)
    assert run.record("update").every_n_steps == every and not run.notes  # read from the logs, not inferred


@pytest.mark.parametrize("log", ["tb", "csv"])
def test_logs_of_netdiag_0_1_0_read_into_the_same_record(log):
    run = load_run(OLD_LOGS / log)
    saturation = run.record("saturation")
    assert isinstance(saturation, ActivationRecord) and saturation.described and saturation.layer_regions == {}
    assert saturation.layer_families == {"net.2": "tanh", "net.4": "tanh"}
    assert {r.every_n_steps for r in run.records.values()} == {2} and saturation.steps == [0, 2, 4, 6]
    assert run.notes == [
        "these logs do not say how often saturation, grad_data, update measured (written before netdiag 0.2.0): "
        "every 2 steps, read from the logged steps"
    ]
    said = cli.health(run)
    assert [(v.check, v.layer, v.steps) for v in said.verdicts] == [("saturation", "net.4", "at init")]
    then = (OLD_LOGS / "report.txt").read_text()  # what netdiag 0.1.0 said of these logs
    assert "WARNING  saturation  net.4  45.31  tanh-like: < 40 % at init" in then
    assert f"{said.verdicts[0].value:.4g}" == "45.31" and said.notes[0] in then  # the same learning-rate note


def test_a_record_of_a_newer_version_gets_a_clear_error(tmp_path):
    logs = shutil.copytree(OLD_LOGS / "csv", tmp_path / "csv")
    meta = logs / "netdiag_meta_update.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "version": RECORD_VERSION + 1}))
    with pytest.raises(LogError, match="newer lightning-netdiag"):
        load_run(logs)
    done = netdiag("report", str(logs))
    assert done.returncode == 2 and "netdiag_meta_update.json" in done.stderr and "upgrade" in done.stderr
    data = ActivationRecord().to_json()
    with pytest.raises(RecordVersionError, match=f"reads up to version {RECORD_VERSION}"):
        Record.from_json({**data, "version": RECORD_VERSION + 1})
    with pytest.raises(ValueError, match="Expected a record of a kind in"):
        Record.from_json({**data, "kind": "attention"})


def test_the_plain_loop_reports_the_cleared_warning_as_lightning_does(recovered, capsys):
    from lightning_netdiag import NetDiag

    model = FrozenAtFirst()
    conf = model.configure_optimizers()
    optimizer, schedule = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    with NetDiag(model, optimizer, every_n_steps=1) as diag:
        for batch, _ in zip(loader(), range(12), strict=False):
            loss = torch.nn.functional.cross_entropy(model(batch[0]), batch[1])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    verdicts = diag.report()
    assert "2-4, cleared since" in capsys.readouterr().out
    _, health, _ = recovered
    assert [(v.check, v.layer, v.steps) for v in verdicts] == [(v.check, v.layer, v.steps) for v in health.verdicts]


def test_the_layers_hold_core_imports_no_front_end_and_views_no_meter():
    import ast

    package = Path(__file__).parents[1] / "lightning_netdiag"
    core = {
        "stats", "spikes", "activations", "select", "capture", "attention", "origin", "dist", "tags", "history",
        "record", "run", "meters", "flight",
    }  # fmt: skip
    views = {"sinks", "checksum", "logs", "plots", "report", "render", "rules"}

    def imported(path: Path) -> set[str]:
        """Our modules that ``path`` imports, and ``"<name>"`` for each other package."""
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            modules += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for module in modules:
                parts = module.split(".")
                if parts[0] != "lightning_netdiag":
                    names.add(f"<{parts[0]}>")
                elif len(parts) > 1:
                    names.add(parts[1])
                else:
                    names |= {alias.name for alias in node.names}  # type: ignore[union-attr]
        return names

    for path in package.rglob("*.py"):
        module = path.relative_to(package).parts[0].removesuffix(".py")
        ours = {name for name in imported(path) if not name.startswith("<")}
        if module in core:
            assert ours <= core, (path, ours - core)
            assert not {"<lightning>", "<pytorch_lightning>"} & imported(path), path
        if module in views:
            assert ours <= {"stats", "spikes", "dist", "tags", "history", "record", "flight", *views}, (path, ours)
            # of the flight recorder's parts, a view reads the events' type and text only (not the ring, the lifeline)
            flight = {m for m in re.findall(r"lightning_netdiag\.flight\.(\w+)", path.read_text())}
            assert flight <= {"events"}, (path, flight)
