"""makemore's character-level MLP (Karpathy, nn-zero-to-hero lecture 4) under the netdiag callbacks.

    python examples/makemore_mlp.py                          # kaiming preset, embedded names, 20k steps
    python examples/makemore_mlp.py --preset original --data names.txt --max-steps 200000
    python examples/makemore_mlp.py --preset deep --gain 1.0     # the lecture's 5-layer net, a bad gain

Presets replay the lecture's incremental fixes of the one-hidden-layer MLP (original, fix-softmax,
fix-tanh, kaiming, batchnorm) or build its deep diagnostic network (deep, deep-nobn). The init and the
batch indices come from one generator seeded as in the lecture, in the lecture's order, so that a full
run retraces its numbers. At the end it prints the final losses and the health report, and leaves
TensorBoard logs and the four plots (PNG) under lightning_logs/.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from lightning_netdiag import DiagnosticPlots, GradDataRatio, HealthReport, SaturationMonitor, UpdateRatio

PRESETS = ("original", "fix-softmax", "fix-tanh", "kaiming", "batchnorm", "deep", "deep-nobn")
VOCAB = "." + "abcdefghijklmnopqrstuvwxyz"  # '.' starts and ends every word


@dataclass
class Config:
    preset: str = "kaiming"  # one of PRESETS
    data: str | None = None  # newline-separated words; None: the census names the `names` package ships
    block_size: int = 3  # characters of context
    n_embd: int = 10  # embedding size per character
    n_hidden: int = 200  # hidden width of the one-layer MLP (the deep presets use 100)
    gain: float = 5 / 3  # tanh gain of the deep presets' init
    max_steps: int = 20_000  # the lecture trains 200_000
    batch_size: int = 32
    lr: float = 0.1  # dropped to lr / 10 halfway, as in the lecture
    seed: int = 2147483647  # the lecture's generator seed (init and batch indices)
    every_n_steps: int = 100  # diagnostics cadence
    root_dir: str = "."  # lightning_logs/ is written here


# --- data --------------------------------------------------------------------------------------------


def load_words(path: str | None) -> tuple[list[str], str]:
    """The words and a line saying where they came from."""
    if path is not None:
        words = Path(path).read_text().split()
        source = f"{path} ({len(words)} words)"
    else:  # offline default: the 1990 US census first names, shipped inside the `names` package
        files = [resources.files("names") / f for f in ("dist.female.first", "dist.male.first")]
        words = sorted({line.split()[0].lower() for f in files for line in f.read_text().splitlines() if line})
        source = f"census first names from the `names` package ({len(words)} words)"
    words = [w for w in (w.strip().lower() for w in words) if w and set(w) <= set(VOCAB[1:])]
    return words, source


def build_dataset(words: list[str], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (previous block_size characters -> next character) example of the words."""
    stoi = {ch: i for i, ch in enumerate(VOCAB)}
    xs, ys = [], []
    for w in words:
        context = [0] * block_size
        for ch in w + ".":
            xs.append(context)
            ys.append(stoi[ch])
            context = context[1:] + [stoi[ch]]
    return torch.tensor(xs), torch.tensor(ys)


