"""Views that hold a hundred layers: Custom Scalars charts of at most 12 lines, a report of one verdict per
rule, heatmaps and a depth profile instead of 100 overlaid lines, legends beside the data."""

import re

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import all_callbacks, loader, read_tensorboard, trainer
from matplotlib.backends.backend_agg import FigureCanvasAgg
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn

from lightning_netdiag import DiagnosticPlots, HealthReport, plots

BLOCKS = 55


class Block(nn.Module):
    """A tanh branch under a sigmoid gate: two activation layers of different families per block."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.act, self.gate_lin, self.gate = nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Sigmoid()

    def forward(self, h):
        return h + self.act(self.lin(h)) * self.gate(self.gate_lin(h))


class Deep(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.out = nn.Linear(6, 16), nn.Linear(16, 4)
        self.blocks = nn.Sequential(*(Block() for _ in range(BLOCKS)))
        with torch.no_grad():
            for b in self.blocks[BLOCKS // 2 :]:
                b.lin.weight.mul_(6)  # the deeper half saturates: the report has something to say

    def forward(self, x):
        return self.out(self.blocks(self.inp(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deep")
    cbs = all_callbacks(2)
    health, drawn = HealthReport(print_table=False), DiagnosticPlots(save_dir=str(tmp / "plots"))
    t = trainer(tmp, [*cbs, health, drawn], max_steps=5, limit_val_batches=0)
    with pytest.warns(UserWarning, match="netdiag: saturation in") as record:
        t.fit(Deep(), loader())
    return t, cbs, health, drawn, [str(w.message) for w in record if "netdiag:" in str(w.message)]


def test_custom_scalars_charts_hold_at_most_12_lines_and_every_layer_once(run):
    t, cbs, *_ = run
    scalars, _, acc = read_tensorboard(t.logger.log_dir)
    layout = layout_pb2.Layout.FromString(acc.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    for category in layout.category:
        metric = {"D1 activation std": "act_std", "D3 grad:data ratio": "grad_data_ratio"}.get(
            category.title.removeprefix("netdiag: ")
        )
        lines = [[t for t in scalars if re.fullmatch(c.multiline.tag[0], t)] for c in category.chart]
        assert all(0 < len(chart) <= 12 for chart in lines), category.title
        if metric:  # every layer in exactly one chart
            tags = sorted(t for chart in lines for t in chart)
            assert tags == sorted(t for t in scalars if t.startswith(f"netdiag/{metric}/")) and len(set(tags)) == len(
                tags
            )
    assert len(cbs[0].layer_kinds) == 2 * BLOCKS and len(cbs[1].param_shapes) == 2 * BLOCKS + 2


def test_report_is_one_verdict_per_rule_and_warns_once_per_rule(run):
    _, _, health, _, warnings = run
    saturation = [v for v in health.verdicts if v.check == "saturation"]
    assert len(saturation) == 1 and saturation[0].hits >= BLOCKS // 2 - 2  # the deeper half's tanh layers
    assert saturation[0].layer.endswith("more") and saturation[0].healthy == "tanh-like: < 40 % at init"
    assert len({(v.check, v.healthy) for v in health.verdicts}) == len(health.verdicts) <= 8
    from lightning_netdiag import report

    assert len(report.format_table(health.verdicts).splitlines()) <= 2 + 3 * len(health.verdicts)
    assert sum("netdiag: saturation in" in w for w in warnings) == 1


def legend_clear_of_axes(fig) -> bool:
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    figure_box = fig.bbox
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is None:
            continue
        box = legend.get_window_extent(renderer)
        if box.overlaps(ax.get_window_extent(renderer)) or not (
            box.x0 >= figure_box.x0 - 1 and box.x1 <= figure_box.x1 + 1
        ):
            return False
    return True


def test_many_layers_get_heatmaps_and_a_depth_profile_with_legends_beside(run):
    _, cbs, _, drawn, _ = run
    assert {p.name for p in drawn.saved} == {
        f"{n}.png"
        for n in ("activations", "activation_gradients", "activations_over_time", "weight_gradients",
                  "update_ratio", "depth_profile")
    }  # fmt: skip
    figures = plots.draw_all(*(cb.record for cb in cbs))
    # one heatmap panel per family, one row per layer: tanh and sigmoid never share an axis
    heat = figures["activations"]
    panels = [ax for ax in heat.axes if ax.get_title()]  # not the colorbars
    assert [ax.collections[0].get_array().shape[0] for ax in panels] == [BLOCKS, BLOCKS]
    assert [ax.get_title().split(",")[0] for ax in panels] == [
        "activation distribution (tanh)",
        "activation distribution (sigmoid)",
    ]
    profile = figures["depth_profile"]
    lines = [ax for ax in profile.axes if ax.lines]
    assert all(len(ax.get_legend().get_texts()) == 3 for ax in lines)  # init, midway, latest
    assert {line.get_label() for line in lines[0].lines} == {"step 0", "step 2", "step 4"}
    assert legend_clear_of_axes(profile)


def test_few_layers_keep_the_lectures_plots_with_the_legend_beside(tmp_path):
    from helpers import TinyNet

    cbs = all_callbacks(1)
    trainer(tmp_path, cbs, max_steps=3, logger=False).fit(TinyNet(), loader())
    figures = plots.draw_all(*(cb.record for cb in cbs))
    assert "depth_profile" not in figures
    assert len(figures["activations"].axes[0].lines) == 2  # the lecture's overlaid lines
    for name in ("activations", "activation_gradients", "weight_gradients", "update_ratio"):
        assert legend_clear_of_axes(figures[name]), name
