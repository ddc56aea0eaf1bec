"""Bad arguments, nothing to watch, frozen parameters, no logger, NaN/Inf, in-place and input-side activations."""

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from helpers import TinyNet, loader, read_tensorboard, trainer
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from lightning_netdiag import GradDataRatio, SaturationMonitor, UpdateRatio


@pytest.mark.parametrize(
    ("cls", "kwargs", "arg"),
    [
        (SaturationMonitor, {"every_n_steps": 0}, "every_n_steps"),
        (GradDataRatio, {"every_n_steps": -3}, "every_n_steps"),
        (UpdateRatio, {"every_n_steps": 2.5}, "every_n_steps"),
        (SaturationMonitor, {"every_n_steps": True}, "every_n_steps"),
        (SaturationMonitor, {"threshold": 0.0}, "threshold"),
        (SaturationMonitor, {"threshold": 1.0}, "threshold"),
        (SaturationMonitor, {"threshold": "0.9"}, "threshold"),
        (SaturationMonitor, {"modules": [3]}, "modules"),
        (SaturationMonitor, {"modules": [nn.Tanh()]}, "modules"),
        (SaturationMonitor, {"modules": [int]}, "modules"),
        (SaturationMonitor, {"exclude": [None]}, "exclude"),
        (SaturationMonitor, {"unit_dim": "last"}, "unit_dim"),
        (GradDataRatio, {"params": [1.5]}, "params"),
        (GradDataRatio, {"ndims": 2}, "ndims"),
        (UpdateRatio, {"ndims": [-1]}, "ndims"),
        (UpdateRatio, {"target": math.inf}, "target"),
        (UpdateRatio, {"history_size": 0}, "history_size"),
        (GradDataRatio, {"prefix": ""}, "prefix"),
        (GradDataRatio, {"prefix": "/diag"}, "prefix"),
    ],
)
def test_bad_arguments_raise_naming_argument_and_value(cls, kwargs, arg):
    with pytest.raises(ValueError, match=f"`{arg}`") as err:
        cls(**kwargs)
    value = kwargs[arg]
    bad = value[0] if isinstance(value, list) and arg not in ("ndims",) else value
    assert f"got {bad!r}" in str(err.value)


def test_selection_by_type_and_glob_with_excludes(tmp_path):
    model = TinyNet()
    sat = SaturationMonitor(modules=["net.*"], exclude=[nn.Linear, nn.BatchNorm1d, "net.4"], every_n_steps=1)
    gd = GradDataRatio(params=[nn.Linear], exclude=["net.5.*"], ndims=None, every_n_steps=1)
    trainer(tmp_path, [sat, gd], max_steps=1, logger=False).fit(model, loader())
    # the layers its tags name (its step-level tag, the median loss, names none)
    assert {t.split("/")[-1] for t in sat.history if t.count("/") == 2} == {"net.2"}
    assert "netdiag/loss_median" in sat.history
    assert {t.split("/")[-1] for t in gd.history} == {"net.0.weight", "net.3.weight", "net.3.bias"}


