"""A short training with all three netdiag callbacks, writing TensorBoard logs.

    python examples/quickstart.py            # then: tensorboard --logdir lightning_logs

A deep Tanh MLP on a synthetic task, initialised badly on purpose (weights too large, as in the
lecture's first attempt), so that the diagnostics have something to say: the hidden layers start
saturated and the update:data ratios sit far from -3. No data download, no GPU needed.
"""

from dataclasses import dataclass

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_netdiag import GradDataRatio, SaturationMonitor, UpdateRatio


@dataclass
class Config:
    n_inputs: int = 20  # features per example
    n_classes: int = 10  # targets are a fixed random function of the inputs
    n_hidden: int = 100  # width of each hidden layer
    n_layers: int = 4  # hidden Linear -> Tanh blocks
    init_gain: float = 3.0  # the lecture's right value for tanh is 5/3; 3.0 saturates on purpose
    lr: float = 0.1  # plain SGD
    batch_size: int = 32
    max_steps: int = 300
    every_n_steps: int = 10  # how often the diagnostics measure
    seed: int = 1337


class DeepTanhMLP(L.LightningModule):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        width = cfg.n_inputs
        for _ in range(cfg.n_layers):
            linear = nn.Linear(width, cfg.n_hidden)
            nn.init.normal_(linear.weight, std=cfg.init_gain / width**0.5)  # gain / sqrt(fan_in)
            layers += [linear, nn.Tanh()]
            width = cfg.n_hidden
        layers.append(nn.Linear(width, cfg.n_classes))
        self.net = nn.Sequential(*layers)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.cfg.lr)


def synthetic_data(cfg: Config) -> DataLoader:
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(4096, cfg.n_inputs, generator=g)
    teacher = torch.randn(cfg.n_inputs, cfg.n_classes, generator=g)
    return DataLoader(TensorDataset(x, (x @ teacher).argmax(1)), batch_size=cfg.batch_size, shuffle=True)


def main() -> None:
    cfg = Config()
    L.seed_everything(cfg.seed)
    sat = SaturationMonitor(every_n_steps=cfg.every_n_steps)
    grad = GradDataRatio(every_n_steps=cfg.every_n_steps)
    upd = UpdateRatio(every_n_steps=cfg.every_n_steps)
    trainer = L.Trainer(
        max_steps=cfg.max_steps,
        callbacks=[sat, grad, upd],
        log_every_n_steps=cfg.every_n_steps,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(DeepTanhMLP(cfg), synthetic_data(cfg))

    print(f"\nTensorBoard logs: {trainer.logger.log_dir}  (view: tensorboard --logdir {trainer.logger.root_dir})")
    print(f"{'layer':<8} {'saturated % at init -> end':>27} {'grad:data at end':>17} {'update:data log10':>18}")
    for i in range(1, 2 * cfg.n_layers, 2):
        saturated = sat.history[f"netdiag/act_saturated_pct/net.{i}"]
        ratio = grad.history[f"netdiag/grad_data_ratio/net.{i - 1}.weight"]
        update = upd.history[f"netdiag/update_data_log10/net.{i - 1}.weight"]
        print(
            f"net.{i:<4} {saturated[0][1]:>14.1f} -> {saturated[-1][1]:<10.1f} {ratio[-1][1]:>17.2e} "
            f"{update[-1][1]:>18.2f}"
        )


if __name__ == "__main__":
    main()
