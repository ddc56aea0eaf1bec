"""Every logged number equals the lecture's formula computed in plain PyTorch on the same tensors."""

import inspect
import math

import lightning as L
import pytest
import torch
from helpers import (
    GRAD_EDGES,
    TANH_EDGES,
    TinyNet,
    all_callbacks,
    assert_matches_reference,
    bin_counts,
    dataset,
    loader,
    netdiag_only,
    read_csv,
    read_tensorboard,
    trainer,
)
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_netdiag import GradDataRatio, SaturationMonitor, UpdateRatio, capture, stats

#: Logged at step 0 only: the output at initialisation.
INIT_TAGS = {"netdiag/init_output_ce/net.5", "netdiag/init_output_classes/net.5", "netdiag/init_loss"}


def expected_tags(model: TinyNet) -> set[str]:
    tags = {
        "netdiag/update_skipped",
        "netdiag/update_data_log10/_target",
        "netdiag/lr",
        "netdiag/loss_median",
        *INIT_TAGS,
    }
    for layer in ("net.2", "net.4"):
        for metric in (
            "act_mean",
            "act_std",
            "act_saturated_pct",
            "act_dead_pct",
            "act_nonfinite",
            "act_grad_mean",
            "act_grad_std",
            "act_grad_nonfinite",
        ):
            tags.add(f"netdiag/{metric}/{layer}")
    for name, p in model.named_parameters():
        if p.ndim == 2:
            for metric in ("grad_mean", "grad_std", "grad_data_ratio", "grad_nonfinite", "update_data_log10"):
                tags.add(f"netdiag/{metric}/{name}")
    return tags


def test_tensorboard_scalars_equal_plain_pytorch(tmp_path, path):
    model = TinyNet()
    model.loss_window = 2  # the median loss of the last every_n_steps steps
    t = trainer(tmp_path, all_callbacks(2), max_steps=7)
    t.fit(model, loader(), loader())
    scalars, _, _ = read_tensorboard(t.logger.log_dir)
    logged = netdiag_only(scalars)
    assert set(logged) == expected_tags(model)
    for tag, points in logged.items():  # the optimizer steps measured, step 0 = at init
        assert sorted(points) == ([0] if tag in INIT_TAGS else [0, 2, 4, 6]), tag
    compared = assert_matches_reference(logged, model.ref)
    # every tag but the 7 non-finite counts and the 2 D4 bookkeeping tags, and the 3 of the output at init
    assert compared == 4 * 26 + 3
    assert logged["netdiag/init_output_classes/net.5"][0] == 4
    # The first Tanh is partly saturated by the init gain; the value is non-trivial.
    assert 1 < logged["netdiag/act_saturated_pct/net.2"][0] < 99


def test_histograms_equal_direct_bin_counts(tmp_path, path):
    model = TinyNet()
    t = trainer(tmp_path, all_callbacks(3), max_steps=4)
    t.fit(model, loader())
    _, hists, _ = read_tensorboard(t.logger.log_dir)
    assert set(hists) == {
        "netdiag/act/net.2",
        "netdiag/act/net.4",
        "netdiag/act_grad/net.2",
        "netdiag/act_grad/net.4",
        "netdiag/grad/net.0.weight",
        "netdiag/grad/net.3.weight",
        "netdiag/grad/net.5.weight",
    }
    for tag, steps in hists.items():
        assert sorted(steps) == [0, 3]
        for step, h in steps.items():
            act = tag.startswith("netdiag/act/")
            edges = TANH_EDGES if act else GRAD_EDGES
            full = bin_counts(model.ref_tensors[step][tag], edges, by_magnitude=not act)
            used = [i for i, c in enumerate(full) if c > 0]
            assert list(h.bucket) == full[used[0] : used[-1] + 1], tag
            assert h.num == sum(full) == model.ref_tensors[step][tag].numel()
            # Bucket limits are the right edges of the bins that were written.
            bounds = [*edges, 2 * edges[-1] - edges[-2]]
            assert list(h.bucket_limit) == pytest.approx(bounds[used[0] : used[-1] + 1])


