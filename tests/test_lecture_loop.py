"""examples/lecture_loop.py, the lecture's own loop with netdiag's lines added, gives the numbers of the
Lightning example on the same init and batches (both drawn from the lecture's seeded generator)."""

import math
import sys
from pathlib import Path

import pytest
from helpers import read_tensorboard

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))

from lecture_loop import train as train_loop  # noqa: E402
from makemore_mlp import Config  # noqa: E402
from makemore_mlp import train as train_lightning  # noqa: E402


@pytest.mark.parametrize("preset", ["original", "batchnorm"])
def test_the_lecture_loop_gives_the_lightning_examples_numbers(tmp_path, preset):
    steps, every = 400, 100
    diag, losses = train_loop(preset, max_steps=steps, every=every, out=str(tmp_path / "loop"), quiet=True)
    cfg = Config(preset=preset, max_steps=steps, every_n_steps=every, root_dir=str(tmp_path))
    pl = train_lightning(cfg, quiet=True)
    # The lecture's `p.data += -lr * p.grad` and SGD's `p.add_(grad, alpha=-lr)` round differently: the runs
    # agree to float precision at step 0, and later to the rounding that 400 steps of two formulas accumulate.
    assert losses["train"] == pytest.approx(pl.train_loss, rel=1e-4) and losses["val"] == pytest.approx(
        pl.val_loss, rel=1e-4
    )
    for meter, cb in ((diag.saturation, pl.saturation), (diag.grad_data, pl.grad_data), (diag.update, pl.update)):
        assert set(meter.history) == set(cb.history)
        for tag in cb.history:
            spread = tag.split("/")[1].endswith(("_std", "_ratio", "_log10", "_ce", "loss", "lr"))
            for (s1, v1), (s2, v2) in zip(meter.history[tag], cb.history[tag], strict=True):
                assert s1 == s2, tag
                if s1 == 0:
                    assert math.isclose(v1, v2, rel_tol=1e-6, abs_tol=1e-12), (tag, v1, v2)
                elif spread:
                    assert math.isclose(v1, v2, rel_tol=1e-3), (tag, s1, v1, v2)
    assert dict(diag.saturation.history["netdiag/init_loss"])[0] == pytest.approx(pl.init_loss, rel=1e-6)
    assert dict(diag.update.history["netdiag/lr"]) == {0: 0.1, 100: 0.1, 200: 0.01, 300: 0.01}
    scalars, _, _ = read_tensorboard(tmp_path / "loop")
    assert set(scalars) >= {t for t in diag.saturation.history}
