"""The Hugging Face front end: ``NetDiagCallback`` in a real ``transformers.Trainer`` gives the numbers of a
plain loop on the same model and batches (fp32, 1e-6), with and without gradient accumulation, writes them to
TensorBoard when ``report_to`` asks, and prints the report."""

import math
from pathlib import Path

import pytest
import torch
from helpers import dataset, read_tensorboard
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from lightning_netdiag import NetDiag, cli
from lightning_netdiag.logs import load_run, load_runs

transformers = pytest.importorskip("transformers")
from lightning_netdiag.hf import NetDiagCallback  # noqa: E402

STEPS, EVERY, BATCH, LR = 6, 2, 16, 0.01


class Clf(nn.Module):
    """A model that computes its own loss, as Hugging Face models do when given labels."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16))
        self.out = nn.Linear(16, 4)

    def forward(self, x, labels=None):
        logits = self.out(F.gelu(self.net(x)))
        return {"loss": F.cross_entropy(logits, labels) if labels is not None else None, "logits": logits}


class Rows(Dataset):
    def __init__(self) -> None:
        self.data = dataset()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return {"x": x, "labels": y}


class InOrder(transformers.Trainer):
    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


def with_hf(tmp_path, accumulate: int = 1, report_to=("tensorboard",)):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH, gradient_accumulation_steps=accumulate,
        max_steps=STEPS, logging_steps=EVERY, learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=0.0, report_to=list(report_to), use_cpu=True, save_strategy="no", disable_tqdm=True,
        remove_unused_columns=False, seed=0,
    )  # fmt: skip
    callback = NetDiagCallback()
    InOrder(model=Clf(), args=args, train_dataset=Rows(), callbacks=[callback]).train()
    return callback


def with_loop(accumulate: int = 1):
    model = Clf()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    batches = iter(DataLoader(Rows(), batch_size=BATCH))
    with NetDiag(model, optimizer, every_n_steps=EVERY, loss_from_output=accumulate == 1) as diag:
        for _ in range(STEPS):
            for _ in range(accumulate):
                batch = next(batches)
                (model(**batch)["loss"] / accumulate).backward()
            optimizer.step()
            optimizer.zero_grad()
    return diag


def histories(meters) -> dict[str, dict[int, float]]:
    return {tag: dict(m.history[tag]) for m in meters for tag in m.history}


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_trainer_gives_the_plain_loops_numbers(tmp_path, accumulate, capsys):
    hf, loop = with_hf(tmp_path, accumulate), with_loop(accumulate)
    ours, theirs = histories(hf.diag.meters), histories(loop.meters)
    assert set(ours) == set(theirs) and len(ours) > 30
    assert ("netdiag/init_loss" in ours) == (accumulate == 1)  # the model's own loss, read without accumulation
    for tag, points in theirs.items():
        every = set(range(STEPS)) if "/flight_" in tag else {0, 2, 4}  # the flight recorder: every step
        assert set(ours[tag]) == set(points) == ({0} if "/init_" in tag else every), tag
        for step, value in points.items():
            assert math.isclose(ours[tag][step], value, rel_tol=1e-6, abs_tol=1e-9), (tag, step, ours[tag][step], value)
    assert hf.diag.update.optimizer_family == "adam" and ours["netdiag/lr"][4] == LR
    assert "netdiag health report" in capsys.readouterr().out
    assert Path(hf.run_dir).parent == tmp_path / "runs" / "netdiag"  # type: ignore[arg-type]
    logged, hists, _ = read_tensorboard(hf.run_dir)
    assert {t for t in logged if t.startswith("netdiag/")} == set(ours)
    assert "netdiag/act/net.1" in hists and "netdiag/grad/out.weight" in hists


def test_trainings_that_reuse_an_output_dir_keep_their_logs_apart(tmp_path):
    # one directory per training: shared, a second run's events would read back as more points of the first
    first, second = with_hf(tmp_path), with_hf(tmp_path)
    assert first.run_dir != second.run_dir and Path(second.run_dir).parent == Path(first.run_dir).parent
    for callback in (first, second):
        assert len(list(Path(callback.run_dir).glob("events.out.tfevents.*"))) == 1
        assert load_run(callback.run_dir).record("flight").steps == list(range(STEPS))
    # `netdiag report <output_dir>` reads both, and skips the Trainer's own TensorBoard runs beside them
    runs, skipped = load_runs([tmp_path])
    assert sorted(r.path for r in runs) == sorted(Path(c.run_dir) for c in (first, second))  # type: ignore[arg-type]
    assert skipped and set(skipped) == {d for d in (tmp_path / "runs").iterdir() if d.name != "netdiag"}
    assert cli.main(["report", str(tmp_path)]) == 0


def test_without_tensorboard_in_report_to_nothing_is_written(tmp_path):
    hf = with_hf(tmp_path, report_to=())
    assert not (tmp_path / "runs").exists() and len(hf.diag.saturation.history) > 5


def test_bad_arguments_name_what_was_wrong():
    with pytest.raises(ValueError, match="Expected `every_n_steps`"):
        NetDiagCallback(every_n_steps=0)
    with pytest.raises(ValueError, match="among"):  # NetDiag's meters, passed on by name
        NetDiagCallback(fligth=None)
    with pytest.raises(ValueError, match="Expected `saturation` to be True, None or an ActivationMeter"):
        NetDiagCallback(saturation="yes")


def test_the_meters_options_pass_through_to_netdiag(tmp_path):
    from lightning_netdiag.meters import LogitMeter

    logits = LogitMeter(max_calls=2)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH, max_steps=2, logging_steps=1, report_to=[],
        use_cpu=True, save_strategy="no", disable_tqdm=True, remove_unused_columns=False,
    )  # fmt: skip
    callback = NetDiagCallback(flight=None, optimizer_state=False, logits=logits, print_report=False)
    InOrder(model=Clf(), args=args, train_dataset=Rows(), callbacks=[callback]).train()
    diag = callback.diag
    assert diag.flight is None and diag.optimizer_state is None and diag.logits is logits
    assert [m.kind for m in diag.meters] == ["saturation", "grad_data", "update", "logits"]


DIES = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import transformers
from test_hf import Clf, InOrder, Rows, BATCH, LR
from lightning_netdiag.hf import NetDiagCallback


class Dies(Clf):
    calls = 0

    def forward(self, x, labels=None):
        Dies.calls += 1
        if Dies.calls == 5:
            {fault}
        return super().forward(x, labels)


args = transformers.TrainingArguments(
    output_dir={out!r}, per_device_train_batch_size=BATCH, max_steps=20, logging_steps=2, learning_rate=LR,
    report_to=["tensorboard"], use_cpu=True, save_strategy="no", disable_tqdm=True, remove_unused_columns=False,
)
InOrder(model=Dies(), args=args, train_dataset=Rows(), callbacks=[NetDiagCallback()]).train()
"""


@pytest.mark.parametrize(
    ("fault", "returncode", "error"),
    [('raise RuntimeError("the run dies")', 1, "RuntimeError: the run dies"),
     ("os.kill(os.getpid(), signal.SIGTERM)", -15, "SIGTERM")],  # a scheduler's preemption
)  # fmt: skip
def test_a_trainer_run_that_dies_leaves_the_flight_recorders_window(tmp_path, fault, returncode, error):
    # The Trainer tells callbacks of no exception: the window goes out from an atexit hook as the process ends; on
    # SIGTERM from NetDiag's handler, before the signal kills the process.
    import json
    import subprocess
    import sys
    from pathlib import Path

    from lightning_netdiag import tags

    script = DIES.format(tests=str(Path(__file__).parent), out=str(tmp_path), fault=fault)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == returncode, done.stderr[-2000:]
    [run] = (tmp_path / "runs" / "netdiag").iterdir()
    saved = json.loads((run / tags.record_file("netdiag", "flight")).read_text())
    assert saved["steps"] == [0, 1, 2, 3]  # the four steps before the fifth forward
    assert saved["events"][-1]["cause"] == "exception" and saved["events"][-1]["error"] == error