def test_csv_logger_gets_the_same_numbers_and_quantiles(tmp_path):
    model = TinyNet()
    model.loss_window = 2
    logger = CSVLogger(tmp_path, name="csv")
    t = trainer(tmp_path, all_callbacks(2), logger=logger, max_steps=5)
    with pytest.warns(UserWarning, match="CSVLogger cannot hold histograms") as record:
        t.fit(model, loader())
    # one warning per logger type and callback, not one per step
    assert sum("CSVLogger cannot hold histograms" in str(w.message) for w in record) == 2
    logged = read_csv(f"{logger.log_dir}/metrics.csv")
    assert assert_matches_reference(logged, model.ref, rel=1e-5) > 50
    assert set(expected_tags(model)) <= set(logged)
    # Quantiles of the histogram: the median of the first Tanh layer lies within one bin of torch's median.
    for step in (0, 2, 4):
        t_ref = model.ref_tensors[step]["netdiag/act/net.2"]
        for q, name in ((0.05, "q05"), (0.5, "q50"), (0.95, "q95")):
            value = logged[f"netdiag/act/net.2/{name}"][step]
            assert abs(value - torch.quantile(t_ref, q).item()) <= 0.04 + 1e-6  # one bin of width 0.04
    assert "netdiag/grad/net.0.weight/q50" in logged


def test_update_ratio_uses_the_actual_update_not_lr_times_grad(tmp_path):
    # Adam with weight decay: the lecture's lr * grad estimate is wrong here; the real update is not.
    model = TinyNet(optimizer="adam", lr=0.01)
    cb = UpdateRatio(every_n_steps=1)
    t = trainer(tmp_path, [cb], max_steps=3)
    t.fit(model, loader())
    for step in range(3):
        for name in ("net.0.weight", "net.3.weight", "net.5.weight"):
            tag = f"netdiag/update_data_log10/{name}"
            assert dict(cb.history[tag])[step] == pytest.approx(model.ref[step][tag], rel=1e-6)
    # lr * grad would read very differently (Adam normalizes the step): check they disagree.
    step0 = model.ref_tensors[0]["netdiag/grad/net.3.weight"]
    naive = math.log10((0.01 * step0).std().item() / 1.0)
    assert abs(naive - dict(cb.history["netdiag/update_data_log10/net.3.weight"])[0]) > 0.3


def test_update_ratio_equals_lr_grad_for_plain_sgd(tmp_path):
    model = TinyNet(optimizer="sgd", lr=0.1)
    cb, gd = UpdateRatio(every_n_steps=1), GradDataRatio(every_n_steps=1)
    t = trainer(tmp_path, [cb, gd], max_steps=2)
    t.fit(model, loader())
    grad_std = dict(gd.history["netdiag/grad_std/net.3.weight"])[1]
    ratio = dict(gd.history["netdiag/grad_data_ratio/net.3.weight"])[1]
    lecture = math.log10(0.1 * ratio)  # log10(lr * grad.std() / p.std())
    assert grad_std > 0
    assert dict(cb.history["netdiag/update_data_log10/net.3.weight"])[1] == pytest.approx(lecture, abs=1e-5)


class Wide(TinyNet):
    """A 256 x 256 weight (65,536 elements), so that a sample of 4,096 is a sixteenth of it."""

    def __init__(self) -> None:
        super().__init__(optimizer="adam", lr=0.003, hidden=256)


