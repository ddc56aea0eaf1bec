"""The makemore example on a quick run: the lecture's init losses, its saturation story, real plots."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import read_tensorboard
from matplotlib.figure import Figure
from matplotlib.image import imread

from lightning_netdiag import plots

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from makemore_mlp import Config, load_words, parse_config, train  # noqa: E402

NAMES = Path(__file__).parents[2] / "shared" / "data" / "names.txt"
DATA = str(NAMES) if NAMES.exists() else None  # else the census names the `names` package ships


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("makemore")
    out = {}
    for preset in ("original", "fix-softmax", "fix-tanh", "batchnorm"):
        cfg = Config(preset=preset, data=DATA, max_steps=300, every_n_steps=50, root_dir=str(root))
        out[preset] = train(cfg, quiet=True)
    return out


def test_init_losses_are_the_lectures(runs):
    assert 20 < runs["original"].init_loss < 35  # the lecture: about 27 (27.88 on names.txt)
    for preset in ("fix-softmax", "fix-tanh", "batchnorm"):
        assert runs[preset].init_loss == pytest.approx(-math.log(1 / 27), abs=0.1)  # 3.2958
    if DATA is not None:
        assert runs["original"].init_loss == pytest.approx(27.8817, abs=0.01)  # the lecture's printed value


def test_saturation_story(runs):
    def saturation(preset: str) -> list[float]:
        sat = runs[preset].saturation
        layer = next(iter(sat.layer_types))
        return [v for _, v in sat.history[f"netdiag/act_saturated_pct/{layer}"]]

    assert saturation("original")[0] > 50 and saturation("fix-tanh")[0] < 10
    assert min(saturation("original")) > 5 * max(saturation("fix-tanh"))
    flagged = {p: {v.check for v in r.report.verdicts} for p, r in runs.items()}
    assert "saturation" in flagged["original"] and "saturation" not in flagged["batchnorm"]


def non_blank(path: Path) -> bool:
    pixels = imread(path)[..., :3]
    ink = (pixels < 0.9).any(axis=-1).mean()  # share of pixels that are not (nearly) white
    return ink > 0.01 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20


def test_plots_are_saved_logged_and_have_content(runs):
    run = runs["original"]
    folder = Path(run.log_dir) / "netdiag_plots"
    names = {"activations", "activation_gradients", "activations_over_time", "weight_gradients", "update_ratio"}
    assert {p.stem for p in folder.glob("*.png")} == names
    for name in names:
        assert non_blank(folder / f"{name}.png"), name
    _, _, acc = read_tensorboard(run.log_dir)
    assert {f"netdiag/plots/{n}" for n in names} <= set(acc.Tags()["images"])
    text = acc.Tensors("netdiag/health_report/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "saturation" in text


def test_each_plot_draws_real_lines_on_a_given_axis(runs):
    run = runs["fix-tanh"]
    layer = next(iter(run.saturation.layer_types))
    cases = [
        (plots.activation_distribution, run.saturation.record, f"{layer} (Tanh): mean"),
        (plots.activation_gradient_distribution, run.saturation.record, f"{layer} (Tanh): mean"),
        (plots.weight_gradient_distribution, run.grad_data.record, "net.0.weight (200, 30): grad:data"),
        (plots.update_ratio_over_time, run.update.record, "net.0.weight"),
    ]
    for draw, callback, label in cases:
        fig = Figure()
        ax = fig.add_subplot()
        assert draw(callback, ax=ax) is fig
        lines = [line for line in ax.lines if np.isfinite(line.get_ydata()).all() and len(line.get_ydata()) > 3]
        assert lines, draw.__name__
        assert any(line.get_label().startswith(label) for line in ax.lines), draw.__name__
    fig = plots.update_ratio_over_time(run.update.record)
    target = [line for line in fig.axes[0].lines if line.get_label() == "target -3"]
    assert target and set(target[0].get_ydata()) == {-3.0}
    heat = plots.distribution_over_time(run.saturation.record, "act", layer)
    assert heat.axes[0].collections[0].get_array().shape == (64, 6)  # 64 tanh bins x 6 recorded steps
    early = plots.activation_distribution(run.saturation.record, step=0)
    assert "(step 0)" in early.axes[0].get_title()


def test_data_and_presets():
    words, source = load_words(None)
    assert len(words) > 4000 and "names" in source and all(set(w) <= set("abcdefghijklmnopqrstuvwxyz") for w in words)
    cfg = parse_config(["--preset", "deep", "--max-steps", "10", "--gain", "1.0"])
    assert (cfg.preset, cfg.max_steps, cfg.gain) == ("deep", 10, 1.0)
    with pytest.raises(SystemExit):
        parse_config(["--preset", "nonsense"])
