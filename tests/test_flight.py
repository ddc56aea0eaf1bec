"""The flight recorder: every step's norms equal a direct computation (also under accumulation and a GradScaler),
the ring keeps exactly its last steps, a blow-up injected into one layer is named at its step with that layer
(healthy twin silent), and a run that dies leaves a window that ``netdiag report`` reads as the live report."""

import json
import math
import os
import signal
import subprocess
import sys

import lightning as L
import pytest
import torch
from helpers import loader, trainer
from torch import nn
from torch.nn import functional as F

from lightning_netdiag import (
    FlightRecorder,
    GradDataRatio,
    NetDiag,
    SaturationMonitor,
    UpdateRatio,
    origin,
    plots,
    report,
    spikes,
    tags,
)
from lightning_netdiag.flight.events import named_first
from lightning_netdiag.flight.ring import Ring
from lightning_netdiag.flight.sample import stride
from lightning_netdiag.logs import load_run
from lightning_netdiag.meters import FlightMeter


class Mlp(nn.Module):
    """Four ReLU layers on the helpers' data; ``blocks.2`` is where faults are injected."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Linear(6, 32), nn.Linear(32, 32), nn.Linear(32, 32)])
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = F.relu(block(x))
        return self.head(x)


class LitMlp(L.LightningModule):
    """The Mlp under Lightning with SGD; ``fault(module, step)`` runs as each training step begins."""

    def __init__(self, fault=lambda module, step: None, lr: float = 0.1) -> None:
        super().__init__()
        self.model, self.fault, self.lr = Mlp(), fault, lr

    def training_step(self, batch, batch_idx):
        self.fault(self, self.global_step)
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def direct(
    model: nn.Module, before: dict[str, torch.Tensor], mode: str = "sampled"
) -> dict[str, tuple[float, float, float]]:
    """name -> (gradient, update, weight) norms of every weight, by torch.linalg.vector_norm; the update's from every
    ``stride``-th element of the flat change, scaled to the whole (``mode="exact"``: every element)."""
    out = {}
    for n, p in model.named_parameters():
        if p.dim() >= 2 and p.grad is not None:  # not a frozen one
            change = (p.detach() - before[n]).flatten()
            part = change[:: stride(p.numel(), mode)]
            update = float(torch.linalg.vector_norm(part)) * math.sqrt(change.numel() / part.numel())
            out[n] = (float(torch.linalg.vector_norm(p.grad)), update, float(torch.linalg.vector_norm(p.detach())))
    return out


def backward(model: nn.Module, diag: NetDiag, x: torch.Tensor, y: torch.Tensor, optimizer) -> torch.Tensor:
    """A plain loop's step up to the optimizer's: the forward, the gradients, the loss told to ``diag``."""
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    diag.loss(loss)
    return loss


def assert_row(
    record, step: int, expected: dict[str, tuple[float, float, float]], loss: float, loss_rel: float = 1e-6
) -> None:
    for name, (grad, update, weight) in expected.items():
        assert record.value("flight_grad_norm", step, name) == pytest.approx(grad, rel=1e-5), (step, name)
        assert record.value("flight_update_norm", step, name) == pytest.approx(update, rel=1e-5, abs=1e-12)
        assert record.value("flight_weight_norm", step, name) == pytest.approx(weight, rel=1e-5)
    total = math.sqrt(sum(g * g for g, _, _ in expected.values()))
    assert record.value("flight_grad_total", step) == pytest.approx(total, rel=1e-5)
    assert record.value("flight_loss", step) == pytest.approx(loss, rel=loss_rel)


@pytest.mark.parametrize("mode", ["sampled", "exact"])
def test_every_step_equals_a_direct_computation_and_the_ring_keeps_its_last_steps(mode):
    model = Mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batches = list(loader())
    expected = {}
    with NetDiag(model, optimizer, every_n_steps=100, flight=FlightMeter(window=60, update_norms=mode)) as diag:
        for step in range(90):
            x, y = batches[step % len(batches)]
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            diag.loss(loss)
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            optimizer.step()
            expected[step] = (direct(model, before, mode), float(loss))
    record = diag.flight.record
    assert record.steps == list(range(30, 90))  # no event: the last 60 steps, written when the loop ended
    for step in record.steps:
        assert_row(record, step, *expected[step])
    assert record.events == [] and record.every_n_steps == 1


def test_a_weight_frozen_when_training_begins_is_watched_from_the_step_it_trains():
    # blocks.0 frozen at attach, unfrozen at step U: from U its rows, D3 and D4 equal a direct computation; the
    # rows before keep the other weights' values (the ring is widened, not begun again)
    U = 60
    model = Mlp()
    for p in model.blocks[0].parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batches = list(loader())
    expected, ratios = {}, {}
    with NetDiag(model, optimizer, every_n_steps=10, flight=FlightMeter(window=100)) as diag:
        for step in range(80):
            if step == U:
                for p in model.blocks[0].parameters():
                    p.requires_grad_(True)
            loss = backward(model, diag, *batches[step % len(batches)], optimizer)
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            w = model.blocks[0].weight
            grad_data = None if w.grad is None else float(w.grad.std() / w.detach().std())
            optimizer.step()
            expected[step] = (direct(model, before), float(loss))
            if grad_data is not None:
                change = w.detach() - before["blocks.0.weight"]
                ratios[step] = (grad_data, math.log10(change.std() / before["blocks.0.weight"].std()))
    record = diag.flight.record
    assert record.steps == list(range(80)) and record.events == []
    for step in record.steps:
        assert_row(record, step, *expected[step])
    for step in (U - 1, U):  # the batch's fingerprint kept across the widening too: its sum + 1e-3 its squares
        x = batches[step % len(batches)][0].double()
        assert record.value("flight_batch", step) == pytest.approx(float(x.sum() + 1e-3 * x.square().sum()), rel=1e-6)
    assert record.value("flight_grad_norm", U - 1, "blocks.0.weight") is None
    assert record.value("flight_grad_norm", U, "blocks.0.weight") > 0
    assert record.value("flight_joined", U) == 2  # its weight and bias
    grad_data, update = diag.grad_data.record, diag.update.record
    assert grad_data.value("grad_data_ratio", 50, "blocks.0.weight") is None
    assert update.value("update_data_log10", 50, "blocks.0.weight") is None
    for step in (60, 70):
        assert grad_data.value("grad_data_ratio", step, "blocks.0.weight") == pytest.approx(ratios[step][0], rel=1e-5)
        assert update.value("update_data_log10", step, "blocks.0.weight") == pytest.approx(ratios[step][1], abs=1e-5)


class Finetuned(L.LightningModule):
    """A backbone and a head, the optimizer over the trainable parameters, as Lightning's BackboneFinetuning wants."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.head = nn.Linear(32, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(self.backbone(x)), y)

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-3)