def test_update_ratio_on_a_sample_of_each_weight_is_within_its_stated_error(tmp_path):
    exact, sampled = UpdateRatio(every_n_steps=1), UpdateRatio(every_n_steps=1, sample=4096, prefix="sampled")
    held: list[int] = []

    class Held(L.Callback):  # what the sampled callback holds at the moment of the step
        def on_before_optimizer_step(self, *args):
            held.append(sum(copy.numel() for _, _, copy, _ in sampled._before.values()))

    model = Wide()
    trainer(tmp_path, [exact, sampled, Held()], max_steps=4, logger=False).fit(model, loader())
    sizes = {n: p.numel() for n, p in model.named_parameters() if p.ndim == 2}
    assert sizes["net.3.weight"] == 65536 and set(held) == {sum(min(n, 4096) for n in sizes.values())}
    bound = 0.43 / math.sqrt(4096)  # the stated error, one standard deviation
    for step in range(4):
        for name, n in sizes.items():
            e = dict(exact.history[f"netdiag/update_data_log10/{name}"])[step]
            s = dict(sampled.history[f"sampled/update_data_log10/{name}"])[step]
            assert e == pytest.approx(model.ref[step][f"netdiag/update_data_log10/{name}"], rel=1e-6)
            if n <= 4096:
                assert s == pytest.approx(e, rel=1e-9)  # small enough to be kept whole
            else:
                assert abs(s - e) <= 4 * bound, (name, step, s, e)
    with pytest.raises(ValueError, match="`sample`"):
        UpdateRatio(sample=0)


class Doubler(L.Callback):
    """Changes one weight after GradDataRatio has read it and before UpdateRatio copies it."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        with torch.no_grad():
            pl_module.net[3].weight.mul_(2.0)


@pytest.mark.parametrize("doubler", [False, True], ids=["unchanged", "changed-between"])
def test_update_ratio_reads_each_weight_once_with_grad_data_ratio(tmp_path, monkeypatch, doubler):
    """UpdateRatio takes GradDataRatio's record of the weights before the step, unless they changed since."""
    recomputed: list[str] = []
    real = UpdateRatio._records

    def spy(parts, *a, **k):
        recomputed.extend(str(tuple(p.shape)) for p, _ in parts)
        return real(parts, *a, **k)

    monkeypatch.setattr(UpdateRatio, "_records", staticmethod(spy))
    model = TinyNet(optimizer="adam", lr=0.01)
    d4 = UpdateRatio(every_n_steps=1)
    cbs = [GradDataRatio(every_n_steps=1), *([Doubler()] if doubler else []), d4]
    trainer(tmp_path, cbs, max_steps=3, logger=False).fit(model, loader())
    for step in range(3):
        for name in ("net.0.weight", "net.3.weight", "net.5.weight"):
            tag = f"netdiag/update_data_log10/{name}"
            assert dict(d4.history[tag])[step] == pytest.approx(model.ref[step][tag], rel=1e-6)
    updates = [str(tuple(p.shape)) for p in (model.net[0].weight, model.net[3].weight, model.net[5].weight)]
    doubled = str(tuple(model.net[3].weight.shape))
    # per step: the three updates, and a "before" record only for the weight changed after GradDataRatio read it
    assert sorted(recomputed) == sorted((updates + ([doubled] if doubler else [])) * 3)


class OneActivation(L.LightningModule):
    """A classifier with one watched activation, ``act``; ``made[step]``: its output at that step, as it made it."""

    def __init__(self) -> None:
        super().__init__()
        self.made: dict[int, torch.Tensor] = {}

    def keep(self, h: torch.Tensor) -> torch.Tensor:
        self.made[self.global_step] = h.detach().clone()
        return h

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-4)


