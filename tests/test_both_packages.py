"""The callbacks under the Trainer, logger and precision plugin of ``lightning.pytorch`` and of the standalone
``pytorch_lightning`` package, whose classes are different ones: each run's numbers and histograms are read
back and checked against the lecture's formulas."""

import importlib

import pytest
import torch
from helpers import GRAD_EDGES, TANH_EDGES, TinyNetBody, assert_matches_reference, bin_counts, loader, read_tensorboard

from lightning_netdiag import GradDataRatio, SaturationMonitor, UpdateRatio


@pytest.mark.parametrize("package", ["lightning.pytorch", "pytorch_lightning"])
def test_each_package_trainer_logger_and_amp_plugin(tmp_path, package):
    pl = pytest.importorskip(package)
    loggers, plugins = importlib.import_module(f"{package}.loggers"), importlib.import_module(f"{package}.plugins")

    class Net(TinyNetBody, pl.LightningModule):
        pass

    model = Net()
    trainer = pl.Trainer(
        max_steps=3,
        callbacks=[SaturationMonitor(every_n_steps=1), GradDataRatio(every_n_steps=1), UpdateRatio(every_n_steps=1)],
        logger=loggers.TensorBoardLogger(tmp_path, name="tb"),
        # fp16 with a real GradScaler: the callbacks must find this package's scaler to unscale gradients
        plugins=[plugins.MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=1024.0))],
        accelerator="cpu",
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader())
    if package == "pytorch_lightning":  # the premise: another class, so no isinstance check could pass
        assert not isinstance(trainer.logger, importlib.import_module("lightning.pytorch.loggers").TensorBoardLogger)
    scalars, hists, _ = read_tensorboard(trainer.logger.log_dir)
    assert assert_matches_reference(scalars, model.ref, rel=1e-4) > 40
    assert "netdiag/act/net.2/q50" not in scalars  # recognised as TensorBoard: real histograms, no fallback
    for tag in ("netdiag/act/net.2", "netdiag/act_grad/net.4", "netdiag/grad/net.3.weight"):
        assert sorted(hists[tag]) == [0, 1, 2]
        for step, h in hists[tag].items():
            act = tag.startswith("netdiag/act/")
            full = bin_counts(model.ref_tensors[step][tag], TANH_EDGES if act else GRAD_EDGES, by_magnitude=not act)
            used = [i for i, c in enumerate(full) if c > 0]
            assert list(h.bucket) == full[used[0] : used[-1] + 1], (tag, step)