def test_under_lightning_a_backbone_unfrozen_by_backbone_finetuning_is_watched_from_then(tmp_path):
    # Lightning's BackboneFinetuning freezes the backbone before training and adds it to the optimizer at epoch 1
    # (step 16: 16 batches an epoch)
    from lightning.pytorch.callbacks import BackboneFinetuning

    gd, ud, flight = GradDataRatio(every_n_steps=1), UpdateRatio(every_n_steps=1), FlightRecorder()
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1)
    trainer(tmp_path, [finetuning, gd, ud, flight], max_steps=32, logger=False).fit(Finetuned(), loader())
    for metric, record in (("grad_data_ratio", gd.record), ("update_data_log10", ud.record),
                           ("flight_grad_norm", flight.record), ("flight_update_norm", flight.record)):  # fmt: skip
        steps = [s for s, _ in record.points(metric, "backbone.0.weight")]
        assert steps == list(range(16, 32)), metric
        assert [s for s, _ in record.points(metric, "head.weight")] == list(range(32)), metric
    assert flight.record.value("flight_joined", 16) == 4  # the backbone's two weights and two biases
    assert flight.record.events == []


def test_accumulation_and_a_grad_scaler_unscaled_with_the_skipped_step_recorded():
    model = Mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    batches = list(loader())
    expected, by_scaler = {}, []
    with NetDiag(model, optimizer, every_n_steps=100, scaler=scaler) as diag:
        for step in range(6):
            for x, y in batches[2 * step : 2 * step + 2]:
                with torch.autocast("cpu", dtype=torch.float16):
                    loss = F.cross_entropy(model(x), y) / 2
                scaler.scale(loss).backward()
                diag.loss(loss * 2)
            losses = [float(F.cross_entropy(model(x), y)) for x, y in batches[2 * step : 2 * step + 2]]
            scale = scaler.get_scale()
            grads = {n: p.grad.detach() / scale for n, p in model.named_parameters() if p.dim() >= 2}
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            scaler.step(optimizer)
            scaler.update()
            if scaler.get_scale() < scale:  # it found inf or NaN (a bias's gradient, not watched) and skipped
                by_scaler.append(step)
            norms = direct(model, before)
            optimizer.zero_grad()
            expected[step] = {n: (float(torch.linalg.vector_norm(grads[n])), *norms[n][1:]) for n in norms}
            expected[step] = (expected[step], sum(losses) / 2)
    record = diag.flight.record
    skipped = [s for s in record.steps if record.value("flight_skipped", s) == 1]
    assert skipped == by_scaler and 0 in skipped  # a scale of 2**20 overflows fp16 at first
    assert all(record.value("flight_update_total", s) == 0 for s in skipped)
    for step in record.steps:
        grads, loss = expected[step]
        assert_row(record, step, grads, loss, loss_rel=2e-3)  # the loss under autocast, unscaled norms
    assert record.events == []  # a loss scaler's skipped steps are no event