class InPlaceAfterGELU(OneActivation):
    """A GELU whose output is multiplied in place after its hook ran (GELU's backward reads its input, so autograd
    allows it): the record is of the output as the GELU made it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.keep(self.act(self.fc1(x))).mul_(1000))


def test_an_activation_changed_in_place_after_its_hook_is_recorded_as_it_was_made(tmp_path, path):
    model = InPlaceAfterGELU()
    t = trainer(tmp_path, [SaturationMonitor(every_n_steps=2)], max_steps=5, limit_val_batches=0)
    t.fit(model, loader())
    scalars, _, _ = read_tensorboard(t.logger.log_dir)
    for step in (0, 2, 4):
        made = model.made[step]
        assert math.isclose(scalars["netdiag/act_mean/act"][step], made.mean().item(), rel_tol=1e-5)
        assert math.isclose(scalars["netdiag/act_std/act"][step], made.std().item(), rel_tol=1e-5)


def test_small_records_of_a_pass_are_taken_together_and_equal_plain_pytorch(tmp_path, monkeypatch):
    calls: list[tuple[str, int]] = []

    def spying(name, real):
        def spy(*a, **k):
            if inspect.currentframe().f_back.f_code.co_filename == capture.__file__:
                calls.append((name, len(a[0]) if name == "tensor_records" else 1))
            return real(*a, **k)

        return spy

    for name in ("tensor_record", "tensor_records"):
        monkeypatch.setattr(stats, name, spying(name, getattr(stats, name)))
    model = TinyNet()
    t = trainer(tmp_path, all_callbacks(2), max_steps=5)
    t.fit(model, loader(), loader())
    # each logging step: the two Tanh outputs together at the end of the forward, their gradients at the end of the
    # backward; none alone
    assert calls == [("tensor_records", 2)] * 6
    assert_matches_reference(netdiag_only(read_tensorboard(t.logger.log_dir)[0]), model.ref)


def test_records_taken_before_the_end_of_a_pass_where_a_group_is_full_equal_plain_pytorch(tmp_path, monkeypatch):
    monkeypatch.setattr(stats, "group_limits", lambda x: (stats.SMALL, 1))  # each taken when the next one comes
    model = TinyNet()
    t = trainer(tmp_path, all_callbacks(2), max_steps=5)
    t.fit(model, loader(), loader())
    assert assert_matches_reference(netdiag_only(read_tensorboard(t.logger.log_dir)[0]), model.ref) == 3 * 25 + 3


class ChannelsLast(OneActivation):
    """A convolution's ReLU output in channels-last memory (a GPU's fast layout for CNNs): strided, not contiguous."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Linear(8, 4)
        with torch.no_grad():
            self.conv.bias[:2] = -10.0  # two channels dead
        self.to(memory_format=torch.channels_last)

    def forward(self, x):
        h = self.keep(self.act(self.conv(x.to(memory_format=torch.channels_last))))
        assert not h.is_contiguous()
        return self.head(h.mean((2, 3)))


def test_a_channels_last_activation_is_recorded_as_plain_pytorch_reads_it(tmp_path, path):
    images = torch.utils.data.TensorDataset(torch.randn(64, 3, 10, 10), torch.randint(0, 4, (64,)))
    model = ChannelsLast()
    t = trainer(tmp_path, [SaturationMonitor(every_n_steps=2)], max_steps=3, limit_val_batches=0)
    t.fit(model, torch.utils.data.DataLoader(images, batch_size=16))
    scalars, histograms, _ = read_tensorboard(t.logger.log_dir)
    for step in (0, 2):
        made = model.made[step]
        assert math.isclose(scalars["netdiag/act_mean/act"][step], made.mean().item(), rel_tol=1e-5)
        assert math.isclose(scalars["netdiag/act_std/act"][step], made.std().item(), rel_tol=1e-5)
        dead = 100 * (made <= 0).all(dim=0).all(dim=-1).all(dim=-1).float().mean().item()
        assert scalars["netdiag/act_dead_pct/act"][step] == pytest.approx(dead) == 25.0
        saturated = 100 * (made <= 0).float().mean().item()
        assert scalars["netdiag/act_saturated_pct/act"][step] == pytest.approx(saturated, rel=1e-6)


def test_records_of_batches_of_changing_shapes_equal_plain_pytorch(tmp_path, path):
    # each logging step's activations have other shapes: their records taken together in a layout of their own
    sizes = [16, 9, 16, 5, 12, 7, 16, 3]
    batches = torch.utils.data.DataLoader(dataset(), batch_sampler=[list(range(k)) for k in sizes])
    model = TinyNet()
    t = trainer(tmp_path, all_callbacks(1), max_steps=len(sizes), limit_val_batches=0)
    t.fit(model, batches)
    compared = assert_matches_reference(netdiag_only(read_tensorboard(t.logger.log_dir)[0]), model.ref)
    assert compared == len(sizes) * 25 + 3


