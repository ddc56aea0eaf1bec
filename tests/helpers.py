"""A tiny network that computes the lecture's formulas itself, and readers for what loggers wrote.

The reference numbers come from plain PyTorch on the very tensors of the run, written as the lecture
writes them (``retain_grad``, ``t.std()``, ``(t.abs() > 0.97).float().mean() * 100``), and share no code
with the package.
"""

from __future__ import annotations

import csv
import itertools
import math
import statistics
from collections import defaultdict
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

SAT = 0.97


def dataset(n: int = 256, features: int = 6, classes: int = 4, scale: float = 2.0, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, features, generator=g) * scale, torch.randint(0, classes, (n,), generator=g))


def loader(batch_size: int = 16, **kw) -> DataLoader:
    return DataLoader(dataset(**kw), batch_size=batch_size, shuffle=False)


class TinyNetBody:
    """Linear -> BatchNorm1d -> Tanh -> Linear -> Tanh -> Linear, with the lecture's numbers in ``ref``.

    ``ref[step][tag]`` holds, for every optimizer step, what each netdiag tag should read. A mixin, so that
    the same module can be a LightningModule of either package (``lightning.pytorch``, ``pytorch_lightning``).
    """

    def __init__(
        self,
        optimizer: str = "adam",
        lr: float = 0.01,
        hidden: int = 16,
        init_gain: float = 3.0,
        batchnorm: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(6, hidden, bias=not batchnorm)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(hidden))
        layers += [nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 4)]
        self.net = nn.Sequential(*layers)
        with torch.no_grad():
            self.net[0].weight.mul_(init_gain)  # saturate the first Tanh a little
        self.optimizer_name, self.lr = optimizer, lr
        self.ref: dict[int, dict[str, float]] = defaultdict(dict)
        self.ref_tensors: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
        self._acts: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._outputs: list[torch.Tensor] = []  # the logits and the losses of the step's forwards
        self._losses: list[torch.Tensor] = []
        self.step_losses: list[float] = []  # each step's loss, the mean of its micro-batches'
        self.loss_window: int | None = None  # the steps whose median loss a logging step reads (every_n_steps)
        self._before: dict[str, torch.Tensor] = {}
        self._step = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, m in enumerate(self.net):
            x = m(x)
            if isinstance(m, nn.Tanh) and self.training and torch.is_grad_enabled():
                x.retain_grad()
                self._acts[f"net.{i}"].append(x)
        if self.training and torch.is_grad_enabled():
            self._outputs.append(x.detach())
        return x

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self._losses.append(loss.detach())
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        # Very different inputs: if validation were counted, saturation would read near 100 %.
        self.log("val_loss", nn.functional.cross_entropy(self(x * 100), y))

    def test_step(self, batch, batch_idx):
        return self.validation_step(batch, batch_idx)

    def predict_step(self, batch, batch_idx):
        return self(batch[0] * 100)

    def configure_optimizers(self):
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=0.01)

    def grad_scale(self) -> float:
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        return scaler.get_scale() if scaler is not None else 1.0

    def on_before_optimizer_step(self, optimizer) -> None:
        step, ref = self.trainer.global_step, self.ref[self.trainer.global_step]
        self._step = step
        ref["netdiag/lr"] = optimizer.param_groups[0]["lr"]
        with torch.no_grad():
            if step == 0 and self._outputs:  # the output at init: cross-entropy against random labels, the loss
                logits = torch.cat(self._outputs).float()
                last = f"net.{len(self.net) - 1}"
                ref[f"netdiag/init_output_ce/{last}"] = (logits.logsumexp(-1) - logits.mean(-1)).mean().item()
                ref[f"netdiag/init_output_classes/{last}"] = logits.shape[-1]
                if self._losses:  # subclasses with a training_step of their own compute no loss here
                    ref["netdiag/init_loss"] = torch.stack(self._losses).mean().item()
            if self._losses:
                self.step_losses.append(torch.stack(self._losses).mean().item())
                if self.loss_window is not None:
                    ref["netdiag/loss_median"] = statistics.median(self.step_losses[-self.loss_window :])
            self._outputs.clear()
            self._losses.clear()
            for name, hs in self._acts.items():
                t = torch.cat([h.detach().float() for h in hs])
                ref[f"netdiag/act_mean/{name}"] = t.mean().item()
                ref[f"netdiag/act_std/{name}"] = t.std().item()
                ref[f"netdiag/act_saturated_pct/{name}"] = ((t.abs() > SAT).float().mean() * 100).item()
                ref[f"netdiag/act_dead_pct/{name}"] = ((t.abs() > SAT).all(dim=0).float().mean() * 100).item()
                self.ref_tensors[step][f"netdiag/act/{name}"] = t
                if all(h.grad is not None for h in hs):
                    g = torch.cat([h.grad.float() for h in hs]) / self.grad_scale()
                    ref[f"netdiag/act_grad_mean/{name}"] = g.mean().item()
                    ref[f"netdiag/act_grad_std/{name}"] = g.std().item()
                    self.ref_tensors[step][f"netdiag/act_grad/{name}"] = g
            self._acts.clear()
            for name, p in self.named_parameters():
                if p.ndim == 2 and p.grad is not None:
                    ref[f"netdiag/grad_mean/{name}"] = p.grad.mean().item()
                    ref[f"netdiag/grad_std/{name}"] = p.grad.std().item()
                    ref[f"netdiag/grad_data_ratio/{name}"] = (p.grad.std() / p.std()).item()
                    self.ref_tensors[step][f"netdiag/grad/{name}"] = p.grad.detach().clone()
                    self._before[name] = p.detach().clone()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        params = dict(self.named_parameters())
        for name, before in self._before.items():
            update = params[name].detach() - before
            self.ref[self._step][f"netdiag/update_data_log10/{name}"] = (update.std() / before.std()).log10().item()
        self._before = {}