def train(
    tmp_path,
    model: nn.Module,
    optimizer,
    front: str,
    steps: int,
    fault,
    flight: FlightMeter | bool = True,
    also=(),
    writer=None,
):
    """``model`` on the helpers' data for ``steps`` steps through ``front`` ("loop", "manual": the lecture's update
    by hand, at SGD's rate, or "lightning"), ``fault(step)`` called as each step begins. Returns the flight record and
    the steps D3 measured (every 50). ``flight``: NetDiag's flight recorder and ``writer`` its SummaryWriter (the loop
    fronts); ``also``: callbacks after the recorder (Lightning)."""
    batches = list(loader(batch_size=32))
    if front in ("loop", "manual"):
        manual, lr = front == "manual", optimizer.param_groups[0]["lr"]
        with NetDiag(model, None if manual else optimizer, writer, every_n_steps=50, flight=flight) as diag:
            for step in range(steps):
                fault(step)
                x, y = batches[step % len(batches)]
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                if manual:
                    diag.step(loss, lr)
                    with torch.no_grad():
                        for p in model.parameters():
                            p -= lr * p.grad
                else:
                    diag.loss(loss)
                    optimizer.step()
        return diag.flight.record, diag.grad_data.record.steps

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            fault(self.global_step)
            x, y = batch
            return F.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return optimizer

    recorder, grad_data = FlightRecorder(), GradDataRatio(every_n_steps=50)
    data = torch.utils.data.DataLoader(batches * steps, batch_size=None)
    callbacks = [recorder, grad_data, *also]
    trainer(tmp_path, callbacks, logger=False, max_steps=steps, limit_val_batches=0).fit(Module(), data)
    return recorder.record, grad_data.record.steps


def train_with_fault(tmp_path, lr_factor: float, front: str, steps: int = 160, at: int = 100):
    """AdamW; from step ``at`` the rate of ``blocks.2`` (a parameter group of its own) multiplied by ``lr_factor``."""
    model = Mlp()
    layer = [p for n, p in model.named_parameters() if n.startswith("blocks.2")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("blocks.2")]
    optimizer = torch.optim.AdamW([{"params": rest}, {"params": layer}], lr=3e-3)

    def fault(step: int) -> None:
        if step == at:
            optimizer.param_groups[1]["lr"] *= lr_factor

    return train(tmp_path, model, optimizer, front, steps, fault)


@pytest.mark.parametrize("front", ["loop", "lightning"])
def test_a_layer_whose_rate_jumps_is_named_at_its_step_and_its_healthy_twin_is_silent(tmp_path, front):
    healthy, measured = train_with_fault(tmp_path / "healthy", 1.0, front)
    assert healthy.events == [] and measured == [0, 50, 100, 150]
    faulty, measured = train_with_fault(tmp_path / "faulty", 1000.0, front)
    first = faulty.events[0]
    assert first["step"] + 1 in measured  # the step after the event measured in full
    assert first["step"] in (100, 101) and first["cause"] in ("gradient spike", "loss spike", "weight spike"), first
    layer = "model.blocks.2.weight" if front == "lightning" else "blocks.2.weight"
    assert first["began"][0]["name"] == layer and first["began"][0]["step"] == 100, first
    verdicts = report.summarize(flight=faulty).verdicts
    assert verdicts[0].check == first["cause"] and verdicts[0].layer.startswith(layer)
    assert "blocks.2.weight" in verdicts[0].cause and f"step {first['step']}" in verdicts[0].cause
    figure = plots.draw_all(flight=faulty)["flight"]
    assert f"step {first['step']}" in figure.axes[1].get_title()


