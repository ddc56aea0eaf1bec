"""AMP loss scaling, skipped steps, gradient accumulation, manual optimization with two optimizers."""

import math

import pytest
import torch
from helpers import TinyNet, all_callbacks, assert_matches_reference, loader, read_tensorboard, trainer
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from lightning_netdiag import GradDataRatio, SaturationMonitor, UpdateRatio


def fp16_plugin():
    return MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=1024.0))


def test_fp16_amp_gradients_are_unscaled(tmp_path):
    model = TinyNet()
    cbs = all_callbacks(1)
    t = trainer(tmp_path, cbs, max_steps=3, plugins=[fp16_plugin()])
    t.fit(model, loader())
    scalars, _, _ = read_tensorboard(t.logger.log_dir)
    # The reference divides the retained activation gradient by the scaler's scale of that backward.
    assert assert_matches_reference(scalars, model.ref, rel=1e-4) > 40
    assert any(t.startswith("netdiag/update_data_log10/net.") for t in scalars)
    assert t.precision_plugin.scaler.get_scale() >= 1024.0  # the scale was really in play
    # Without unscaling, D2 would be ~1024x larger than the fp32 gradient of the same run.
    std = scalars["netdiag/act_grad_std/net.4"][0]
    assert std == pytest.approx(model.ref[0]["netdiag/act_grad_std/net.4"], rel=1e-4) and std < 1.0


def test_bf16_mixed_runs_and_matches(tmp_path):
    model = TinyNet()
    t = trainer(
        tmp_path,
        all_callbacks(1),
        max_steps=2,
        precision="bf16-mixed",
    )
    t.fit(model, loader())
    scalars, _, _ = read_tensorboard(t.logger.log_dir)
    assert assert_matches_reference(scalars, model.ref, rel=1e-4, abs_=1e-6) > 20


class BlowUpAt(TinyNet):
    """Produces non-finite gradients at one optimizer step."""

    def __init__(self, bad_step: int, **kw) -> None:
        super().__init__(**kw)
        self.bad_step = bad_step

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * math.inf if self.trainer.global_step == self.bad_step else loss


def test_skipped_amp_step_is_reported_not_minus_infinity(tmp_path):
    model = BlowUpAt(bad_step=1)
    cbs = all_callbacks(1)
    t = trainer(tmp_path, cbs, max_steps=3, plugins=[fp16_plugin()])
    t.fit(model, loader())
    scalars, hists, _ = read_tensorboard(t.logger.log_dir)
    assert scalars["netdiag/update_skipped"] == {0: 0.0, 1: 1.0, 2: 0.0}
    ratio = scalars["netdiag/update_data_log10/net.3.weight"]
    assert sorted(ratio) == [0, 2] and all(math.isfinite(v) for v in ratio.values())
    # the non-finite gradients are counted, and left out of the statistics and histograms
    assert scalars["netdiag/grad_nonfinite/net.3.weight"][1] == 16 * 16
    assert 1 not in scalars["netdiag/grad_std/net.3.weight"]
    assert scalars["netdiag/act_grad_nonfinite/net.4"][1] > 0
    assert 1 not in hists["netdiag/grad/net.3.weight"] and 0 in hists["netdiag/grad/net.3.weight"]
    assert t.precision_plugin.scaler.get_scale() < 1024.0  # the scaler did skip and back off


def test_accumulation_measures_once_per_optimizer_step_over_all_micro_batches(tmp_path):
    model = TinyNet()
    model.loss_window = 1  # each step's loss: the mean of its 4 micro-batches'
    cbs = all_callbacks(1)
    t = trainer(tmp_path, cbs, max_steps=3, accumulate_grad_batches=4, limit_val_batches=0)
    t.fit(model, loader(batch_size=8))
    scalars, _, _ = read_tensorboard(t.logger.log_dir)
    assert sorted(scalars["netdiag/act_std/net.2"]) == [0, 1, 2]
    assert sorted(scalars["netdiag/grad_data_ratio/net.0.weight"]) == [0, 1, 2]
    # the reference concatenates the 4 micro-batches of each step and uses the accumulated gradient
    assert model.ref_tensors[0]["netdiag/act/net.2"].shape[0] == 4 * 8
    assert assert_matches_reference(scalars, model.ref) == 3 * 26 + 3  # and the 3 of the output at init


