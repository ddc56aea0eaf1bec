"""What the health report reads besides D1-D4, each compared with a direct computation: fp16 gradients below
fp16's normal range, the GradScaler's scale, the learning rate and optimizer family, weights that never move,
layers inside a module that runs several times per forward (a recurrent cell), and the history's steps."""

import lightning as L
import pytest
import torch
from helpers import TinyNet, loader, trainer
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.nn import functional as F

from lightning_netdiag import GradDataRatio, SaturationMonitor, UpdateRatio
from lightning_netdiag.history import History
from lightning_netdiag.meters import optimizer_family


@pytest.mark.parametrize("scaled", [False, True], ids=["no-scaler", "grad-scaler"])
def test_fp16_tiny_gradient_share_is_counted_as_computed(tmp_path, scaled):
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=scaled)
    model = TinyNet(init_gain=1.0)
    sat, gd = SaturationMonitor(every_n_steps=1), GradDataRatio(every_n_steps=1)
    trainer(tmp_path, [sat, gd], max_steps=3, logger=False, plugins=[MixedPrecision("16-mixed", "cpu", scaler)]).fit(
        model, loader()
    )
    for step in range(3):
        for layer in ("net.2", "net.4"):
            # the reference holds the unscaled gradient; fp16 held it multiplied by the scale of that step
            scale = dict(gd.history["netdiag/loss_scale"])[step] if scaled else 1.0
            g = (model.ref_tensors[step][f"netdiag/act_grad/{layer}"] * scale).half()
            expected = 100 * ((g != 0) & (g.abs() < 2.0**-14)).float().mean().item()
            assert dict(sat.history[f"netdiag/act_grad_fp16_tiny_pct/{layer}"])[step] == pytest.approx(expected)
    if scaled:  # the scale was in play: the values sit in fp16's normal range
        assert max(v for _, v in sat.history["netdiag/act_grad_fp16_tiny_pct/net.2"]) < 1
    assert ("netdiag/loss_scale" in gd.history) == scaled


def test_fp32_gradients_log_no_fp16_share(tmp_path):
    sat = SaturationMonitor(every_n_steps=1)
    trainer(tmp_path, [sat], max_steps=2, logger=False).fit(TinyNet(), loader())
    assert not [t for t in sat.history if "fp16" in t]


class LeftOut(TinyNet):
    """The optimizer misses the last layer; a second parameter group holds the first layer at rate 0."""

    def configure_optimizers(self):
        first, middle = list(self.net[0].parameters()), list(self.net[3].parameters())
        return torch.optim.Adam([{"params": middle}, {"params": first, "lr": 0.0}], lr=0.01)


def test_weights_that_do_not_move_are_flagged_and_the_learning_rate_is_logged(tmp_path):
    upd = UpdateRatio(every_n_steps=2)
    model = LeftOut()
    trainer(tmp_path, [upd], max_steps=5, logger=False).fit(model, loader())
    zero = {t.split("/")[-1]: [s for s, _ in pts] for t, pts in upd.history.items() if "/update_zero/" in t}
    assert zero == {"net.0.weight": [0, 2, 4], "net.5.weight": [0, 2, 4]}  # the rate-0 group and the left-out layer
    assert "netdiag/update_data_log10/net.3.weight" in upd.history
    assert upd.history["netdiag/lr"] == [(0, 0.01), (2, 0.01), (4, 0.01)]
    assert upd.optimizer_family == "adam"


def test_a_skipped_step_flags_no_single_weight(tmp_path):
    from test_precision_and_steps import BlowUpAt, fp16_plugin

    upd = UpdateRatio(every_n_steps=1)
    trainer(tmp_path, [upd], max_steps=3, logger=False, plugins=[fp16_plugin()]).fit(BlowUpAt(bad_step=1), loader())
    assert dict(upd.history["netdiag/update_skipped"])[1] == 1.0
    assert not [t for t in upd.history if "/update_zero/" in t]


def test_optimizer_families():
    p = [nn.Parameter(torch.zeros(2))]
    assert optimizer_family(torch.optim.SGD(p, lr=0.1, momentum=0.9)) == "sgd"
    for cls in (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam):
        assert optimizer_family(cls(p)) == "adam"

    class AdamW8bit(torch.optim.Optimizer):  # another library's Adam, by its name
        def __init__(self, params):
            super().__init__(params, {})

    assert optimizer_family(AdamW8bit(p)) == "adam"
    assert optimizer_family(torch.optim.Adagrad(p)) is None and optimizer_family(torch.optim.LBFGS(p)) is None


class Cell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x, h):
        return torch.tanh(self.lin(torch.cat([x, h], 1)))


class Recurrent(L.LightningModule):
    """A cell over four time steps, then a block that calls its ReLU module twice (depth, not time)."""

    def __init__(self) -> None:
        super().__init__()
        self.cell, self.inp, self.relu, self.out = Cell(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 4)

    def forward(self, x):
        h = torch.zeros(x.shape[0], 4)
        for _ in range(4):
            h = self.cell(self.inp(x), h)
        return self.out(self.relu(self.relu(h) + 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_layers_made_in_a_module_that_runs_again_are_marked_in_loop(tmp_path):
    sat = SaturationMonitor(every_n_steps=1)
    trainer(tmp_path, [sat], max_steps=2, logger=False).fit(Recurrent(), loader())
    assert set(sat.layer_kinds) == {"cell/tanh", "cell/tanh-2", "cell/tanh-3", "cell/tanh-4", "relu", "relu-2"}
    assert sat.layers_in_loop == {"cell/tanh", "cell/tanh-2", "cell/tanh-3", "cell/tanh-4"}


def test_history_steps_and_first_points_survive_a_checkpoint():
    h = History(3)
    for step in (0, 5, 5, 10, 15):  # two optimizers in one step record it twice
        h.add(step, {"a": float(step)}, {})
    assert h.steps == [5, 10, 15] and h.head("a", 2) == [(5, 5.0), (10, 10.0)]
    back = History(3)
    back.load_state_dict(h.state_dict())
    assert back.steps == h.steps and back.last_step == 15
