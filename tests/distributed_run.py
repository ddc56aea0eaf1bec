"""Trains a BatchNorm-free net on 2 CPU ranks (or one process on the global batch) and writes metrics.csv.

    python tests/distributed_run.py OUT_DIR STRATEGY DEVICES [PRECISION] [FAULT] [OPTIMIZER]

STRATEGY: ddp, ddp_spawn, fsdp2 (ModelParallelStrategy with `fully_shard` on every Linear: DTensor
parameters sharded over the ranks), fsdp2_ac (the same with activation checkpointing on each Tanh: its
forward is recomputed in the backward), hsdp (the same over a 2 x 1 mesh: replicated over the ranks) or
auto (one process). PRECISION: 32-true (default), 16-mixed (with a
GradScaler) or bf16-mixed. FAULT, on rank 1 at step 1: raise (an exception in training_step) or nan (an
infinite loss; HealthReport stops every rank). OPTIMIZER: sgd (default) or adamw (with OptimizerState: Adam's
moments sharded like the weights). Each rank writes its last global step to OUT_DIR/rank{r}.txt.

A Tanh branch ("side") and a functional sigmoid run on the first PER_RANK examples only: on rank 0 and
never on rank 1, so the ranks' records must line up although one rank never ran (or found) that layer.

Each rank's loader yields its own half of the global batch, in order, so that the one-process run on
batches of 2 * PER_RANK sees exactly the concatenation of the ranks' batches.
"""

import math
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_netdiag import (
    FlightRecorder,
    GradDataRatio,
    HealthReport,
    LogitMonitor,
    OptimizerState,
    SaturationMonitor,
    UpdateRatio,
)

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
    def __init__(self, shard: str | None = None, fault: str = "none", optimizer: str = "sgd") -> None:
        super().__init__()
        torch.manual_seed(0)
        # 5 output rows: shards of unequal size (3 and 2 rows) on 2 ranks
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5), nn.Tanh(), nn.Linear(5, 4))
        self.side = nn.Tanh()
        with torch.no_grad():
            self.net[0].weight.mul_(3)
        self.shard, self.fault, self.optimizer = shard, fault, optimizer

    def configure_model(self) -> None:
        if self.shard:
            from torch.distributed.fsdp import fully_shard

            # fsdp2: sharded over the ranks. hsdp: the 2 x 1 mesh, replicated over the ranks and sharded over
            # one: every rank holds a full copy as a DTensor with a Replicate placement.
            mesh = self.device_mesh if self.shard == "hsdp" else self.device_mesh["data_parallel"]
            if self.shard == "fsdp2_ac":
                from torch.distributed._composable import checkpoint

                for m in self.net:
                    if isinstance(m, nn.Tanh):
                        checkpoint(m)
            for m in self.net:
                if isinstance(m, nn.Linear):
                    fully_shard(m, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.net[:2](x)
        loss = nn.functional.cross_entropy(self.net[2:](h), y)
        if self.global_rank == 0:  # divided by the local batch: DDP's mean over ranks gives the global one
            loss = loss + 0.1 * self.side(h[:PER_RANK]).sum() / len(x)
            # A functional call too: rank 1 never makes it, so the ranks must agree on the layer list.
            loss = loss + 0.1 * torch.sigmoid(h[:PER_RANK]).sum() / len(x)
        if self.global_rank == 1 and self.global_step == 1:
            if self.fault == "raise":
                raise RuntimeError("rank 1 fails at step 1")
            if self.fault == "nan":
                loss = loss * math.inf
        return loss

    def on_train_end(self) -> None:
        Path(self.trainer.default_root_dir, f"rank{self.global_rank}.txt").write_text(str(self.global_step))

    def configure_optimizers(self):
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=1e-2)
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        world = self.trainer.world_size
        return DataLoader(Halves(self.trainer.global_rank, world), batch_size=2 * PER_RANK // world, shuffle=False)


def main() -> None:
    out, strategy, devices = sys.argv[1], sys.argv[2], int(sys.argv[3])
    precision = sys.argv[4] if len(sys.argv) > 4 else "32-true"
    fault = sys.argv[5] if len(sys.argv) > 5 else "none"
    optimizer = sys.argv[6] if len(sys.argv) > 6 else "sgd"
    plugins = []
    if precision == "16-mixed":
        plugins = [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=1024.0))]
        precision = None
    shard = strategy if strategy in ("fsdp2", "fsdp2_ac", "hsdp") else None
    if shard:
        strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    cbs = [
        SaturationMonitor(every_n_steps=1),
        GradDataRatio(every_n_steps=1, ndims=None),
        UpdateRatio(every_n_steps=1, ndims=None),
        LogitMonitor(every_n_steps=1),  # the output's logits: rows summed over the ranks, the largest maxed
        FlightRecorder(),  # every step: the loss averaged over the ranks, the norms of the reduced gradients
        HealthReport(stop_on_fatal=True, print_table=False),
    ]
    if optimizer == "adamw":
        cbs.append(OptimizerState(every_n_steps=1))
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        precision=precision,
        plugins=plugins,
        callbacks=cbs,
        logger=CSVLogger(out, name="csv", version=0),
        use_distributed_sampler=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(Net(shard, fault, optimizer))
    # gloo's worker threads must end before the interpreter does: a rank that exits with its process group alive
    # can abort at exit ("terminate called without an active exception", SIGABRT; pytorch/pytorch#190489).
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