class NoActivations(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.lin(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_nothing_selected_warns_once_and_training_goes_on(tmp_path):
    cbs = [SaturationMonitor(every_n_steps=1), GradDataRatio(params=["nope.*"], every_n_steps=1)]
    t = trainer(tmp_path, cbs, max_steps=3, logger=False)
    with pytest.warns(UserWarning) as record:
        t.fit(NoActivations(), loader())
    messages = sorted(str(w.message) for w in record if "found no" in str(w.message))
    assert len(messages) == 2  # once each, although every step is a logging step
    assert "GradDataRatio found no parameters" in messages[0] and "nope.*" in messages[0]
    assert "SaturationMonitor found no activation modules" in messages[1]
    assert "every activation" in messages[1] and "no functional activation calls" in messages[1]
    assert t.global_step == 3 and len(cbs[0].history) == 0 and len(cbs[1].history) == 0


def test_frozen_and_gradless_parameters_are_skipped_and_history_works_without_logger(tmp_path):
    model = TinyNet()
    model.net[0].weight.requires_grad_(False)
    model.extra = nn.Linear(3, 3)  # never used: no gradient
    gd, ud = GradDataRatio(every_n_steps=1), UpdateRatio(every_n_steps=1)
    trainer(tmp_path, [gd, ud], max_steps=2, logger=False).fit(model, loader())
    names = {t.split("/")[-1] for t in gd.history}
    assert names == {"net.3.weight", "net.5.weight"}
    assert {t.split("/")[-1] for t in ud.history if "update_data" in t} == {"net.3.weight", "net.5.weight", "_target"}
    assert gd.history["netdiag/grad_data_ratio/net.3.weight"][1][1] == pytest.approx(
        model.ref[1]["netdiag/grad_data_ratio/net.3.weight"], rel=1e-6
    )


class NaNInput(TinyNet):
    def training_step(self, batch, batch_idx):
        x, y = batch
        x = x.clone()
        x[0, 0] = math.nan  # one example's whole activation row becomes NaN
        x[1, 0] = math.inf
        return nn.functional.cross_entropy(self(x), y)


def test_nonfinite_activations_are_counted_and_left_out(tmp_path):
    model = NaNInput(batchnorm=False)
    sat = SaturationMonitor(every_n_steps=1)
    t = trainer(tmp_path, [sat], max_steps=2, limit_val_batches=0)
    t.fit(model, loader())
    scalars, hists, _ = read_tensorboard(t.logger.log_dir)
    t0 = model.ref_tensors[0]["netdiag/act/net.1"]
    finite = t0[torch.isfinite(t0)]
    assert scalars["netdiag/act_nonfinite/net.1"][0] == (~torch.isfinite(t0)).sum().item() == 16
    assert scalars["netdiag/act_mean/net.1"][0] == pytest.approx(finite.mean().item(), rel=1e-5)
    assert scalars["netdiag/act_std/net.1"][0] == pytest.approx(finite.std().item(), rel=1e-5)
    assert scalars["netdiag/act_saturated_pct/net.1"][0] == pytest.approx(
        ((finite.abs() > 0.97).float().mean() * 100).item(), rel=1e-5
    )
    assert hists["netdiag/act/net.1"][0].num == finite.numel()
    # step 1: the NaN loss made every parameter NaN; everything is counted as non-finite, nothing crashes
    t1 = model.ref_tensors[1]["netdiag/act/net.1"]
    assert scalars["netdiag/act_nonfinite/net.1"][1] == t1.numel()
    assert 1 not in scalars.get("netdiag/act_mean/net.1", {}) and 1 not in hists["netdiag/act/net.1"]


class Mixed(L.LightningModule):
    """In-place ReLU and GELU: an output-side and an input-side saturation rule."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.relu, self.l2, self.gelu, self.out = (
            nn.Linear(6, 32), nn.ReLU(inplace=True), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4)
        )  # fmt: skip
        self.seen: dict[str, torch.Tensor] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        r = self.relu(self.l1(x))
        r.retain_grad()
        pre = self.l2(r) * 3
        g = self.gelu(pre)
        self.seen = {"relu": r, "gelu_in": pre.detach(), "gelu": g}
        return nn.functional.cross_entropy(self.out(g), y)

    def on_before_optimizer_step(self, optimizer):
        self.seen["relu_grad"] = self.seen["relu"].grad

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_inplace_relu_and_input_side_gelu(tmp_path):
    model = Mixed()
    sat = SaturationMonitor(every_n_steps=1)
    trainer(tmp_path, [sat], max_steps=1, logger=False).fit(model, loader())
    h = sat.history
    relu, relu_grad = model.seen["relu"].detach(), model.seen["relu_grad"]
    assert h["netdiag/act_saturated_pct/relu"][0][1] == pytest.approx(((relu <= 0).float().mean() * 100).item())
    assert h["netdiag/act_dead_pct/relu"][0][1] == pytest.approx(((relu <= 0).all(0).float().mean() * 100).item())
    assert h["netdiag/act_grad_std/relu"][0][1] == pytest.approx(relu_grad.std().item(), rel=1e-5)
    gelu_in = model.seen["gelu_in"]
    assert h["netdiag/act_saturated_pct/gelu"][0][1] == pytest.approx(((gelu_in < -3).float().mean() * 100).item())
    assert 0 < h["netdiag/act_saturated_pct/gelu"][0][1] < 100


class DeepSpeedStrategy:
    """Stands in for DeepSpeed's strategy (not installed here): recognised by its class name, as the
    strategies of the standalone `pytorch_lightning` package are."""


@pytest.mark.parametrize("strategy", [FSDPStrategy(), DeepSpeedStrategy()])
@pytest.mark.parametrize("cls", [GradDataRatio, UpdateRatio])
def test_strategies_that_flatten_parameters_are_refused_in_setup(cls, strategy):
    # FSDP1 needs a GPU in Lightning, so its Trainer cannot be built here; setup sees only these attributes.
    trainer = SimpleNamespace(strategy=strategy, log_every_n_steps=50)
    with pytest.raises(ValueError, match=f"{type(strategy).__name__} splits each parameter.*ModelParallelStrategy"):
        cls().setup(trainer, TinyNet(), "fit")
    SaturationMonitor().setup(trainer, TinyNet(), "fit")  # activations are whole on every rank: fine