class TwoOptimizers(TinyNet):
    """Manual optimization: one optimizer for the first layer, one for the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.manual_ref: dict[int, dict[str, float]] = {}

    def configure_optimizers(self):
        first = list(self.net[0].parameters())
        rest = [p for p in self.parameters() if all(p is not q for q in first)]
        return torch.optim.SGD(first, lr=0.1, momentum=0.9), torch.optim.Adam(rest, lr=0.01)

    def on_before_optimizer_step(self, optimizer) -> None:
        pass

    def training_step(self, batch, batch_idx):
        step, ref = self.trainer.global_step, {}
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self._acts.clear()
        opts = self.optimizers()
        for opt in opts:
            opt.zero_grad()
        self.manual_backward(loss)
        params = {n: p for n, p in self.named_parameters() if p.ndim == 2}
        before = {n: p.detach().clone() for n, p in params.items()}
        for n, p in params.items():
            ref[f"netdiag/grad_data_ratio/{n}"] = (p.grad.std() / p.std()).item()
        for opt in opts:
            opt.step()
        for n, p in params.items():
            ref[f"netdiag/update_data_log10/{n}"] = ((p.detach() - before[n]).std() / before[n].std()).log10().item()
        self.manual_ref[step] = ref


def test_manual_optimization_with_two_optimizers(tmp_path):
    model = TwoOptimizers()
    gd, ud = GradDataRatio(every_n_steps=1), UpdateRatio(every_n_steps=1)
    t = trainer(tmp_path, [gd, ud], max_steps=6, limit_val_batches=0)
    t.fit(model, loader())
    assert t.global_step == 6  # two optimizer steps per batch
    scalars, _, _ = read_tensorboard(t.logger.log_dir)
    for tag in (
        "netdiag/grad_data_ratio/net.0.weight",
        "netdiag/grad_data_ratio/net.5.weight",
        "netdiag/update_data_log10/net.0.weight",
        "netdiag/update_data_log10/net.5.weight",
    ):
        assert sorted(scalars[tag]) == [0, 2, 4], tag  # each batch's optimizer steps, labelled at its start
        for step, value in scalars[tag].items():
            assert value == pytest.approx(model.manual_ref[step][tag], rel=1e-5), (tag, step)


class FusedAdam(TinyNet):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01, fused=True)


def test_fused_optimizer_that_unscales_in_its_own_step(tmp_path):
    # Lightning leaves the gradients scaled for optimizers that unscale inside step(): D3 must unscale them.
    model = FusedAdam()
    gd = GradDataRatio(every_n_steps=1)
    t = trainer(tmp_path, [gd], max_steps=2, logger=False, plugins=[fp16_plugin()])
    t.fit(model, loader())
    assert t.precision_plugin.scaler.get_scale() == 1024.0  # no skip, no growth: the scale of both steps
    for step in (0, 1):
        scaled = model.ref[step]["netdiag/grad_std/net.3.weight"]  # what the hook sees: still scaled
        assert dict(gd.history["netdiag/grad_std/net.3.weight"])[step] == pytest.approx(scaled / 1024.0, rel=1e-6)


class ManualAccumulation(TinyNet):
    """Two forward-backward passes in one batch before one optimizer step (manual gradient accumulation)."""

    def __init__(self) -> None:
        super().__init__()  # net.2 and net.4 are the Tanh layers; net[:3] ends with the first
        self.automatic_optimization = False
        self.seen: dict[int, list[torch.Tensor]] = {}

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        x, y = batch
        for half in (slice(0, 8), slice(8, 16)):
            h = self.net[:3](x[half])
            self.seen.setdefault(self.trainer.global_step, []).append(h.detach())
            self.manual_backward(nn.functional.cross_entropy(self.net[3:](h), y[half]) / 2)
        opt.step()


def test_manual_accumulation_records_every_pass_of_the_step_as_the_same_layer(tmp_path):
    model = ManualAccumulation()
    sat = SaturationMonitor(every_n_steps=1)
    trainer(tmp_path, [sat], max_steps=2, logger=False, limit_val_batches=0).fit(model, loader())
    assert {t.split("/", 2)[2] for t in sat.history if "/act_std/" in t} == {"net.2", "net.4"}  # no "-2" layers
    for step in (0, 1):
        both = torch.cat(model.seen[step])  # the first Tanh's outputs of both passes
        assert sat.history.histograms["netdiag/act/net.2"][step][1].total == both.numel()
        assert dict(sat.history["netdiag/act_std/net.2"])[step] == pytest.approx(both.std().item(), rel=1e-5)
