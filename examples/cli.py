"""The makemore MLP under LightningCLI, with the netdiag callbacks configured in YAML (examples/cli.yaml).

    python examples/cli.py fit --config examples/cli.yaml
    python examples/cli.py fit --config examples/cli.yaml --model.preset deep --model.gain 1.0 \
        --trainer.max_steps 500

Callbacks can also be added on the command line:
``--trainer.callbacks+=lightning_netdiag.UpdateRatio --trainer.callbacks.target=-2.5``.
"""

from __future__ import annotations

import dataclasses

import lightning as L
import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from makemore_mlp import Config, MakemoreMLP, load_words, splits
from torch.utils.data import DataLoader, TensorDataset


class CliMLP(MakemoreMLP):
    """MakemoreMLP built from plain arguments, as LightningCLI builds it from YAML."""

    def __init__(
        self,
        preset: str = "kaiming",
        block_size: int = 3,
        n_embd: int = 10,
        n_hidden: int = 200,
        gain: float = 5 / 3,
        lr: float = 0.1,
        seed: int = 2147483647,
    ) -> None:
        cfg = Config(preset=preset, block_size=block_size, n_embd=n_embd, n_hidden=n_hidden, gain=gain, lr=lr)
        super().__init__(cfg, torch.Generator().manual_seed(seed))

    def configure_optimizers(self):
        # the lecture's learning-rate drop halfway through, of the Trainer's run
        self.cfg = dataclasses.replace(self.cfg, max_steps=self.trainer.max_steps)
        return super().configure_optimizers()


class NamesData(L.LightningDataModule):
    """The words split 80/10/10 as in the lecture; ``data=None`` uses the census names (offline)."""

    def __init__(self, data: str | None = None, block_size: int = 3, batch_size: int = 32) -> None:
        super().__init__()
        self.data, self.block_size, self.batch_size = data, block_size, batch_size

    def setup(self, stage: str) -> None:
        self.splits = splits(load_words(self.data)[0], self.block_size)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.splits["train"]), batch_size=self.batch_size, shuffle=True)


class CLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.block_size", "model.block_size")


if __name__ == "__main__":
    CLI(CliMLP, NamesData)
