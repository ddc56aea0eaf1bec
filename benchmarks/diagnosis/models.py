"""The diagnosis suite's models and data: small real training runs on CPU, offline data only.

Each builder takes a :class:`Recipe` (the healthy recipe, or a twin with one thing changed) and returns the
LightningModule and its training DataLoader. The data: the names the examples use (the `names` package's
census first names, or ``--data names.txt``) and scikit-learn's bundled 8x8 digits (1,797 images).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))
import gpt_names  # noqa: E402
import makemore_mlp  # noqa: E402


@dataclass(frozen=True)
class Recipe:
    """One training run: the model family, its optimizer and schedule, and the single thing changed."""

    model: str  # "makemore", "gpt", "cnn", "vit", "gru", "relu-mlp", "tiny-lm"
    steps: int
    lr: float
    options: dict[str, Any] = field(default_factory=dict)  # the model's own knobs (preset, gain, faults)
    precision: str = "32-true"  # "16-unscaled": fp16 autocast with the loss scaler turned off
    data: str | None = None  # a names file; None: the census names of the `names` package


@dataclass(frozen=True)
class Fault:
    """A fault injected mid-run, at training step ``step`` (counted by the module: every front end alike):

    - ``"layer lr"``: the parameters of ``layer`` (a name prefix) in a parameter group of their own, whose rate is
      multiplied by ``factor`` from ``step`` on;
    - ``"scale weight"``: the weight ``layer`` multiplied by ``factor`` just before ``step``;
    - ``"global lr"``: every parameter group's rate multiplied by ``factor`` from ``step`` on (a schedule's bug, a bad
      resume);
    - ``"corrupt batch"``: the labels of the batch of ``step`` drawn at random (garbage);
    - ``"shuffle labels"``: the labels of the batch of ``step`` given to the wrong rows (a misaligned shard);
    - ``"repeat token"``: every input and label of the batch of ``step`` one token (a shard of padding);
    - ``"scale inputs"``: the inputs of the batch of ``step`` multiplied by ``factor`` (a unit's or a decoder's bug);
    - ``"corrupt element"``: one element of the weight ``layer`` set to ``factor`` just before ``step`` (a bit flip);
    - ``"flaky"``: the network's output at ``step`` multiplied by ``factor`` once, as it ran: the same forward run
      again is right (a fault of the hardware that does not reproduce);
    - ``"divide by zero"``: the output of module ``layer`` divided by zero from ``step`` on (inf and NaN);
    - ``"fp16 overflow"``: nothing injected (``step`` never comes): the run's own course, in float16 without a loss
      scaler, overflows float16's range.
    """

    kind: str
    step: int
    layer: str | None = None
    factor: float = 1.0


class Classifier(L.LightningModule):
    """A network, a cross-entropy loss, an optimizer with a linear warm-up over the first tenth of the steps
    (unless ``warmup`` is False) and a cosine decay to a tenth after it; images are augmented (:func:`augment`)
    unless ``augmented`` is False; a :class:`Fault` injected mid-run where ``fault`` is given. ``schedule``: after the
    warm-up, ``"cosine"``, ``"restarts"`` (the cosine restarted twice: three cycles) or ``"step"`` (a tenth at half
    the steps, a hundredth at three quarters); ``unfreeze=(prefix, step)``: those parameters frozen until ``step``."""

    def __init__(
        self, net: nn.Module, optimizer: str, lr: float, steps: int, weight_decay: float = 0.0,
        momentum: float = 0.9, param_groups: Any = None, augmented: bool = True, warmup: bool = True,
        eps: float = 1e-8, fault: Fault | None = None, schedule: str = "cosine",
        unfreeze: tuple[str, int] | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.net, self.optimizer_name, self.lr, self.steps = net, optimizer, lr, steps
        self.weight_decay, self.momentum, self.param_groups = weight_decay, momentum, param_groups
        self.augmented, self.warmup, self.eps = augmented, warmup, eps
        self.fault, self.calls = fault, 0  # training steps so far (no accumulation in the suite)
        self.schedule, self.unfreeze = schedule, unfreeze
        if unfreeze is not None:  # frozen until its step (a backbone trained later: healthy)
            for name, p in net.named_parameters():
                p.requires_grad_(not name.startswith(unfreeze[0]))
        self._schedule: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return self.loss_of(*self.prepare(batch))

    def prepare(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's batch with its fault, once per step: what changes the run's state (the step count, a fault,
        a part unfrozen) happens here, outside the forward that a replay runs again."""
        x, y = batch
        if self.fault is not None and self.calls == self.fault.step:
            x, y = self._inject(x, y)
        if self.unfreeze is not None and self.calls == self.unfreeze[1]:
            for name, p in self.net.named_parameters():
                p.requires_grad_(True if name.startswith(self.unfreeze[0]) else p.requires_grad)
        self.calls += 1
        return x, y

    def loss_of(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss of a prepared batch: augmented (images), through the network, cross-entropy."""
        logits = self(augment(x) if self.augmented and x.dim() == 4 else x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)

    def _inject(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fault = self.fault
        assert fault is not None
        if fault.kind == "layer lr":  # the group's base rate: the schedule keeps the factor
            self._schedule.base_lrs[1] *= fault.factor
            self._schedule.optimizer.param_groups[1]["lr"] *= fault.factor
        elif fault.kind == "global lr":
            for i, group in enumerate(self._schedule.optimizer.param_groups):
                self._schedule.base_lrs[i] *= fault.factor
                group["lr"] *= fault.factor
        elif fault.kind == "scale weight":
            with torch.no_grad():
                self.net.get_parameter(fault.layer).mul_(fault.factor)
        elif fault.kind == "corrupt batch":
            classes = self.net(x[:1] if not self.augmented or x.dim() != 4 else augment(x[:1])).shape[-1]
            y = torch.where(y != -100, torch.randint_like(y, 0, classes), y)
        elif fault.kind == "shuffle labels":
            y = y.roll(1, 0)
        elif fault.kind == "repeat token":
            token = int(x.flatten()[1])  # the first token after the row's start
            x, y = torch.full_like(x, token), torch.full_like(y, token)
        elif fault.kind == "scale inputs":
            x = x * fault.factor
        elif fault.kind == "corrupt element":
            with torch.no_grad():
                self.net.get_parameter(fault.layer).view(-1)[0] = fault.factor
        elif fault.kind == "flaky":

            def once(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
                handle.remove()
                return out * fault.factor

            handle = self.net.register_forward_hook(once)
        elif fault.kind == "divide by zero":
            self.net.get_submodule(fault.layer).register_forward_hook(lambda m, i, out: out / torch.zeros_like(out))
        return x, y

    def configure_optimizers(self):
        groups = self.param_groups(self.net) if self.param_groups is not None else self.net.parameters()
        if self.fault is not None and self.fault.kind == "layer lr":  # the faulty layer in a group of its own
            layer = self.fault.layer
            named = list(self.net.named_parameters())
            groups = [{"params": [p for n, p in named if not n.startswith(layer)]},
                      {"params": [p for n, p in named if n.startswith(layer)]}]  # fmt: skip
        if self.optimizer_name == "sgd":
            opt = torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay, eps=self.eps)
        warmup, total = max(1, self.steps // 10) if self.warmup else 0, self.steps

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if self.schedule == "step":  # a tenth at half the steps, a hundredth at three quarters
                return 0.1 ** ((step >= total // 2) + (step >= 3 * total // 4))
            period = max(1, total - warmup) if self.schedule == "cosine" else max(1, (total - warmup) // 3)
            return 0.1 + 0.45 * (1 + math.cos(math.pi * ((step - warmup) % period) / period))  # "restarts": 3 cycles

        schedule = self._schedule = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


# --- data ----------------------------------------------------------------------------------------------


def augment(images: torch.Tensor, noise: float = 0.3) -> torch.Tensor:
    """Each image shifted by up to one pixel each way and given Gaussian noise: the digits are too easy
    otherwise (every recipe drives the training loss to about 0, and losses cannot be compared)."""
    n, c, h, w = images.shape
    padded = F.pad(images, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2, n, 1, 1, 1), device=images.device)
    rows = (torch.arange(h, device=images.device).view(1, 1, h, 1) + dy).expand(n, c, h, w + 2)
    cols = (torch.arange(w, device=images.device).view(1, 1, 1, w) + dx).expand(n, c, h, w)
    shifted = padded.gather(2, rows).gather(3, cols)
    return shifted + noise * torch.randn_like(images)


def digits(seed: int, batch_size: int, steps: int) -> DataLoader:
    """scikit-learn's 8x8 digits, standardised, as (N, 1, 8, 8); batches drawn with replacement."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(range(len(x)), replacement=True, num_samples=steps * batch_size, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, sampler=sampler)


def names_sequences(recipe: Recipe, seed: int, block_size: int, batch_size: int) -> DataLoader:
    """One row per name, '.' + name + '.', padded; labels are the next token (padding ignored)."""
    words, _ = makemore_mlp.load_words(recipe.data)
    rows = gpt_names.encode(words, block_size + 1)
    x, y = rows[:, :-1], rows[:, 1:].masked_fill(rows[:, 1:] == gpt_names.PAD, -100)
    g = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(range(len(x)), replacement=True, num_samples=recipe.steps * batch_size, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, sampler=sampler)


# --- models --------------------------------------------------------------------------------------------


def makemore(recipe: Recipe, seed: int) -> tuple[L.LightningModule, DataLoader]:
    """The lecture's MLP (examples/makemore_mlp.py): its presets, its SGD with the step-down halfway."""
    o = recipe.options
    cfg = makemore_mlp.Config(
        preset=o.get("preset", "kaiming"), gain=o.get("gain", 5 / 3), lr=recipe.lr, max_steps=recipe.steps,
        data=recipe.data, seed=2147483647 + seed,
    )  # fmt: skip
    words, _ = makemore_mlp.load_words(cfg.data)
    xtr, ytr = makemore_mlp.splits(words, cfg.block_size)["train"]
    g = torch.Generator().manual_seed(cfg.seed)
    model = makemore_mlp.MakemoreMLP(cfg, g)
    if "scale_layer" in o:  # one layer's init scaled (a dead layer: far too small)
        name, factor = o["scale_layer"]
        with torch.no_grad():
            model.get_submodule(name).weight.mul_(factor)
    sampler = RandomSampler(range(len(xtr)), replacement=True, num_samples=cfg.max_steps * cfg.batch_size, generator=g)
    return model, DataLoader(TensorDataset(xtr, ytr), batch_size=cfg.batch_size, sampler=sampler)


class GroupedGPT(gpt_names.CharGPT):
    """The GPT example, with one block in a parameter group of its own at learning rate 0 (a layer-wise rate
    table with a wrong entry); without its warm-up (a constant rate) when ``warmup`` is False."""

    def __init__(self, cfg: gpt_names.Config, zero_lr: str | None = None, warmup: bool = True) -> None:
        super().__init__(cfg)
        self.zero_lr, self.warmup = zero_lr, warmup

    def configure_optimizers(self):
        if self.warmup:
            return super().configure_optimizers()
        return torch.optim.AdamW(self.param_groups(), lr=self.cfg.lr, weight_decay=0.1)

    def param_groups(self) -> list[dict]:
        if self.zero_lr is None:
            return super().param_groups()
        named = list(self.named_parameters())
        return [
            {"params": [p for n, p in named if not n.startswith(self.zero_lr)]},
            {"params": [p for n, p in named if n.startswith(self.zero_lr)], "lr": 0.0},
        ]


def gpt(recipe: Recipe, seed: int) -> tuple[L.LightningModule, DataLoader]:
    """The GPT example (examples/gpt_names.py): transformers' GPT-2, 12 blocks of 64, AdamW."""
    cfg = gpt_names.Config(lr=recipe.lr, max_steps=recipe.steps, data=recipe.data, seed=1337 + seed)
    torch.manual_seed(cfg.seed)
    words, _ = makemore_mlp.load_words(cfg.data)
    g = torch.Generator().manual_seed(cfg.seed)
    data = gpt_names.encode(words, cfg.block_size)
    sampler = RandomSampler(range(len(data)), replacement=True, num_samples=cfg.max_steps * cfg.batch_size, generator=g)
    o = recipe.options
    return GroupedGPT(cfg, o.get("zero_lr"), o.get("warmup", True)), DataLoader(
        TensorDataset(data), batch_size=cfg.batch_size, sampler=sampler
    )


class DigitsCNN(nn.Module):
    """Conv -> BatchNorm -> F.relu, three times (a max-pool after the second), global average pool, Linear;
    ``batchnorm=False``: no normalisation (nothing holds the activations' scale)."""

    def __init__(self, width: int = 32, batchnorm: bool = True) -> None:
        super().__init__()
        norm = nn.BatchNorm2d if batchnorm else lambda n: nn.Identity()
        self.conv1, self.bn1 = nn.Conv2d(1, width, 3, padding=1, bias=False), norm(width)
        self.conv2, self.bn2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), norm(2 * width)
        self.conv3, self.bn3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), norm(2 * width)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


