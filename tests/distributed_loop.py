"""The plain-loop front end on 2 CPU ranks (gloo, DDP): the net and data of distributed_run.py, trained by a
hand-written loop with NetDiag; rank 0 writes every measurement to OUT_DIR/loop.json.

    python tests/distributed_loop.py OUT_DIR
"""

import json
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distributed_run import PER_RANK, STEPS, Halves, Net
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_netdiag import NetDiag
from lightning_netdiag.meters import ActivationMeter, GradDataMeter, UpdateMeter
from lightning_netdiag.sinks import quantile_scalars


class LoopNet(Net):
    """distributed_run.Net's training step as a forward, so that DDP's forward syncs its gradients."""

    def forward(self, x, y, rank: int):
        h = self.net[:2](x)
        loss = nn.functional.cross_entropy(self.net[2:](h), y)
        if rank == 0:
            loss = loss + 0.1 * self.side(h[:PER_RANK]).sum() / len(x)
            loss = loss + 0.1 * torch.sigmoid(h[:PER_RANK]).sum() / len(x)
        return loss


def worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = DistributedDataParallel(LoopNet())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = Halves(rank, world)
    per = 2 * PER_RANK // world
    meters = {
        "saturation": ActivationMeter(),
        "grad_data": GradDataMeter(ndims=None),
        "update": UpdateMeter(ndims=None),
    }
    with NetDiag(model, optimizer, every_n_steps=1, **meters) as diag:
        for step in range(STEPS):
            x, y = zip(*(data[step * per + i] for i in range(per)), strict=True)
            loss = model(torch.stack(x), torch.stack(y), rank)
            optimizer.zero_grad()
            loss.backward()
            diag.loss(loss)  # this rank's: the recorder's is their mean over the ranks
            optimizer.step()
    if rank == 0:
        history = {tag: dict(m.history[tag]) for m in diag.meters for tag in m.history}
        for m in diag.meters:  # the quantiles a CSV log gets in place of each histogram
            for tag in m.history.histogram_tags():
                for step, hist in m.history.histograms_of(tag):
                    for name, value in quantile_scalars({tag: hist}).items():
                        history.setdefault(name, {})[step] = value
        with open(os.path.join(out, "loop.json"), "w") as f:
            json.dump(history, f)
    dist.destroy_process_group()


def main() -> None:
    out = sys.argv[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, out), nprocs=2)


if __name__ == "__main__":
    main()
