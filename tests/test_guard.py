"""The flight recorder's guard (``guard=N``): a step whose loss or total gradient norm is an event is not applied,
the weights and the optimizer's state exactly as before it, in every front end; the steps it skipped are logged and
said; more than N in a row stop the run with a fatal verdict; a healthy run is left exactly as without it."""

import contextlib

import lightning as L
import pytest
import torch
from helpers import loader
from test_flight import Mlp, backward
from test_forensics import AT, STEPS, corrupt, lightning, optimizer_for
from torch.nn import functional as F

from lightning_netdiag import FlightRecorder, GuardStopped, NetDiag, report
from lightning_netdiag.meters import FlightMeter


def state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every weight and every tensor of the optimizer's state, copied."""
    held = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return [t.detach().clone() for t in [*model.parameters(), *held]]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def loop(kind: str, guard: int = 0, diag: bool = True, left_out: int | None = None, writer=None):
    """The forensics loop (the fault ``kind`` at step AT); ``diag=False``: a plain loop without netdiag that
    leaves the update of step ``left_out`` out (what the guard should do)."""
    model = Mlp()
    optimizer = optimizer_for(model)
    batches = list(loader(batch_size=32))
    watched = NetDiag(model, optimizer, writer, every_n_steps=50, flight=FlightMeter(guard=guard))
    with watched if diag else contextlib.nullcontext() as d:
        for step in range(STEPS):
            x, y = corrupt(step, *batches[step % len(batches)], kind)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()  # the guard's loss, read here (not told)
            if step != left_out:
                optimizer.step()
    return model, optimizer, d


def test_a_guarded_bad_batch_is_not_applied_weights_and_optimizer_state_exactly():
    model, optimizer, diag = loop("batch", guard=3)
    plain, plain_optimizer, _ = loop("batch", diag=False, left_out=AT)
    assert same(state(model, optimizer), state(plain, plain_optimizer))  # Adam's moments and step count too
    record = diag.flight.record
    assert [s for s in record.steps if record.value("flight_guarded", s) == 1] == [AT]
    (event,) = record.events
    assert (event["step"], event["cause"], event.get("skipped")) == (AT, "loss spike", True)
    (v,) = [v for v in report.summarize(flight=record).verdicts if v.rule.startswith("flight.")]
    assert (v.why, v.step) == ("batch", AT) and "not applied: the guard skipped the step" in v.cause
    assert any(f"the guard skipped 1 step (not applied): {AT}" in n for n in report.summarize(flight=record).notes)