def _course(options: dict[str, Any]) -> dict[str, Any]:
    """A recipe's course, as :class:`Classifier` takes it: its fault, its schedule (with or without its warm-up), a
    part unfrozen mid-run."""
    return {"fault": options.get("fault"), "schedule": options.get("schedule", "cosine"),
            "unfreeze": options.get("unfreeze"), "warmup": options.get("warmup", True)}  # fmt: skip


def cnn(recipe: Recipe, seed: int) -> tuple[L.LightningModule, DataLoader]:
    """A small CNN on the digits: SGD with momentum 0.9 and weight decay 5e-4, warm-up and cosine."""
    torch.manual_seed(seed)
    net = DigitsCNN(batchnorm=recipe.options.get("batchnorm", True))
    groups = None
    if recipe.options.get("left_out") is not None:  # the optimizer built from a list that misses one layer
        left_out = recipe.options["left_out"]
        groups = lambda net: [p for n, p in net.named_parameters() if not n.startswith(left_out)]  # noqa: E731
    module = Classifier(net, "sgd", recipe.lr, recipe.steps, weight_decay=5e-4, param_groups=groups,
                        **_course(recipe.options))  # fmt: skip
    return module, digits(seed, 64, recipe.steps)


def vit(recipe: Recipe, seed: int) -> tuple[L.LightningModule, DataLoader]:
    """timm's VisionTransformer on the digits (patches of 2x2, 4 blocks of 64), AdamW with weight decay 0.05."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    net = VisionTransformer(
        img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0
    )
    return Classifier(net, "adamw", recipe.lr, recipe.steps, weight_decay=0.05), digits(seed, 64, recipe.steps)


class GRUCell(nn.Module):
    """makemore's GRU cell, written out: sigmoid gates and a tanh candidate (functional calls)."""

    def __init__(self, n_in: int, n_hidden: int) -> None:
        super().__init__()
        self.xh_to_z = nn.Linear(n_in + n_hidden, n_hidden)
        self.xh_to_r = nn.Linear(n_in + n_hidden, n_hidden)
        self.xh_to_hbar = nn.Linear(n_in + n_hidden, n_hidden)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        xh = torch.cat([x, h], dim=1)
        r = torch.sigmoid(self.xh_to_r(xh))
        hbar = torch.tanh(self.xh_to_hbar(torch.cat([x, r * h], dim=1)))
        z = torch.sigmoid(self.xh_to_z(xh))
        return (1 - z) * h + z * hbar