class TinyNet(TinyNetBody, L.LightningModule):
    pass


def all_callbacks(n: int = 2) -> list:
    """SaturationMonitor, GradDataRatio and UpdateRatio, each measuring every ``n`` steps."""
    from lightning_netdiag import GradDataRatio, SaturationMonitor, UpdateRatio

    return [SaturationMonitor(every_n_steps=n), GradDataRatio(every_n_steps=n), UpdateRatio(every_n_steps=n)]


def trainer(tmp_path: Path, callbacks: list, logger=None, max_steps: int = 6, **kw) -> L.Trainer:
    if logger is None:
        logger = L.pytorch.loggers.TensorBoardLogger(tmp_path, name="tb")
    kw.setdefault("limit_val_batches", 2)
    kw.setdefault("val_check_interval", 3)
    kw.setdefault("enable_checkpointing", False)
    kw.setdefault("accelerator", "cpu")
    return L.Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        logger=logger,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


def read_tensorboard(log_dir: str | Path):
    """(scalars ``tag -> {step: value}``, histograms ``tag -> {step: HistogramValue}``, accumulator)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {t: {e.step: e.value for e in acc.Scalars(t)} for t in tags["scalars"]}
    hists = {t: {e.step: e.histogram_value for e in acc.Histograms(t)} for t in tags["histograms"]}
    return scalars, hists, acc


def read_csv(path: str | Path) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = defaultdict(dict)
    with open(path) as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if k != "step" and v not in ("", None):
                    out[k][int(row["step"])] = float(v)
    return out


def netdiag_only(scalars: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
    return {t: v for t, v in scalars.items() if t.startswith("netdiag/")}


def assert_matches_reference(
    logged: dict[str, dict[int, float]], ref: dict[int, dict[str, float]], rel: float = 1e-5, abs_: float = 1e-7
) -> int:
    """Every logged netdiag number equals the reference of its step; returns how many were compared."""
    compared = 0
    for tag, points in netdiag_only(logged).items():
        for step, value in points.items():
            if tag in ref[step]:
                expected = ref[step][tag]
                assert math.isclose(value, expected, rel_tol=rel, abs_tol=abs_), (
                    f"{tag} at step {step}: {value} != {expected}"
                )
                compared += 1
    return compared


#: The edges the package's bins should have, written out independently: tanh's 64 bins of 1/32, and the
#: gradients' signed powers of two from 2**-30 to 2**10.
TANH_EDGES = [k / 32 for k in range(-32, 33)]
GRAD_EDGES = [-(2.0**k) for k in range(10, -31, -1)] + [2.0**k for k in range(-30, 11)]


def bin_counts(t: torch.Tensor, edges: list[float], by_magnitude: bool = False) -> list[float]:
    """Counts over [-inf, e0), [e0, e1), ..., [e_last, inf), by direct comparison.

    ``by_magnitude`` (signed log-spaced edges): a value goes to the bin of |x| on its side of zero, so a
    negative bin is (lo, hi] and the middle bin (-e, e).
    """
    bounds = [-math.inf, *edges, math.inf]
    t = t[torch.isfinite(t)]
    counts = []
    for lo, hi in itertools.pairwise(bounds):
        if by_magnitude and hi <= 0:
            inside = (t > lo) & (t <= hi)
        elif by_magnitude and lo < 0:
            inside = (t > lo) & (t < hi)
        else:
            inside = (t >= lo) & (t < hi)
        counts.append(float(inside.sum()))
    return counts


def read_wandb_history(save_dir: str | Path) -> list[dict]:
    """The history rows of the offline W&B run under ``save_dir``, read from its ``.wandb`` file.

    The file is W&B's log format: a 7-byte file header, then 32 KiB blocks of records, each with a 7-byte
    header (CRC32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last); each record is a
    ``wandb_internal_pb2.Record`` protobuf. W&B 0.2x+ ships no Python reader of its own.
    """
    import json

    from wandb.proto import wandb_internal_pb2

    (path,) = Path(save_dir).glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record.FromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                row: dict = {}
                for item in record.history.item:  # a logged object (a histogram) comes as one item per field
                    *parents, key = [item.key] if item.key else list(item.nested_key)
                    target = row
                    for parent in parents:
                        target = target.setdefault(parent, {})
                    target[key] = json.loads(item.value_json)
                rows.append(row)
    return rows
