"""The lecture's own training loop (makemore part 3: no Trainer, no optimizer) with netdiag added.

    python examples/lecture_loop.py                                             # 20,000 steps, census names
    python examples/lecture_loop.py --data ../shared/data/names.txt --steps 200000   # the lecture's run

The loop is the notebook's: sample a batch with the seeded generator, forward, zero the grads, backward,
``p.data += -lr * p.grad`` with the step-down at half. netdiag adds the four lines marked ``# netdiag``. The
layers are the lecture's as ``torch.nn`` modules (examples/makemore_mlp.py builds them, drawing the init
from the same generator in the lecture's order), so the numbers are the Lightning example's and the lecture's.
The TensorBoard logs go to ``runs/lecture_loop/``, the plots to ``runs/lecture_loop/plots/``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from makemore_mlp import PRESETS, Config, MakemoreMLP, load_words, split_loss, splits
from torch.nn import functional as F
from torch.utils.tensorboard import SummaryWriter

from lightning_netdiag import NetDiag


def train(preset: str = "kaiming", data: str | None = None, max_steps: int = 20_000, every: int = 100,
          out: str = "runs/lecture_loop", quiet: bool = False) -> tuple[NetDiag, dict[str, float]]:  # fmt: skip
    words, _ = load_words(data)
    data = splits(words, block_size=3)
    Xtr, Ytr = data["train"]
    Xdev, Ydev = data["val"]
    g = torch.Generator().manual_seed(2147483647)  # the lecture's seed, for the init and the batches
    model = MakemoreMLP(Config(preset=preset), g)
    parameters = list(model.parameters())
    batch_size = 32

    writer = SummaryWriter(out)  # netdiag
    diag = NetDiag(model, writer=writer, every_n_steps=every).attach()  # netdiag
    lossi = []
    for i in range(max_steps):
        # minibatch construct
        ix = torch.randint(0, Xtr.shape[0], (batch_size,), generator=g)
        Xb, Yb = Xtr[ix], Ytr[ix]
        # forward pass
        logits = model(Xb)
        loss = F.cross_entropy(logits, Yb)
        # backward pass
        for p in parameters:
            p.grad = None
        loss.backward()
        # update
        lr = 0.1 if i < max_steps // 2 else 0.01  # step learning rate decay
        diag.step(loss, lr)  # netdiag: after the backward, before the update
        for p in parameters:
            p.data += -lr * p.grad
        # track stats
        if not quiet and i % 10_000 == 0:
            print(f"{i:7d}/{max_steps:7d}: {loss.item():.4f}")
        lossi.append(loss.log10().item())
    diag.close()  # netdiag: measures the last update, removes the hooks
    writer.close()
    losses = {"train": split_loss(model, Xtr, Ytr), "val": split_loss(model, Xdev, Ydev)}
    return diag, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="kaiming", choices=PRESETS)
    parser.add_argument("--data", default=None, help="newline-separated words (default: census names)")
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--every", type=int, default=100, help="diagnostics cadence")
    parser.add_argument("--out", default="runs/lecture_loop")
    args = parser.parse_args()
    diag, losses = train(args.preset, args.data, args.steps, args.every, args.out)
    print(f"train {losses['train']:.4f}  val {losses['val']:.4f}")
    diag.report()
    plots = Path(args.out) / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    for name, fig in diag.plots().items():
        fig.savefig(plots / f"{name}.png", dpi=100)
    print(f"plots: {plots}/")


if __name__ == "__main__":
    main()