class CharGRU(nn.Module):
    """makemore's RNN language model with the GRU cell: embedding, the cell over the sequence, a Linear head."""

    def __init__(self, vocab: int, n_embd: int = 64, n_hidden: int = 64, init_std: float | None = None) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.start = nn.Parameter(torch.zeros(1, n_hidden))
        self.cell = GRUCell(n_embd, n_hidden)
        self.lm_head = nn.Linear(n_hidden, vocab)
        if init_std is not None:  # the cell's weights drawn without 1/sqrt(fan_in)
            with torch.no_grad():
                for m in self.cell.modules():
                    if isinstance(m, nn.Linear):
                        m.weight.normal_(0.0, init_std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        emb = self.wte(idx)
        h = self.start.expand(idx.shape[0], -1)
        hs = []
        for t in range(idx.shape[1]):
            h = self.cell(emb[:, t], h)
            hs.append(h)
        return self.lm_head(torch.stack(hs, 1))


def gru(recipe: Recipe, seed: int) -> tuple[L.LightningModule, DataLoader]:
    """makemore's GRU language model on the names (blocks of 16), AdamW with weight decay 0.01."""
    torch.manual_seed(seed)
    net = CharGRU(gpt_names.PAD + 1, init_std=recipe.options.get("init_std"))
    return Classifier(net, "adamw", recipe.lr, recipe.steps, weight_decay=0.01), names_sequences(recipe, seed, 16, 32)


class ReluMLP(nn.Module):
    """``depth`` Linear -> F.relu blocks (no normalisation) with He init times ``gain``, then a Linear head.

    ``gain > 1`` makes every signal grow by ``gain`` per block, forward and backward (the head is scaled by
    ``gain ** -depth`` so that the output stays as it was); ``dead_bias`` sets one block's bias so that its
    units start below zero for almost every input.
    """

    def __init__(self, depth: int = 8, width: int = 128, gain: float = 1.0, dead_bias: tuple[int, float] | None = None):
        super().__init__()
        sizes = [64] + [width] * depth
        self.blocks = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.head = nn.Linear(width, 10)
        with torch.no_grad():
            for block in self.blocks:
                nn.init.kaiming_normal_(block.weight, nonlinearity="relu")
                block.weight.mul_(gain)
                block.bias.zero_()
            self.head.weight.mul_(gain**-depth)
            if dead_bias is not None:
                index, bias = dead_bias
                self.blocks[index].bias.fill_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for block in self.blocks:
            x = F.relu(block(x))
        return self.head(x)


def relu_mlp(recipe: Recipe, seed: int) -> tuple[L.LightningModule, DataLoader]:
    """An 8-block ReLU MLP on the digits, He init, no normalisation: SGD with momentum 0.9."""
    torch.manual_seed(seed)
    o = recipe.options
    net = ReluMLP(gain=o.get("gain", 1.0), dead_bias=o.get("dead_bias"))
    module = Classifier(net, "sgd", recipe.lr, recipe.steps, augmented=o.get("augmented", True), **_course(o))
    return module, digits(seed, 64, recipe.steps)


class Block(nn.Module):
    """A pre-norm transformer block with its own causal attention: eager (``softmax`` over the scores) or fused
    (``F.scaled_dot_product_attention``), optionally with q and k normalised (qk-layernorm)."""

    def __init__(self, n_embd: int, n_head: int, block_size: int, fused: bool, qk_norm: bool) -> None:
        super().__init__()
        self.n_head, self.fused = n_head, fused
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.qkv, self.proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        head = n_embd // n_head
        self.q_norm = nn.LayerNorm(head) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head) if qk_norm else nn.Identity()
        self.fc, self.out = nn.Linear(n_embd, 4 * n_embd), nn.Linear(4 * n_embd, n_embd)
        self.register_buffer("causal", torch.ones(block_size, block_size, dtype=torch.bool).tril(), persistent=False)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.n_head, -1).transpose(1, 2) for z in self.qkv(x).split(c, dim=2))
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            scores = scores.masked_fill(~self.causal[:t, :t], float("-inf"))
            y = F.softmax(scores, dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attend(self.ln_1(x))
        return x + self.out(F.gelu(self.fc(self.ln_2(x))))


class TinyLM(nn.Module):
    """A small causal transformer (nanoGPT's shape: 4 blocks of 64, 4 heads) with attention of its own."""

    def __init__(self, vocab: int, block_size: int = 16, n_layer: int = 4, n_embd: int = 64, n_head: int = 4,
                 fused: bool = False, qk_norm: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, n_embd), nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, block_size, fused, qk_norm) for _ in range(n_layer))
        self.ln_f, self.lm_head = nn.LayerNorm(n_embd), nn.Linear(n_embd, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def tiny_lm(recipe: Recipe, seed: int) -> tuple[L.LightningModule, DataLoader]:
    """A small causal transformer on the names (blocks of 16), AdamW with weight decay 0.1 (``weight_decay``) and
    ``eps``, warm-up unless ``warmup`` is False; eager attention unless ``fused``; ``qk_norm`` normalises q and k."""
    torch.manual_seed(seed)
    o = recipe.options
    net = TinyLM(gpt_names.PAD + 1, fused=o.get("fused", False), qk_norm=o.get("qk_norm", False))
    module = Classifier(net, "adamw", recipe.lr, recipe.steps, weight_decay=o.get("weight_decay", 0.1),
                        eps=o.get("eps", 1e-8), **_course(o))  # fmt: skip
    return module, names_sequences(recipe, seed, 16, 32)


BUILDERS = {
    "makemore": makemore,
    "gpt": gpt,
    "cnn": cnn,
    "vit": vit,
    "gru": gru,
    "relu-mlp": relu_mlp,
    "tiny-lm": tiny_lm,
}
