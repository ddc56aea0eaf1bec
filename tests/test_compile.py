"""torch.compile: the same D1-D4 as eager, with no graph break and no recompilation after warm-up."""

import math
import warnings

import lightning as L
import pytest
import torch
from helpers import all_callbacks, loader, trainer
from torch import nn

dynamo_counters = pytest.importorskip("torch._dynamo.utils").counters


class Plain(L.LightningModule):
    """Tanh (output rule) and GELU (input rule, a pre-hook); no retain_grad, so the model itself compiles whole."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))
        with torch.no_grad():
            self.net[0].weight.mul_(3)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01)


class GraphCount(L.Callback):
    """Dynamo's count of compiled graphs at the start of each batch."""

    def __init__(self) -> None:
        self.graphs: list[int] = []

    def on_train_batch_start(self, *args) -> None:
        self.graphs.append(dynamo_counters["stats"]["unique_graphs"])


def fit(tmp_path, compiled: bool) -> tuple[dict, GraphCount]:
    cbs = all_callbacks(2)
    count = GraphCount()
    model = Plain()
    t = trainer(tmp_path, [*cbs, count], logger=False, max_steps=12, accumulate_grad_batches=2, limit_val_batches=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(torch.compile(model) if compiled else model, loader(batch_size=8))
    # Functional calls are not watched under compile (a function mode would break the graph): said once.
    said = [w for w in caught if "torch.compile" in str(w.message) and "functional" in str(w.message)]
    assert len(said) == (1 if compiled else 0)
    merged = {}
    for cb in cbs:
        merged.update({tag: dict(points) for tag, points in cb.history.items()})
    return merged, count


@pytest.mark.slow
def test_compiled_model_gives_eager_numbers_without_breaks_or_recompiles(tmp_path):
    torch._dynamo.reset()
    dynamo_counters.clear()
    eager, _ = fit(tmp_path / "eager", compiled=False)
    compiled, count = fit(tmp_path / "compiled", compiled=True)

    assert dynamo_counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    assert dict(dynamo_counters["graph_break"]) == {}, list(dynamo_counters["graph_break"])
    # Graphs: idle, first armed micro-batch, later armed micro-batches (and the first one that sizes the
    # per-unit counts). By step 4 every kind has run; no step after it compiles anything.
    assert len(count.graphs) == 24 and count.graphs[8] == count.graphs[-1] == dynamo_counters["stats"]["unique_graphs"]

    # The output at init is read with a global module hook, which would break a compiled graph: eager only.
    init = {t for t in eager if t.startswith(("netdiag/init_output_ce/", "netdiag/init_output_classes/"))}
    assert len(init) == 2 and "netdiag/init_loss" in eager
    init.add("netdiag/init_loss")
    assert set(compiled) == set(eager) - init
    eager = {t: points for t, points in eager.items() if t not in init}
    for metric in ("act_saturated_pct", "act_grad_std", "grad_data_ratio", "update_data_log10"):
        assert any(f"/{metric}/net.3" in t or f"/{metric}/net.2" in t for t in eager), metric
    for tag, points in eager.items():
        assert sorted(compiled[tag]) == sorted(points) == [0, 2, 4, 6, 8, 10], tag
        for step, value in points.items():
            assert math.isclose(compiled[tag][step], value, rel_tol=1e-4, abs_tol=1e-7), (tag, step)


@pytest.mark.slow
def test_a_compiled_training_step_still_tells_the_plain_loop_its_loss():
    from lightning_netdiag import NetDiag

    torch._dynamo.reset()
    model = Plain().net
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    @torch.compile
    def train_step(x, y):  # the backward inside: dynamo breaks its graph there, and NetDiag's wrapper runs eagerly
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach()

    losses = []
    with warnings.catch_warnings(), NetDiag(model, optimizer, every_n_steps=4) as diag:
        warnings.simplefilter("ignore")
        for x, y in list(loader())[:6]:
            losses.append(train_step(x, y).item())
            optimizer.step()
            optimizer.zero_grad()
    record = diag.flight.record
    assert record.steps == list(range(6))
    assert [record.value("flight_loss", s) for s in record.steps] == pytest.approx(losses, rel=1e-6)