class SparseEmbedding(L.LightningModule):
    """A sparse embedding (``nn.Embedding(sparse=True)``: its gradient a sparse tensor, its rows of repeated tokens
    summed) under SGD, which takes sparse gradients; each step's gradient in dense form, for the reference."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(200, 8, sparse=True), nn.Linear(8, 3)
        self.dense: dict[int, torch.Tensor] = {}
        self.weight: dict[int, torch.Tensor] = {}
        self.tokens = torch.randint(0, 200, (64, 5))  # repeated tokens: the sparse gradient is not coalesced
        self.labels = torch.randint(0, 3, (64,))

    def training_step(self, batch, batch_idx):
        i = torch.arange(16) + 16 * (batch_idx % 4)
        return nn.functional.cross_entropy(self.head(torch.tanh(self.emb(self.tokens[i])).mean(1)), self.labels[i])

    def on_before_optimizer_step(self, optimizer) -> None:
        assert self.emb.weight.grad.is_sparse
        self.dense[self.trainer.global_step] = self.emb.weight.grad.to_dense()
        self.weight[self.trainer.global_step] = self.emb.weight.detach().clone()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_a_sparse_gradient_is_recorded_as_its_dense_form(tmp_path, path):
    from lightning_netdiag import FlightRecorder

    model = SparseEmbedding()
    flight = FlightRecorder()
    t = trainer(tmp_path, [GradDataRatio(every_n_steps=2), UpdateRatio(every_n_steps=2), flight], max_steps=5)
    t.fit(model, loader(), loader())
    scalars, hists, _ = read_tensorboard(t.logger.log_dir)
    for step in (0, 2, 4):
        g = model.dense[step]
        tag = "netdiag/{}/emb.weight"
        assert scalars[tag.format("grad_mean")][step] == pytest.approx(g.mean().item(), rel=1e-5, abs=1e-9)
        assert scalars[tag.format("grad_std")][step] == pytest.approx(g.std().item(), rel=1e-5)
        ratio = (g.std() / model.weight[step].std()).item()
        assert scalars[tag.format("grad_data_ratio")][step] == pytest.approx(ratio, rel=1e-5)
        h = hists[tag.format("grad")][step]
        full = bin_counts(g, GRAD_EDGES, by_magnitude=True)
        used = [i for i, c in enumerate(full) if c > 0]
        assert list(h.bucket) == full[used[0] : used[-1] + 1]
        assert h.num == g.numel() == 1600
        assert (g == 0).sum() > 800  # most rows have no gradient: their zeros are counted, not left out
    for step, g in model.dense.items():  # every step: the flight recorder's norm of it
        assert flight.record.value("flight_grad_norm", step, "emb.weight") == pytest.approx(g.norm().item(), rel=1e-5)


def test_the_optimizer_steps_with_the_gradients_backward_made_and_a_relus_numbers_are_plain_pytorchs(path):
    """Every meter at its defaults, on a model whose one small weight (64 x 32: two whole pieces of 1,024 values) is
    reduced alone, and whose ReLU's output is alone in its group: a record that wrote its histogram keys into the
    tensor it read changed that gradient before the optimizer's step, and the held ReLU output before its saturated
    % was counted (logged 0 % for a layer 96 % at 0)."""
    from lightning_netdiag import NetDiag

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4096))
    with torch.no_grad():
        model[0].bias.fill_(-1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    outputs, made, stepped = [], [], []
    model[1].register_forward_hook(lambda m, i, out: outputs.append(out.detach().clone()))
    with NetDiag(model, optimizer, every_n_steps=1) as diag:
        optimizer.register_step_pre_hook(lambda *a: stepped.append([p.grad.clone() for p in model.parameters()]))
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(64, 64)).square().mean().backward()
            made.append([p.grad.clone() for p in model.parameters()])
            optimizer.step()
    for before, after in zip(made, stepped, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    sat = diag.records()["saturation"]
    for step, out in enumerate(outputs):
        expected = ((out <= 0).double().mean() * 100).item()
        assert sat.value("act_saturated_pct", step, "1") == pytest.approx(expected) and expected > 90
        assert sat.value("act_dead_pct", step, "1") == pytest.approx(((out <= 0).all(0).double().mean() * 100).item())
