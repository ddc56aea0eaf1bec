"""Activation checkpointing: the forward recomputed during the backward is neither recorded again nor
counted as another call, and D2 still comes out: every number equals the run without checkpointing.

torch.utils.checkpoint in both modes (reentrant: the first forward runs without grad, so D2 comes from the
recomputation; non-reentrant: from the first forward), and transformers' ``gradient_checkpointing_enable()``.
FSDP2 with activation checkpointing is in test_distributed.py.
"""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import all_callbacks, loader, trainer
from torch import nn
from torch.utils.checkpoint import checkpoint


class Blocks(L.LightningModule):
    """A Tanh module called twice inside one checkpointed segment, and a functional GELU in another."""

    def __init__(self, mode: str | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.l1, self.l2, self.l3, self.out = (nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 16),
                                                         nn.Linear(16, 16), nn.Linear(16, 4))  # fmt: skip
        self.act = nn.Tanh()
        with torch.no_grad():
            self.inp.weight.mul_(3)
        self.mode = mode

    def twice(self, h):
        return self.act(self.l2(self.act(self.l1(h))))

    def gelu(self, h):
        return F.gelu(self.l3(h))

    def run(self, fn, h):
        if self.mode is None:
            return fn(h)
        return checkpoint(fn, h, use_reentrant=self.mode == "reentrant")

    def forward(self, x):
        return self.out(self.run(self.gelu, self.run(self.twice, self.inp(x))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01)


def histories(tmp_path, module: L.LightningModule, data, steps: int = 3) -> dict[str, dict[int, float]]:
    cbs = all_callbacks(1)
    trainer(tmp_path, cbs, logger=False, max_steps=steps, limit_val_batches=0).fit(module, data)
    return {tag: dict(points) for cb in cbs for tag, points in cb.history.items()}


def assert_same(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for tag, points in expected.items():
        assert sorted(got[tag]) == sorted(points), tag
        for step, v in points.items():
            assert math.isclose(got[tag][step], v, rel_tol=1e-5, abs_tol=1e-9), (tag, step, got[tag][step], v)


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_torch_checkpoint_records_each_call_once_with_d2(tmp_path, mode):
    plain = histories(tmp_path / "plain", Blocks(None), loader(batch_size=8))
    layers = {tag.split("/", 2)[2] for tag in plain if tag.startswith("netdiag/act_grad_std/")}
    assert layers == {"act", "act-2", "gelu"}  # the reused Tanh: two calls; the functional GELU: one
    assert_same(histories(tmp_path / mode, Blocks(mode), loader(batch_size=8)), plain)


def test_transformers_gradient_checkpointing(tmp_path):
    tf = pytest.importorskip("transformers")
    from test_real_models import Wrap, tokens

    def gpt2(checkpointing: bool) -> L.LightningModule:
        torch.manual_seed(0)
        config = tf.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                               embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)  # fmt: skip
        model = tf.GPT2LMHeadModel(config)
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.is_gradient_checkpointing
        return Wrap(model, lm=True)

    plain = histories(tmp_path / "plain", gpt2(False), tokens(), steps=2)
    assert {"netdiag/act_grad_std/model.transformer.h.1.mlp.act"} <= set(plain)
    assert_same(histories(tmp_path / "ckpt", gpt2(True), tokens(), steps=2), plain)
