"""A small character-level GPT (transformers' GPT2LMHeadModel) on the names data, under the netdiag callbacks.

    pip install -e ".[examples,models]"
    python examples/gpt_names.py                          # 12 blocks, embedded census names, 600 steps
    python examples/gpt_names.py --data names.txt --n-layer 24 --max-steps 3000

With default arguments the callbacks find GPT-2's own activation class (``NewGELUActivation``: a GELU
with the tanh approximation) in every block, and every weight of rank >= 2 (the token and position
embeddings, the attention and MLP matrices; the LM head, tied to the token embedding, once). With more
than ten layers the plots are heatmaps (layers in depth order) and a depth profile: each diagnostic
against depth at init, midway and the end. Each name is one sequence: ``.emma.`` padded to the block.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass

import lightning as L
import torch
from makemore_mlp import VOCAB, load_words
from torch.utils.data import DataLoader, TensorDataset

from lightning_netdiag import (
    DiagnosticPlots,
    GradDataRatio,
    HealthReport,
    LogitMonitor,
    OptimizerState,
    SaturationMonitor,
    UpdateRatio,
)

PAD = len(VOCAB)  # one token past the characters; its labels are ignored (-100)


@dataclass
class Config:
    data: str | None = None  # newline-separated words; None: the census names the `names` package ships
    block_size: int = 16  # tokens per sequence: '.' + name + '.', padded; longer names are cut
    n_layer: int = 12  # transformer blocks
    n_head: int = 4
    n_embd: int = 64
    max_steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3  # AdamW; a warm-up of 1/10 of the steps, then constant
    every_n_steps: int = 50  # diagnostics cadence
    seed: int = 1337
    root_dir: str = "."  # lightning_logs/ is written here


def encode(words: list[str], block_size: int) -> torch.Tensor:
    """One row per word: '.' + word + '.', padded with PAD (cut to block_size)."""
    stoi = {ch: i for i, ch in enumerate(VOCAB)}
    rows = torch.full((len(words), block_size), PAD)
    for i, w in enumerate(words):
        ids = [stoi[ch] for ch in f".{w}."][:block_size]
        rows[i, : len(ids)] = torch.tensor(ids)
    return rows


class CharGPT(L.LightningModule):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        self.cfg = cfg
        config = GPT2Config(
            vocab_size=PAD + 1, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
            n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        self.gpt = GPT2LMHeadModel(config)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        labels = x.masked_fill(x == PAD, -100)  # the model shifts them by one itself
        loss = self.gpt(input_ids=x, labels=labels).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def param_groups(self) -> list[dict]:
        """The optimizer's parameter groups: one, every parameter at the configured rate."""
        return [{"params": list(self.parameters())}]

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.param_groups(), lr=self.cfg.lr, weight_decay=0.1)
        warmup = max(1, self.cfg.max_steps // 10)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def train(cfg: Config, quiet: bool = False) -> tuple[L.Trainer, list]:
    torch.manual_seed(cfg.seed)
    words, source = load_words(cfg.data)
    if not quiet:
        print(f"data: {source}")
    data = DataLoader(TensorDataset(encode(words, cfg.block_size)), batch_size=cfg.batch_size, shuffle=True)
    every = cfg.every_n_steps
    callbacks = [
        SaturationMonitor(every_n_steps=every),
        GradDataRatio(every_n_steps=every),
        UpdateRatio(every_n_steps=every),
        DiagnosticPlots(),
        HealthReport(warn=not quiet, print_table=not quiet),
        LogitMonitor(every_n_steps=every),  # each block's attention logits, the LM head's log Z
        OptimizerState(every_n_steps=every),  # AdamW's normalised step, where eps dominates
    ]
    trainer = L.Trainer(
        max_steps=cfg.max_steps,
        callbacks=callbacks,
        log_every_n_steps=every,
        default_root_dir=cfg.root_dir,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=not quiet and sys.stdout.isatty(),
        enable_model_summary=not quiet,
        logger=L.pytorch.loggers.TensorBoardLogger(cfg.root_dir, name="lightning_logs/gpt_names"),
    )
    trainer.fit(CharGPT(cfg), data)
    return trainer, callbacks


def parse_config(argv: list[str] | None = None) -> Config:
    """Command-line flags named after the Config fields (``--n-layer 24``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=str if f.name == "data" else type(f.default),
                            default=f.default)  # fmt: skip
    return Config(**vars(parser.parse_args(argv)))


def main() -> None:
    trainer, callbacks = train(parse_config())
    print(f"watched activation layers: {len(callbacks[0].layer_kinds)}, weights: {len(callbacks[1].param_shapes)}")
    print(f"TensorBoard logs and plots (depth_profile.png among them): {trainer.logger.log_dir}")


if __name__ == "__main__":
    main()
