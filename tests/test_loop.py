"""The plain-PyTorch front end (``NetDiag``) gives the numbers the Lightning callbacks give on the same model
and batches: with an optimizer, with the lecture's manual update, under gradient accumulation and AMP with a
GradScaler; it writes them to a SummaryWriter, draws the plots, prints the report and leaves no hook behind."""

import math

import lightning as L
import pytest
import torch
from helpers import all_callbacks, loader, read_tensorboard, trainer
from torch import nn
from torch.nn import functional as F

from lightning_netdiag import FlightRecorder, GradDataRatio, LogitMonitor, NetDiag, OptimizerState
from lightning_netdiag.meters import ActivationMeter

STEPS, EVERY = 6, 2
BACKWARD = torch.Tensor.backward  # as torch defines it: NetDiag wraps it while attached


class Net(L.LightningModule):
    """Linear -> BatchNorm -> Tanh -> Linear -> F.relu -> Linear; a LightningModule, and a plain module alike."""

    def __init__(self, optimizer: str = "adam", lr: float = 0.01) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16, bias=False), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 16))
        self.out = nn.Linear(16, 4)
        with torch.no_grad():
            self.net[0].weight.mul_(3.0)
        self.optimizer, self.lr = optimizer, lr

    def forward(self, x):
        return self.out(F.relu(self.net(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return make_optimizer(self, self.optimizer, self.lr)


def make_optimizer(model: nn.Module, kind: str, lr: float) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)


def histories(meters) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for m in meters:
        for tag in m.history:
            out[tag] = dict(m.history[tag])
    return out


def hist_counts(meters) -> dict[str, dict[int, tuple]]:
    return {tag: {s: h.counts for s, h in m.history.histograms_of(tag)} for m in meters for tag in m.history.histograms}


def with_lightning(tmp_path, optimizer="adam", lr=0.01, **kw):
    callbacks = [*all_callbacks(EVERY), LogitMonitor(every_n_steps=EVERY), OptimizerState(every_n_steps=EVERY)]
    callbacks.append(FlightRecorder())  # every step
    trainer(tmp_path, callbacks, logger=False, max_steps=STEPS, limit_val_batches=0, **kw).fit(
        Net(optimizer, lr), loader()
    )
    return callbacks


def assert_same(loop_meters, lightning_meters, rel=1e-6, loss_seen=True):
    ours, theirs = histories(loop_meters), histories(lightning_meters)
    if not loss_seen:  # under accumulation the loop cannot tell a micro-batch's loss from the step's: none
        theirs.pop("netdiag/init_loss")
    # a batch's fingerprint is of what each front end sees: the model's inputs in the loop, the whole batch (with
    # its labels) under Lightning
    for tags in (ours, theirs):
        tags.pop("netdiag/flight_batch", None)
    assert set(ours) == set(theirs) and len(ours) > 30
    for tag, points in theirs.items():
        assert set(ours[tag]) == set(points), tag
        for step, value in points.items():
            assert math.isclose(ours[tag][step], value, rel_tol=rel, abs_tol=1e-9), (tag, step, ours[tag][step], value)
    assert hist_counts(loop_meters) == hist_counts(lightning_meters)


@pytest.mark.parametrize("tell_loss", [True, False])
def test_an_optimizer_loop_gives_the_lightning_numbers_and_writes_them_to_tensorboard(tmp_path, tell_loss):
    from torch.utils.tensorboard import SummaryWriter

    expected = with_lightning(tmp_path / "pl")
    model = Net()
    optimizer = make_optimizer(model, "adam", 0.01)
    writer = SummaryWriter(tmp_path / "tb")
    with NetDiag(model, optimizer, writer=writer, every_n_steps=EVERY) as diag:
        for i, (x, y) in enumerate(loader()):
            if i == STEPS:
                break
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()  # the flight recorder's loss, read here where it is not told
            if tell_loss:
                diag.loss(loss)
            optimizer.step()
            with torch.no_grad():
                model.eval()
                model(x * 100)  # validation: never counted
                model.train()
    writer.close()
    assert_same(diag.meters, expected)  # the loss at init read where `loss.backward()` is called
    assert diag.update.optimizer_family == "adam" and diag.steps == STEPS
    logged, hists, _ = read_tensorboard(tmp_path / "tb")
    measured = histories(diag.meters)
    assert {t for t in logged if t.startswith("netdiag/")} == set(measured)
    for tag, points in measured.items():  # TensorBoard holds float32
        assert logged[tag] == pytest.approx(points, rel=1e-6, abs=1e-30), tag
    assert "netdiag/act/net.2" in hists and "netdiag/grad/out.weight" in hists
    assert set(diag.plots()) >= {"activations", "activation_gradients", "weight_gradients", "update_ratio"}


def test_the_lectures_manual_update_needs_one_call_and_gives_the_sgd_numbers(tmp_path, capsys):
    expected = with_lightning(tmp_path, "sgd", 0.1)
    model, lr = Net(), 0.1
    diag = NetDiag(model, every_n_steps=EVERY).attach()
    for i, (x, y) in enumerate(loader()):
        if i == STEPS:
            break
        loss = F.cross_entropy(model(x), y)
        for p in model.parameters():
            p.grad = None
        loss.backward()
        diag.step(loss, lr)  # the one added line
        for p in model.parameters():
            p.data += -lr * p.grad
    diag.close()  # measures the last update
    assert_same(diag.meters, expected)
    assert diag.update.optimizer_family == "sgd"
    diag.report()
    assert "netdiag health report" in capsys.readouterr().out


@pytest.mark.parametrize("tell_loss", [True, False])
def test_accumulation_and_a_grad_scaler_as_under_lightning(tmp_path, tell_loss):
    from lightning.pytorch.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    plugin = MixedPrecision("16-mixed", "cpu", scaler)
    expected = with_lightning(tmp_path, plugins=[plugin], accumulate_grad_batches=2)
    model = Net()
    optimizer = make_optimizer(model, "adam", 0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    batches = list(loader())
    with NetDiag(model, optimizer, every_n_steps=EVERY, scaler=scaler) as diag:
        for i in range(STEPS):
            for x, y in batches[2 * i : 2 * i + 2]:
                with torch.autocast("cpu", dtype=torch.float16):
                    loss = F.cross_entropy(model(x), y) / 2
                scaler.scale(loss).backward()  # not told: the sum of the two, unscaled, is the step's loss
                if tell_loss:
                    diag.loss(loss * 2)  # the micro-batch's own loss: the step's is their mean
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
    assert "step" not in vars(scaler) and torch.Tensor.backward is BACKWARD  # the wrappers are gone
    assert_same(diag.meters, expected, rel=1e-5, loss_seen=False)
    assert histories(diag.meters)["netdiag/loss_scale"] == {0: 1024.0, 2: 1024.0, 4: 1024.0}


def test_a_step_the_scaler_skips_is_measured_and_logged_as_skipped():
    model = Net()
    optimizer = make_optimizer(model, "adam", 0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)  # overflows at once
    x, y = next(iter(loader()))
    with NetDiag(model, optimizer, every_n_steps=1, scaler=scaler) as diag:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    h = histories(diag.meters)
    assert h["netdiag/update_skipped"] == {0: 1.0} and diag.steps == 1
    assert any(t.startswith("netdiag/grad_nonfinite/") and v[0] > 0 for t, v in h.items())


def test_hooks_are_gone_after_the_block_even_on_a_crash():
    from torch.nn.modules import module as module_globals
    from torch.overrides import _get_current_function_mode_stack

    model = Net()
    optimizer = make_optimizer(model, "adam", 0.01)
    x, y = next(iter(loader()))
    with pytest.raises(RuntimeError, match="the loop failed"), NetDiag(model, optimizer, every_n_steps=1):
        model(x)
        raise RuntimeError("the loop failed mid-step")
    assert _get_current_function_mode_stack() == []
    assert not module_globals._global_forward_hooks and not module_globals._global_forward_pre_hooks
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


def test_bad_arguments_name_what_was_wrong():
    model = Net()
    with pytest.raises(ValueError, match="Expected `model` to be a torch.nn.Module"):
        NetDiag("model")
    with pytest.raises(ValueError, match="Expected `optimizer`"):
        NetDiag(model, optimizer="adam")
    schedule = torch.optim.lr_scheduler.StepLR(make_optimizer(model, "sgd", 0.1), 10)
    with pytest.raises(ValueError, match="Expected `optimizer`.*a learning-rate scheduler: pass its optimizer"):
        NetDiag(model, schedule)
    with pytest.raises(ValueError, match="Expected `optimizer` to step parameters of `model`, got one that steps none"):
        NetDiag(model, make_optimizer(Net(), "sgd", 0.1))  # another model's: nothing would be measured
    with pytest.raises(ValueError, match="Expected `every_n_steps`"):
        NetDiag(model, every_n_steps=0)
    with pytest.raises(ValueError, match="Expected `writer`"):
        NetDiag(model, writer="runs/")
    with pytest.raises(ValueError, match="Expected `saturation`"):
        NetDiag(model, saturation=GradDataRatio())
    diag = NetDiag(model, make_optimizer(model, "sgd", 0.1))
    with pytest.raises(RuntimeError, match="manual update"):
        diag.step()
    # a configured meter is taken as it is
    assert NetDiag(model, saturation=ActivationMeter(threshold=0.9)).saturation.threshold == 0.9


def test_the_core_and_the_plain_loop_import_no_lightning():
    import subprocess
    import sys

    code = (
        "import sys, lightning_netdiag.loop, lightning_netdiag.meters, lightning_netdiag.report, "
        "lightning_netdiag.plots, lightning_netdiag.history; from lightning_netdiag import NetDiag; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_a_disabled_scaler_is_a_plain_step():
    model = Net()
    optimizer = make_optimizer(model, "adam", 0.01)
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # fp16 without loss scaling
    x, y = next(iter(loader()))
    with NetDiag(model, optimizer, every_n_steps=1, scaler=scaler) as diag:
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        scaler.step(optimizer)
        scaler.update()
    assert diag.steps == 1 and "netdiag/loss_scale" not in diag.grad_data.history
    assert dict(diag.update.history["netdiag/update_skipped"]) == {0: 0.0}


def test_a_step_that_is_not_measured_gets_no_gradient_hook():
    model = Net()
    optimizer = make_optimizer(model, "adam", 0.01)
    x, y = next(iter(loader()))
    with NetDiag(model, optimizer, every_n_steps=2):
        hooked = []
        for _ in range(2):  # step 0 is measured, step 1 is not
            out = model(x)
            hooked.append(bool(out._backward_hooks))
            F.cross_entropy(out, y).backward()
            optimizer.step()
            optimizer.zero_grad()
    assert hooked == [True, False]


def test_a_loss_told_wins_over_the_one_backpropagated_and_backward_is_put_back_after_an_error():
    model = Net()
    optimizer = make_optimizer(model, "sgd", 0.1)
    batches = list(loader())[:4]
    told, backpropagated = {}, {}
    with pytest.raises(RuntimeError, match="the loop died"), NetDiag(model, optimizer, every_n_steps=100) as diag:
        assert torch.Tensor.backward is not BACKWARD
        for step, (x, y) in enumerate(batches):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            backpropagated[step] = loss.item()
            if step % 2:  # told on odd steps only: a different value, which the recorder must take
                diag.loss(loss * 10)
                told[step] = 10 * loss.item()
            optimizer.step()
            optimizer.zero_grad()
        raise RuntimeError("the loop died")
    assert torch.Tensor.backward is BACKWARD
    record = diag.flight.record
    for step in record.steps:
        expected = told.get(step, backpropagated[step])
        assert record.value("flight_loss", step) == pytest.approx(expected, rel=1e-6), step


@pytest.mark.parametrize("mixed", [False, True])
def test_lightning_fabrics_wrappers_give_the_lightning_numbers(tmp_path, mixed):
    # Fabric wraps the model and the optimizer (and, in fp16, scales the loss in `fabric.backward`): NetDiag takes
    # what they wrap, and the scaler from the optimizer's wrapper
    from lightning.fabric import Fabric
    from lightning.fabric.plugins.precision import MixedPrecision as FabricPrecision
    from lightning.pytorch.plugins import MixedPrecision

    def scaler():
        return torch.amp.GradScaler("cpu", init_scale=1024.0)

    expected = with_lightning(tmp_path, **({"plugins": [MixedPrecision("16-mixed", "cpu", scaler())]} if mixed else {}))
    fabric = Fabric(
        accelerator="cpu", devices=1, plugins=[FabricPrecision("16-mixed", "cpu", scaler())] if mixed else None
    )
    net = Net()
    model, optimizer = fabric.setup(net, make_optimizer(net, "adam", 0.01))
    with NetDiag(model, optimizer, every_n_steps=EVERY) as diag:
        assert diag.model is net and diag.optimizers == [optimizer.optimizer]
        assert (diag.scaler is not None) == mixed
        for i, (x, y) in enumerate(loader()):
            if i == STEPS:
                break
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            fabric.backward(loss)  # the loss seen here, unscaled
            optimizer.step()
    assert_same(diag.meters, expected, rel=1e-5 if mixed else 1e-6)