def test_netdiag_report_reads_the_skipped_step_back_from_the_logs(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    from lightning_netdiag import cli

    writer = SummaryWriter(str(tmp_path))
    loop("batch", guard=3, writer=writer)
    writer.close()
    capsys.readouterr()
    cli.main(["report", str(tmp_path)])
    printed = capsys.readouterr().out
    assert f"spike at step {AT}: the batch of step {AT}" in printed
    assert "not applied: the guard skipped the step" in printed
    assert f"the guard skipped 1 step (not applied): {AT}" in printed


def test_a_healthy_run_is_the_same_with_the_guard_as_without():
    model, optimizer, diag = loop("healthy", guard=3)
    plain, plain_optimizer, _ = loop("healthy", diag=False)
    assert same(state(model, optimizer), state(plain, plain_optimizer))
    assert diag.flight.record.events == []
    assert all(diag.flight.record.value("flight_guarded", s) is None for s in diag.flight.record.steps)


def test_more_skips_in_a_row_than_the_guard_allows_stop_the_run_with_a_fatal_verdict():
    model = Mlp()
    optimizer = optimizer_for(model)
    batches = list(loader(batch_size=32))
    with pytest.raises(GuardStopped, match=rf"4 steps in a row \({AT} to {AT + 3}\).*guard=3"):
        with NetDiag(model, optimizer, every_n_steps=50, flight=FlightMeter(guard=3)) as diag:
            for step in range(STEPS):
                x, y = batches[step % len(batches)]
                if step == AT:
                    before = state(model, optimizer)
                loss = F.cross_entropy(model(x * torch.nan if step >= AT else x), y)  # from AT on, poisoned
                optimizer.zero_grad()
                loss.backward()
                diag.loss(loss)
                optimizer.step()
    assert same(state(model, optimizer), before)  # nothing of the poisoned steps was applied
    record = diag.flight.record
    assert [s for s in record.steps if record.value("flight_guarded", s) == 1] == [AT, AT + 1, AT + 2]
    said = [v for v in report.summarize(flight=record).verdicts if v.rule.startswith("flight.")]
    assert said[0].step == AT and said[0].severity == "fatal" and "the guard skipped the step" in said[0].cause
    assert said[-1].severity == "fatal" and "GuardStopped" in said[-1].cause


def test_under_lightning_the_guarded_step_changes_neither_weights_nor_optimizer_state():
    seen: dict[str, list[torch.Tensor]] = {}

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step in (AT, AT + 1):
                seen[f"before {trainer.global_step}"] = state(pl_module, trainer.optimizers[0])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step - 1 in (AT, AT + 1):
                seen[f"after {trainer.global_step - 1}"] = state(pl_module, trainer.optimizers[0])

    flight = FlightRecorder(guard=2)
    lightning(Watch(), flight)
    assert same(seen[f"before {AT}"], seen[f"after {AT}"])  # the bad batch's step: not applied
    assert not same(seen[f"before {AT + 1}"], seen[f"after {AT + 1}"])  # the next: applied
    record = flight.record
    assert [s for s in record.steps if record.value("flight_guarded", s) == 1] == [AT]
    assert record.events[0]["skipped"] is True


def test_the_guard_is_refused_where_it_is_not_a_count():
    for bad in (-1, True, 1.5, "3"):
        with pytest.raises(ValueError, match="Expected `guard` to be the most steps in a row"):
            FlightRecorder(guard=bad)


def test_under_the_hf_trainer_the_guarded_step_changes_neither_weights_nor_optimizer_state(tmp_path):
    transformers = pytest.importorskip("transformers")
    from test_hf import BATCH, Clf, InOrder, Rows

    from lightning_netdiag.hf import NetDiagCallback

    class Corrupted(Clf):
        def forward(self, x, labels=None):
            out = super().forward(x, labels)
            if self.training and self.step == AT:  # the step AT: a loss 20x its band (a garbage batch's)
                out["loss"] = out["loss"] * 20
            return out

    seen: dict[str, list[torch.Tensor]] = {}

    class Watch(transformers.TrainerCallback):
        def on_step_begin(self, args, state_, control, model=None, optimizer=None, **kwargs):
            model.step = state_.global_step
            if state_.global_step in (AT, AT + 1):
                seen[f"before {state_.global_step}"] = state(model, optimizer.optimizer)

        def on_step_end(self, args, state_, control, model=None, optimizer=None, **kwargs):
            if state_.global_step - 1 in (AT, AT + 1):
                seen[f"after {state_.global_step - 1}"] = state(model, optimizer.optimizer)

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH, max_steps=AT + 5, logging_steps=50,
        learning_rate=1e-2, lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no",
        disable_tqdm=True, remove_unused_columns=False, seed=0,
    )  # fmt: skip
    callback = NetDiagCallback(print_report=False, flight=FlightMeter(guard=2))
    InOrder(model=Corrupted(), args=args, train_dataset=Rows(), callbacks=[Watch(), callback]).train()
    assert same(seen[f"before {AT}"], seen[f"after {AT}"])  # the bad batch's step: not applied
    assert not same(seen[f"before {AT + 1}"], seen[f"after {AT + 1}"])
    record = callback.diag.flight.record
    assert [s for s in record.steps if record.value("flight_guarded", s) == 1] == [AT]
    assert any("the guard skipped the step" in v.cause for v in callback.verdicts)