def train_dividing(tmp_path, front: str, at: int = 30, steps: int = 40, flight: FlightMeter | bool = True, also=()):
    """SGD; from step ``at`` the output of ``blocks.1`` divided by zero (a hook of the model's, registered before any
    of ours). Returns the flight record."""
    model = Mlp()
    on = [False]
    model.blocks[1].register_forward_hook(lambda m, i, out: out / torch.zeros_like(out) if on[0] else None)

    def fault(step: int) -> None:
        on[0] = step >= at

    return train(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1), front, steps, fault, flight, also)[0]


@pytest.mark.parametrize("front", ["loop", "manual", "lightning"])
def test_a_module_that_makes_a_nan_in_the_forward_is_named_by_replaying_the_step(tmp_path, front):
    record = train_dividing(tmp_path, front)
    first = record.events[0]
    assert first["step"] == 30 and first["cause"] in ("non-finite loss", "non-finite gradients"), first
    layer = "model.blocks.1" if front == "lightning" else "blocks.1"
    assert first["made"] == {"in": origin.FORWARD, "module": layer}, first
    assert named_first(first) == layer
    verdict = report.summarize(flight=record).verdicts[0]
    assert verdict.severity == "fatal" and verdict.layer.startswith(layer)
    assert f"made in the forward of {layer} " in verdict.cause


@pytest.mark.parametrize("fault", ["scale", "divide"])
def test_a_float16_overflow_in_the_forward_is_told_from_a_division_by_zero(fault):
    # fp16 autocast, no loss scaler. "scale": at step 30 blocks.1's weight x1e6, its output past float16's range, finite
    # in float32; "divide": its output divided by zero, not finite in float32 either
    model = Mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    on = [False]
    if fault == "divide":
        model.blocks[1].register_forward_hook(lambda m, i, out: out / torch.zeros_like(out) if on[0] else None)
    batches = list(loader())
    with NetDiag(model, optimizer, every_n_steps=100) as diag:
        for step in range(40):
            if step == 30:
                on[0] = True
                if fault == "scale":
                    with torch.no_grad():
                        model.blocks[1].weight.mul_(1e6)
            x, y = batches[step % len(batches)]
            if step == 30:  # the largest output of blocks.1 in float32, directly
                with torch.no_grad():
                    largest = float(model.blocks[1](F.relu(model.blocks[0](x))).abs().max())
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            diag.loss(loss)
            optimizer.step()
    first = diag.flight.record.events[0]
    assert first["step"] == 30 and first["made"]["module"] == "blocks.1", first
    (verdict,) = [v for v in report.summarize(flight=diag.flight.record).verdicts if v.rule == "flight.non-finite"]
    if fault == "scale":
        assert origin.FLOAT16_MAX < first["made"]["overflow"] == pytest.approx(largest, rel=1e-3)
        assert verdict.why == "overflow" and "float16 output overflowed" in verdict.cause
        assert "bfloat16" in verdict.advice
    else:
        assert "overflow" not in first["made"] and verdict.why == ""
        assert "(the first module whose output was not finite)" in verdict.cause


def test_the_replay_is_not_measured_by_the_other_callbacks(tmp_path):
    # The recorder's hook before SaturationMonitor's flush: after the backward D1 still records (a manual
    # accumulation's next forward would count), and the replay's forward would be counted into the step's record.
    saturation = SaturationMonitor(every_n_steps=1)
    train_dividing(tmp_path, "lightning", also=[saturation])
    counts = {step: float(sum(h.counts)) for step, h in saturation.record.histograms_of("act", "model/relu")}
    assert counts[29] == counts[30] == 32 * 32  # one forward's batch x units, the event's step too


def test_asked_not_to_replay_the_recorder_names_the_step_alone(tmp_path):
    first = train_dividing(tmp_path, "loop", flight=FlightMeter(replay=False)).events[0]
    assert first["step"] == 30 and "made" not in first