def splits(words: list[str], block_size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """80/10/10 after the lecture's seeded shuffle."""
    words = list(words)
    random.seed(42)
    random.shuffle(words)
    n1, n2 = int(0.8 * len(words)), int(0.9 * len(words))
    parts = {"train": words[:n1], "val": words[n1:n2], "test": words[n2:]}
    return {name: build_dataset(ws, block_size) for name, ws in parts.items()}


# --- model -------------------------------------------------------------------------------------------


class MakemoreMLP(L.LightningModule):
    """Embedding -> MLP -> logits over the 27 characters; SGD with the lecture's step-down schedule."""

    def __init__(self, cfg: Config, g: torch.Generator) -> None:
        super().__init__()
        if cfg.preset not in PRESETS:
            raise ValueError(f"Expected `preset` to be one of {PRESETS}, got {cfg.preset!r}")
        self.cfg = cfg
        self.emb = nn.Embedding(len(VOCAB), cfg.n_embd)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(len(VOCAB), cfg.n_embd, generator=g))
            self.net = self._deep(cfg, g) if cfg.preset.startswith("deep") else self._one_hidden(cfg, g)
        self.init_loss: float | None = None

    @staticmethod
    def _one_hidden(cfg: Config, g: torch.Generator) -> nn.Sequential:
        """The lecture's W1, b1, W2, b2, drawn in its order, scaled by the preset's fix."""
        fan_in, p = cfg.n_embd * cfg.block_size, cfg.preset
        w1_scale = {"original": 1.0, "fix-softmax": 1.0, "fix-tanh": 0.2}.get(p, (5 / 3) / fan_in**0.5)
        batchnorm = p == "batchnorm"
        hidden = nn.Linear(fan_in, cfg.n_hidden, bias=not batchnorm)  # a bias before BatchNorm is useless
        hidden.weight.copy_((torch.randn(fan_in, cfg.n_hidden, generator=g) * w1_scale).T)
        if not batchnorm:
            hidden.bias.copy_(
                torch.randn(cfg.n_hidden, generator=g) * (1.0 if p in ("original", "fix-softmax") else 0.01)
            )
        out = nn.Linear(cfg.n_hidden, len(VOCAB))
        out.weight.copy_((torch.randn(cfg.n_hidden, len(VOCAB), generator=g) * (1.0 if p == "original" else 0.01)).T)
        out.bias.copy_(torch.randn(len(VOCAB), generator=g) * (1.0 if p == "original" else 0.0))
        norm = [nn.BatchNorm1d(cfg.n_hidden)] if batchnorm else []
        return nn.Sequential(hidden, *norm, nn.Tanh(), out)

    @staticmethod
    def _deep(cfg: Config, g: torch.Generator) -> nn.Sequential:
        """Five blocks Linear(bias=False) -> [BatchNorm1d] -> Tanh of width 100, then Linear -> [BatchNorm1d]."""
        batchnorm, width = cfg.preset == "deep", 100
        sizes = [cfg.n_embd * cfg.block_size] + [width] * 5 + [len(VOCAB)]
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            last = i == len(sizes) - 2
            linear = nn.Linear(fan_in, fan_out, bias=False)
            # the lecture's Linear: randn / sqrt(fan_in); tanh gain on the hidden ones, a small last layer
            scale = (0.1 if not batchnorm else 1.0) if last else cfg.gain
            linear.weight.copy_((torch.randn(fan_in, fan_out, generator=g) / fan_in**0.5 * scale).T)
            layers.append(linear)
            if batchnorm:
                norm = nn.BatchNorm1d(fan_out)
                if last:
                    norm.weight.mul_(0.1)  # a less confident softmax at init
                layers.append(norm)
            if not last:
                layers.append(nn.Tanh())
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.emb(x).view(x.shape[0], -1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.init_loss is None:
            self.init_loss = loss.item()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.cfg.lr)
        half = self.cfg.max_steps // 2
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step < half else 0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@torch.no_grad()
def split_loss(model: MakemoreMLP, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return F.cross_entropy(model(x), y).item()


# --- training ----------------------------------------------------------------------------------------


@dataclass
class Result:
    cfg: Config
    data_source: str
    init_loss: float
    train_loss: float
    val_loss: float
    saturation: SaturationMonitor
    grad_data: GradDataRatio
    update: UpdateRatio
    report: HealthReport
    log_dir: str


def train(cfg: Config, quiet: bool = False) -> Result:
    words, source = load_words(cfg.data)
    data = splits(words, cfg.block_size)
    g = torch.Generator().manual_seed(cfg.seed)
    model = MakemoreMLP(cfg, g)
    xtr, ytr = data["train"]
    # With replacement, RandomSampler draws 32 indices per torch.randint call: the lecture's batches, from g.
    sampler = RandomSampler(range(len(xtr)), replacement=True, num_samples=cfg.max_steps * cfg.batch_size, generator=g)
    loader = DataLoader(TensorDataset(xtr, ytr), batch_size=cfg.batch_size, sampler=sampler)

    sat, grad, update = (
        SaturationMonitor(every_n_steps=cfg.every_n_steps),
        GradDataRatio(every_n_steps=cfg.every_n_steps),
        UpdateRatio(every_n_steps=cfg.every_n_steps),
    )
    report = HealthReport(warn=not quiet, print_table=not quiet)
    trainer = L.Trainer(
        max_steps=cfg.max_steps,
        callbacks=[sat, grad, update, DiagnosticPlots(), report],
        log_every_n_steps=cfg.every_n_steps,
        default_root_dir=cfg.root_dir,
        accelerator="cpu",
        devices=1,
        use_distributed_sampler=False,
        enable_checkpointing=False,
        enable_progress_bar=not quiet and sys.stdout.isatty(),  # a bar floods CI logs
        enable_model_summary=not quiet,
        logger=L.pytorch.loggers.TensorBoardLogger(cfg.root_dir, name=f"lightning_logs/{cfg.preset}"),
    )
    trainer.fit(model, loader)
    return Result(
        cfg=cfg,
        data_source=source,
        init_loss=model.init_loss if model.init_loss is not None else float("nan"),
        train_loss=split_loss(model, *data["train"]),
        val_loss=split_loss(model, *data["val"]),
        saturation=sat,
        grad_data=grad,
        update=update,
        report=report,
        log_dir=trainer.logger.log_dir,
    )


def parse_config(argv: list[str] | None = None, **defaults) -> Config:
    """Command-line flags named after the Config fields (``--max-steps 1000``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        default = defaults.get(f.name, f.default)
        kind = str if f.name == "data" else type(f.default)
        kwargs = {"choices": PRESETS} if f.name == "preset" else {}
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=default, **kwargs)
    return Config(**vars(parser.parse_args(argv)))


def main() -> None:
    result = train(parse_config())
    print(f"\ndata: {result.data_source}")
    print(
        f"preset {result.cfg.preset}: loss at init {result.init_loss:.4f}, after {result.cfg.max_steps} steps "
        f"train {result.train_loss:.4f} val {result.val_loss:.4f}"
    )
    print(f"TensorBoard logs and plots: {result.log_dir}")


if __name__ == "__main__":
    main()
