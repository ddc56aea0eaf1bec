"""Trains a BatchNorm-free net on 2 CPU ranks (or one process on the global batch) and writes metrics.csv.

    python tests/ddp_run.py OUT_DIR STRATEGY DEVICES     # STRATEGY: ddp, ddp_spawn or auto (one process)

Each rank's loader yields its own half of the global batch, in order, so that the one-process run on
batches of 2 * PER_RANK sees exactly the concatenation of the ranks' batches.
"""

import sys

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_netdiag import GradDataRatio, SaturationMonitor, UpdateRatio

PER_RANK, STEPS = 8, 3


class Halves(Dataset):
    """Step s, rank r: examples [s*2*PER_RANK + r*PER_RANK, ... + PER_RANK); one process: the whole step."""

    def __init__(self, rank: int, world: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(STEPS * 2 * PER_RANK, 6, generator=g) * 2
        self.y = torch.randint(0, 4, (STEPS * 2 * PER_RANK,), generator=g)
        per = 2 * PER_RANK // world
        self.index = [s * 2 * PER_RANK + rank * per + i for s in range(STEPS) for i in range(per)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        return self.x[self.index[i]], self.y[self.index[i]]


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
        with torch.no_grad():
            self.net[0].weight.mul_(3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        world = self.trainer.world_size
        return DataLoader(Halves(self.trainer.global_rank, world), batch_size=2 * PER_RANK // world, shuffle=False)


def main() -> None:
    out, strategy, devices = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cbs = [SaturationMonitor(every_n_steps=1), GradDataRatio(every_n_steps=1), UpdateRatio(every_n_steps=1)]
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        callbacks=cbs,
        logger=CSVLogger(out, name="csv", version=0),
        use_distributed_sampler=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Net())


if __name__ == "__main__":
    main()