def test_the_replay_names_the_module_the_inputs_or_the_backward_and_restores_the_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))
    calls = origin.ForwardCalls(model)
    x = torch.randn(16, 4)
    model(x).sum().backward()
    assert len(calls.calls) == 1 and calls.calls[0][0] is model
    running, rng = model[1].running_mean.clone(), torch.get_rng_state()
    assert origin.where_nonfinite(calls) == {"in": origin.NOT_FORWARD}
    assert torch.equal(model[1].running_mean, running) and torch.equal(torch.get_rng_state(), rng)
    with torch.no_grad():
        model[3].weight[0, 0] = math.inf  # the last layer makes the first non-finite value
    assert origin.where_nonfinite(calls) == {"in": origin.FORWARD, "module": "3"}
    calls.step_done()
    assert calls.calls == [] and len(calls._children) == 0  # the model itself is called: its children not watched
    model(torch.full((16, 4), math.nan))
    assert origin.where_nonfinite(calls) == {"in": origin.INPUTS}
    with torch.no_grad():
        model(x)  # an evaluation is not kept
    assert len(calls.calls) == 1
    for _ in range(origin.MAX_CALLS):  # a loop whose steps are never seen: the inputs are not held without end
        model(x)
    assert len(calls.calls) == origin.MAX_CALLS and origin.where_nonfinite(calls) is None
    calls.remove()
    assert origin.where_nonfinite(calls) is None  # nothing kept


def test_the_spike_score_is_the_robust_z_of_a_direct_computation():
    history = torch.tensor([[1.0, 2.0], [1.1, 2.0], [0.9, 2.2], [1.0, math.nan]] * 17, dtype=torch.float64)
    row = torch.tensor([2.0, 2.1], dtype=torch.float64)
    z = spikes.band_scores(history, row)
    for col in range(2):
        values = history[:, col][~history[:, col].isnan()]
        median = values.median()  # torch's lower median, as nanmedian's
        mad = (values - median).abs().median() * 1.4826
        assert z[col] == pytest.approx(float((row[col] - median) / max(float(mad), spikes.FLOOR)))
    assert spikes.band_scores(history[:40], row).isnan().all()  # fewer than MIN_BAND steps: no score


def test_the_live_threshold_is_the_inverse_of_the_score():
    """What the recorder compares each step with (`over`, raw values) says what the score says (decades)."""
    g = torch.Generator().manual_seed(0)
    raw = torch.rand(64, 6, generator=g, dtype=torch.float64).mul(3).exp()
    raw[:20, 5] = math.nan  # 44 finite steps: no band, nothing is over
    levels = torch.tensor([7.0, 7.0, 12.0, 12.0, 1.0, 7.0], dtype=torch.float64)
    upper = spikes.over(raw, levels)
    assert upper[5].isnan()
    for row in raw[1:40] * torch.logspace(-1, 3, 39, dtype=torch.float64)[:, None]:
        z = spikes.band_scores(spikes.decades(raw), spikes.decades(row))
        assert torch.equal(row > upper, z > levels)
    inf = torch.full((6,), math.inf, dtype=torch.float64)
    assert (inf > upper)[:5].all()  # an infinite value is over (the recorder says it once, as non-finite)
    assert not (torch.full((6,), math.nan, dtype=torch.float64) > upper).any()


CRASHING = """
import sys, torch
from torch import nn
from torch.nn import functional as F
from torch.utils.tensorboard import SummaryWriter
sys.path.insert(0, {tests!r})
from test_flight import Mlp
from helpers import loader
from lightning_netdiag import NetDiag

model = Mlp()
layer = [p for n, p in model.named_parameters() if n.startswith("blocks.2")]
rest = [p for n, p in model.named_parameters() if not n.startswith("blocks.2")]
optimizer = torch.optim.AdamW([{{"params": rest}}, {{"params": layer}}], lr=3e-3)
batches = list(loader(batch_size=32))
with NetDiag(model, optimizer, writer=SummaryWriter({logs!r}), every_n_steps=50) as diag:
    for step in range(200):
        if step == 100:
            optimizer.param_groups[1]["lr"] *= 1000
        x, y = batches[step % len(batches)]
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        diag.loss(loss)
        optimizer.step()
        if step == 120:
            print(diag.report(print_table=False)[0].cause, flush=True)
            raise RuntimeError("the run dies")
"""