def test_a_healthy_run_resumed_from_a_checkpoint_has_no_event_and_no_skip(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from test_flight import LitMlp

    def fit(steps: int, flight: FlightRecorder, ckpt_path=None) -> None:
        saver = ModelCheckpoint(tmp_path / "ckpt", save_last=True, every_n_train_steps=steps)
        trainer = L.Trainer(max_steps=steps, callbacks=[flight, saver], logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0)  # fmt: skip
        trainer.fit(LitMlp(), loader(batch_size=32), ckpt_path=ckpt_path)

    first, resumed = FlightRecorder(guard=2), FlightRecorder(guard=2)
    fit(120, first)
    fit(STEPS, resumed, ckpt_path=tmp_path / "ckpt" / "last.ckpt")  # its bands begin again from its first step
    assert resumed.record.steps[0] == 120 and resumed.record.steps[-1] == STEPS - 1
    for flight in (first, resumed):
        assert flight.record.events == []
        assert all(flight.record.value("flight_guarded", s) is None for s in flight.record.steps)


def test_weights_unfrozen_mid_run_make_no_event_for_a_while_and_are_noted():
    # blocks.0 frozen until step AT; a garbage batch 2 steps after (in the 16 that follow) is the change's, no
    # event; the same batch 30 steps after is one
    model = Mlp()
    optimizer = optimizer_for(model)
    batches = list(loader(batch_size=32))
    for p in model.blocks[0].parameters():
        p.requires_grad_(False)
    with NetDiag(model, optimizer, every_n_steps=50, flight=FlightMeter(guard=3)) as diag:
        for step in range(AT + 40):
            if step == AT:
                for p in model.blocks[0].parameters():
                    p.requires_grad_(True)
            x, y = batches[step % len(batches)]
            if step in (AT + 2, AT + 30):
                x, y = corrupt(AT, x, y, "batch")
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            diag.loss(loss)
            optimizer.step()
    record = diag.flight.record
    assert [e["step"] for e in record.events] == [AT + 30]
    assert [s for s in record.steps if record.value("flight_guarded", s) == 1] == [AT + 30]
    assert record.value("flight_joined", AT) == 2  # its weight and bias
    notes = report.summarize(flight=record).notes
    assert any(f"2 parameters began training at step {AT} (unfrozen)" in n for n in notes), notes


@pytest.mark.parametrize("guard", [0, 3])
def test_the_guard_and_the_replay_decide_a_step_at_one_host_read(monkeypatch, guard):
    # on a CPU the replay is on by default: its non-finite check and its spike decision, and the guard's, share one
    # read of the step's loss and gradient norm; the verdict after the step is the other read; the spike lines are
    # read again at each refresh of the bands
    import collections
    import inspect
    import os

    import lightning_netdiag
    from lightning_netdiag import spikes

    package, on = os.path.dirname(lightning_netdiag.__file__), [False]
    reads: collections.Counter = collections.Counter()

    def spy(method):
        original = getattr(torch.Tensor, method)

        def wrapper(self, *a, **k):
            caller = inspect.currentframe().f_back.f_code
            if on[0] and caller.co_filename.startswith(package):
                reads[caller.co_name] += 1
            return original(self, *a, **k)

        return wrapper

    for method in ("tolist", "item", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, method, spy(method))
    model = Mlp()
    optimizer = optimizer_for(model)
    batches = list(loader(batch_size=32))
    meters = dict(saturation=None, grad_data=None, update=None, logits=None, optimizer_state=None)
    steps = 8 * spikes.REFRESH
    with NetDiag(model, optimizer, every_n_steps=1000, flight=FlightMeter(guard=guard), **meters) as diag:
        assert diag.flight._calls is not None  # the replay is on
        for step in range(60 + steps):
            on[0] = step >= 60  # the bands are there
            backward(model, diag, *batches[step % len(batches)], optimizer)
            optimizer.step()
        on[0] = False
    assert diag.flight.record.events == []
    assert reads == {"_read": steps, "_resolve": steps, "_is_event": steps // spikes.REFRESH}, reads