def test_a_run_that_dies_leaves_a_window_that_netdiag_report_reads_as_the_live_report(tmp_path):
    from pathlib import Path

    logs = tmp_path / "run"
    script = CRASHING.format(tests=str(Path(__file__).parent), logs=str(logs))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 1 and "the run dies" in done.stderr
    live = done.stdout.strip().splitlines()[-1]  # the live report's first verdict, just before the crash
    saved = json.loads((logs / tags.record_file("netdiag", "flight")).read_text())
    assert [e["cause"] for e in saved["events"]][-1] == "exception"
    run = load_run(logs)
    assert run.record("flight").events == saved["events"]
    out = subprocess.run([sys.executable, "-m", "lightning_netdiag.cli", "report", str(logs)], capture_output=True,
                         text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert live in out.stdout.replace("\n         ", " ") or live.split(":")[0] in out.stdout
    assert "run ended by an exception" in out.stdout and "RuntimeError: the run dies" in out.stdout
    assert "blocks.2.weight" in out.stdout and "step 10" in out.stdout


KILLED = """
import json, os, signal, sys, torch
from torch.nn import functional as F
from torch.utils.tensorboard import SummaryWriter
sys.path.insert(0, {tests!r})
from test_flight import Mlp
from helpers import loader
from lightning_netdiag import NetDiag
from lightning_netdiag.meters import FlightMeter

model = Mlp()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
batches = list(loader(batch_size=32))
diag = NetDiag(model, optimizer, writer=SummaryWriter({logs!r}), every_n_steps=50,
               flight=FlightMeter(save_interval={interval}))
if {inside}:  # the signal comes while NetDiag is inside the recorder (its row of the step half written)
    after_step = FlightMeter.after_step

    def signalled(self, optimizer, logging=True):
        if self._step == 120:
            os.kill(os.getpid(), signal.{sig})
        after_step(self, optimizer, logging)

    FlightMeter.after_step = signalled
with diag:
    for step in range(200):
        x, y = batches[step % len(batches)]
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        diag.loss(loss)
        grads = {{n: float(torch.linalg.vector_norm(p.grad)) for n, p in model.named_parameters() if p.dim() == 2}}
        optimizer.step()
        if step == 100:  # a logging step: the last save before the end
            print(json.dumps([float(loss), grads]), flush=True)
        if step == 120 and not {inside}:  # SIGKILL: no exception, no atexit, as the out-of-memory killer does
            os.kill(os.getpid(), signal.{sig})  # SIGTERM: a scheduler's
"""


@pytest.mark.parametrize(
    ("sig", "interval", "inside"),
    [("SIGKILL", 0, False), ("SIGKILL", None, False), ("SIGTERM", None, False), ("SIGTERM", None, True)],
)
def test_a_run_killed_without_a_word_leaves_the_steps_up_to_its_last_save(tmp_path, sig, interval, inside):
    from pathlib import Path

    logs = tmp_path / "run"
    script = KILLED.format(tests=str(Path(__file__).parent), logs=str(logs), interval=interval, sig=sig, inside=inside)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == -getattr(signal, sig), done.stderr  # killed by it, as without the recorder
    saved = logs / tags.record_file("netdiag", "flight")
    if sig == "SIGKILL" and interval is None:  # saved only at events and the end: a healthy run killed leaves none
        assert not saved.exists()
        return
    loss, grads = json.loads(done.stdout.strip().splitlines()[-1])
    flight = load_run(logs).record("flight")
    if sig == "SIGTERM":  # caught: every step up to the one it came in (whole), and the stop, said as no fault
        assert flight.steps == list(range(121)) and [e["error"] for e in flight.events] == ["SIGTERM"]
        assert math.isfinite(flight.value("flight_loss", 120)) and flight.events[0]["step"] == 120
        out = subprocess.run([sys.executable, "-m", "lightning_netdiag.cli", "report", str(logs)],
                             capture_output=True, text=True)  # fmt: skip
        assert "training stopped after step 120 (SIGTERM)" in out.stdout and "FATAL" not in out.stdout, out.stdout
        return
    # saved at every logging step (0, 50, 100: never between them, where nothing else waits for the device)
    assert flight.steps == list(range(101)) and flight.events == []
    assert flight.value("flight_loss", 100) == pytest.approx(loss, rel=1e-6)
    for name, norm in grads.items():
        assert flight.value("flight_grad_norm", 100, name) == pytest.approx(norm, rel=1e-5)
    out = subprocess.run([sys.executable, "-m", "lightning_netdiag.cli", "report", str(logs)], capture_output=True,
                         text=True)  # fmt: skip
    assert out.returncode == 0 and "flight recorder: 101 steps kept" in out.stdout, out.stderr


def test_an_error_that_leaves_the_device_unreadable_keeps_the_last_save_and_raises_alone(tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    def unreadable(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def fault(step):
        if step == 55:  # a CUDA error breaks the context: every later read of the device raises too
            monkeypatch.setattr(Ring, "read", unreadable)
            raise RuntimeError("CUDA error: device-side assert triggered")

    model = Mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    flight, writer = FlightMeter(save_interval=0), SummaryWriter(tmp_path)
    with pytest.raises(RuntimeError, match="device-side assert") as caught:
        train(tmp_path, model, optimizer, "loop", 60, fault, flight, writer=writer)
    assert caught.value.__context__ is None  # the user's error, alone: nothing of ours raised while it passed
    flight = load_run(tmp_path).record("flight")
    assert flight.steps == list(range(51))  # as last saved, at the logging step 50
    [event] = flight.events
    assert (
        event["step"] == 54 and event["unread"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    )
    [ended] = report.summarize(flight=flight).verdicts
    assert ended.check == "run ended by an exception" and "CUDA_LAUNCH_BLOCKING=1" in ended.advice
    assert ended.cause.startswith("training ended after step 54 (RuntimeError: CUDA error: device-side assert")
    assert "the device could not be read after it" in ended.cause


def test_sigterm_is_caught_only_while_attached_and_never_over_a_handler_already_there():
    model = Mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with NetDiag(model, optimizer):
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        with NetDiag(model, optimizer, flight=None):  # nothing to write out
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

        def mine(signum, frame):  # the user's own way out
            pass

        signal.signal(signal.SIGTERM, mine)
        with NetDiag(model, optimizer):
            assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_forked_child_ended_by_sigterm_writes_nothing(tmp_path):
    import multiprocessing
    import time

    from torch.utils.tensorboard import SummaryWriter

    model = Mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with NetDiag(model, optimizer, writer=SummaryWriter(tmp_path), flight=FlightMeter(save_interval=None)):
            F.cross_entropy(model(torch.randn(8, 6)), torch.zeros(8, dtype=torch.long)).backward()
            optimizer.step()  # a step in the ring: a stale copy of it in the child
            fork = multiprocessing.get_context("fork")
            for wait in (True, False):  # ended while it runs, and as it starts (before Python's reset in it)
                started = fork.Event()

                def work(started=started):
                    started.set()
                    time.sleep(60)

                child = fork.Process(target=work)
                child.start()
                assert not wait or started.wait(30)
                child.terminate()  # SIGTERM, as a pool ends its workers
                child.join(30)
                assert child.exitcode == -signal.SIGTERM, wait
                assert not (tmp_path / tags.record_file("netdiag", "flight")).exists()  # the child wrote nothing
    finally:
        signal.signal(signal.SIGTERM, before)


def test_under_lightning_the_window_is_saved_at_logging_steps_only(tmp_path):
    from pathlib import Path

    class Peek(L.Callback):  # after the recorder: what a run killed now would leave
        saved: dict[int, list[int]] = {}

        def on_train_batch_end(self, trainer, *args) -> None:
            path = Path(trainer.log_dir) / tags.record_file("netdiag", "flight")
            self.saved[trainer.global_step - 1] = json.loads(path.read_text())["steps"] if path.exists() else []

    trainer(tmp_path, [FlightRecorder(save_interval=0), Peek()], max_steps=25, log_every_n_steps=10).fit(
        LitMlp(), loader()
    )
    assert Peek.saved[9] == list(range(1)) and Peek.saved[10] == Peek.saved[19] == list(range(11))
    assert Peek.saved[20] == list(range(21))


def test_a_run_its_user_stops_is_no_fault(tmp_path):
    def fault(step):
        if step == 3:
            raise KeyboardInterrupt  # Ctrl-C in the loop

    model, flight = Mlp(), FlightMeter()
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1), "loop", 10, fault, flight)
    assert flight.events[-1]["error"] == "KeyboardInterrupt"  # said by its type: it has no message
    # nothing was out of its band: no verdict, a note
    summary = report.summarize(flight=flight.record)
    assert summary.verdicts == []
    assert "training stopped after step 2 (KeyboardInterrupt)" in summary.notes[-1]


@pytest.mark.parametrize("how", ["KeyboardInterrupt", "SIGTERMException"])
def test_a_lightning_run_stopped_while_it_blows_up_gets_a_warning_naming_where(tmp_path, how):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    def fault(module, step):
        if step == 70:
            with torch.no_grad():
                module.model.blocks[2].weight.mul_(100)  # what the user saw blow up
        if step == 72:
            if how == "KeyboardInterrupt":
                raise KeyboardInterrupt  # and stopped with Ctrl-C
            os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's: Lightning raises it after this step

    recorder = FlightRecorder()
    handler = signal.getsignal(signal.SIGINT)
    try:  # Lightning's ways out: SystemExit after a Ctrl-C, its own exception after SIGTERM
        with pytest.raises(SystemExit if how == "KeyboardInterrupt" else SIGTERMException):
            trainer(tmp_path, [recorder], max_steps=100).fit(LitMlp(fault, lr=0.05), loader())
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores Ctrl-C after one
    stop = recorder.events[-1]
    at = 71 if how == "KeyboardInterrupt" else 72  # the step Ctrl-C came in did not complete; SIGTERM's did
    assert stop["step"] == at and stop["error"] == how
    [*_, stopped] = report.summarize(flight=recorder.record).verdicts
    assert (stopped.severity, stopped.check) == ("warning", "run stopped")
    assert stopped.layer.startswith("model.blocks.2.weight")
    assert stopped.cause.startswith(f"training stopped after step {at} ({how}): out of its band")


def test_a_lightning_run_that_dies_keeps_its_window_in_tensorboard_and_beside_it(tmp_path):
    def fault(module, step):
        if step == 70:
            raise ValueError("a bad batch")

    from lightning.pytorch.loggers import TensorBoardLogger

    recorder = FlightRecorder(window=60)
    logger = TensorBoardLogger(tmp_path, name="run")
    with pytest.raises(ValueError, match="a bad batch"):
        trainer(tmp_path, [recorder], logger=logger, max_steps=100).fit(LitMlp(fault), loader())
    event = recorder.events[-1]
    assert event["cause"] == "exception" and event["step"] == 69 and "ValueError: a bad batch" in event["error"]
    run = load_run(load_dir := __import__("pathlib").Path(logger.log_dir))
    assert (load_dir / tags.record_file("netdiag", "flight")).exists()
    assert run.record("flight").steps == list(range(10, 70)) == recorder.record.steps
    grads = dict(recorder.record.points("flight_grad_norm", "model.head.weight"))
    # TensorBoard holds float32: the record written whole holds the exact values
    assert dict(run.record("flight").points("flight_grad_norm", "model.head.weight")) == grads
    # a healthy run ended by a bad batch: the report names no layer and sends the reader to the error
    [ended] = report.evaluate(flight=run.record("flight"))
    assert ended.check == "run ended by an exception" and ended.hits == 0
    assert (
        ended.cause
        == "training ended after step 69 (ValueError: a bad batch): every watched series was within its band"
    )
    assert "the error, not the training's numbers" in ended.advice
    assert report.format_table([ended]).splitlines()[2].split()[:7] == [
        "FATAL",
        *"run ended by an exception".split(),
        "-",
    ]


def test_bad_arguments_name_what_was_wrong():
    with pytest.raises(ValueError, match="Expected `window` to be a positive integer"):
        FlightRecorder(window=0)
    with pytest.raises(ValueError, match="Expected `window` to be more than 50 steps"):
        FlightRecorder(window=10)
    with pytest.raises(ValueError, match="`replay` to be None, True or False"):
        FlightRecorder(replay="yes")
    with pytest.raises(ValueError, match="Expected `flight` to be True, None or a FlightMeter"):
        NetDiag(Mlp(), flight="yes")
    for interval in (-1, "30", True, math.nan):
        with pytest.raises(ValueError, match="Expected `save_interval` to be None or a number of seconds >= 0"):
            FlightMeter(save_interval=interval)


def test_the_update_norms_sample_holds_1_percent_and_estimates_the_exact_norm():
    """GPT-2 (transformers, random weights) under AdamW: the default keeps 1 % of the watched weights' bytes across
    the step, and its update norms are those of a full copy within a few per cent (docs/flight-recorder.md)."""
    transformers = pytest.importorskip("transformers")

    def run(mode: str) -> tuple[dict, float]:
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=512, n_positions=64)
        model = transformers.GPT2LMHeadModel(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        flight = FlightMeter(window=60, update_norms=mode)
        g = torch.Generator().manual_seed(1)
        with NetDiag(model, optimizer, every_n_steps=100, flight=flight):
            for _ in range(8):
                x = torch.randint(0, 512, (4, 64), generator=g)
                loss = model(x, labels=x).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                held = sum(t.numel() * t.element_size() for t in flight._snapshot)
                watched = sum(p.numel() * p.element_size() for _, p in flight._params)
        record = flight.record
        norms = {(s, n): record.value("flight_update_norm", s, n) for s in record.steps for n in flight._names}
        return norms, held / watched

    sampled, share = run("sampled")
    exact, full = run("exact")
    assert full == 1.0 and share <= 0.011, share  # 1 %, and at least 256 elements of the smallest weights
    errors = sorted(abs(sampled[k] / exact[k] - 1) for k in exact)
    assert errors[len(errors) // 2] < 0.02 and errors[-1] < 0.1, (errors[len(errors) // 2], errors[-1])
