"""What the diagnostics cost: training step time with and without them, and against two anchors.

    python benchmarks/overhead.py              # the full table (about an hour on a 2-core CPU)
    python benchmarks/overhead.py --breakdown  # also where a logging step's time goes (per callback, TensorBoard)
    python benchmarks/overhead.py --quick      # a smoke run: one short round of the small model
    python benchmarks/overhead.py --gpu        # on a CUDA machine: GPT-2 124M in bf16-mixed, ResNet-50 at 224 px

Configurations, each run in a process of its own, interleaved (bare, ours, lecture, wandb, bare, ...):

- ``bare``: training with a TensorBoard logger attached and no diagnostics;
- ``ours``: SaturationMonitor + GradDataRatio + UpdateRatio + LogitMonitor + OptimizerState, default arguments,
  histograms on, TensorBoard;
- ``lecture``: the lecture's notebook code written as a plain callback: ``retain_grad`` on every
  activation module's output, ``.item()`` per statistic, ``torch.histogram``, TensorBoard's ``add_histogram``,
  and the ``lr * grad`` update estimate (it computes less than ours: no dead units, no non-finite counts);
- ``wandb``: ``wandb.watch(model, log="all")`` in offline mode (parameters and gradients, no activations);
  left out with a note when wandb is not installed.

Every configuration with our callbacks runs as a plain install does, without google-crc32c: TensorBoard's records are
checksummed a block at a time (:mod:`lightning_netdiag.checksum`), as netdiag sets up at its first write.
With ``--breakdown``, also: ``no-sink`` (ours, computing everything but writing nothing: the difference to
``ours`` is the TensorBoard write, its writer thread included), ``fast-crc`` (ours with google-crc32c's C checksums,
the ``fast`` extra), ``tb-crc`` (ours with TensorBoard's own pure-Python checksums, as before netdiag replaced them:
``fast_tensorboard_checksums(False)``), each callback alone (``sat``, ``d3``, ``d4``, ``logits``,
``adam``), and ``no-op`` (five callbacks that override nothing: what Lightning's hook calls cost any five).

``--flight`` times the flight recorder (``FlightRecorder``, every step) on makemore-deep and GPT-2 6x384, logging
every 50 steps: in each run it is on for 10 steps and off for the next 10, and the run's ratio is that of the
medians of its steps with and without it (not logging steps); the table gives the median ratio over the rounds.

``--flight-variants`` times the recorder's variants (``FLIGHT_VARIANTS``: its core work as before issue 34, the
default, the guard) in separate processes, interleaved: the time inside its hooks per step, and what it holds.

``--attention`` times, for GPT-2 6x384's shapes, one attention (``F.scaled_dot_product_attention``, causal,
forward and backward) against what LogitMonitor adds to it on a measured step (its scores recomputed for the largest
logit and the softmax's entropy, :func:`lightning_netdiag.attention.score_stats` over
:func:`~lightning_netdiag.attention.sdpa_scores`), interleaved, medians.
``--records`` times records (:func:`lightning_netdiag.stats.tensor_records`, log2 bins, and without a histogram)
against one read of the same tensors (``x.sum()``), interleaved, medians (issue 35: at most 3 reads): a 4096 x 4096
float32 and bf16 tensor and 200 tensors of 4,096 values, on the CPU with one thread; on CUDA when there is one, also
a GELU output of GPT-2 124M (8 x 1024 x 3072, bf16) and its token embedding's gradient (50257 x 768, float32).

``--band`` times Lightning's dispatch of our step hooks on makemore-deep (every 50 steps): in one run, blocks of
10 steps alternate the first of a run of our callbacks calling the run's step hooks (and the batch hooks none of
ours uses set to None) with Lightning dispatching each callback's; the medians of the steps between logging steps
of each, for the five monitors and for ``netdiag_callbacks()`` (the flight recorder and the report with them).

For ``ours``, the time spent inside our hooks (callback hooks and module forward hooks) on the steps that
are not logging steps is also measured within the run, as a share of bare's step: a ratio of two runs
cannot resolve 1 % on this machine.

Each run discards its warm-up steps and times a window of steps that holds whole logging periods. Per run:
the window's mean step time, the mean of its logging steps, the median of its other steps, and the peak
memory (CPU: the process's peak RSS; CUDA: the peak of allocated device memory). A configuration's number
is the median over rounds (min-max shown). The GPT-2 and ResNet-18 models need transformers and
torchvision (``pip install -e ".[models]" torchvision``); without them they are skipped, and the table says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CONFIGS = ("bare", "ours", "lecture", "wandb")
BLOCK = 10  # --flight: the recorder on for this many steps, then off for as many
BREAKDOWN = ("no-sink", "fast-crc", "tb-crc", "sat", "d3", "d4", "logits", "adam", "no-op")


def recording(step: int) -> bool:
    """--flight: whether the recorder is on at ``step``."""
    return step // BLOCK % 2 == 0


# --- models --------------------------------------------------------------------------------------------


@dataclass
class Workload:
    """A model, its batch, and how many steps to warm up and to time at each cadence."""

    name: str
    about: str
    warmup: int
    timed: dict[int, int]  # cadence -> timed steps (a multiple of the cadence)
    needs: str | None = None  # the package the model comes from, if not torch
    gpu: bool = False  # a --gpu workload (bf16-mixed on CUDA)


WORKLOADS = {
    w.name: w
    for w in (
        Workload(
            "makemore-deep",
            "lecture's deep MLP: block 3, n_embd 10, 5 x [Linear(100, bias=False), BatchNorm1d, Tanh], SGD, batch 32",
            warmup=50,
            timed={1: 200, 50: 400},
        ),
        Workload(
            "wide",
            "MLP: block 8, n_embd 64, 4 x [Linear(1024, bias=False), BatchNorm1d, Tanh], SGD, batch 512",
            warmup=5,
            timed={1: 20, 50: 150},
        ),
        Workload(
            "char-transformer",
            "GPT: 4 layers, 4 heads, n_embd 128, block 64, LayerNorm, GELU MLP, AdamW, batch 32",
            warmup=5,
            timed={1: 30, 50: 150},
        ),
        Workload(
            "gpt2",
            "HF transformers GPT2LMHeadModel: 6 layers x 384, 6 heads, block 128, 65-token vocabulary, AdamW, batch 8",
            warmup=3,
            timed={1: 12, 50: 100},
            needs="transformers",
        ),
        Workload(
            "resnet18",
            "torchvision ResNet-18, 1000 classes, 64 x 64 inputs, SGD with momentum, batch 16",
            warmup=5,
            timed={1: 30, 50: 150},
            needs="torchvision",
        ),
        Workload(
            "gpt2-124m",
            "HF transformers GPT-2 124M (12 x 768, block 1024, vocabulary 50257), AdamW, batch 8, bf16-mixed, CUDA",
            warmup=10,
            timed={1: 50, 50: 200},
            needs="transformers",
            gpu=True,
        ),
        Workload(
            "resnet50",
            "torchvision ResNet-50, 224 x 224 inputs, SGD with momentum, batch 64, bf16-mixed, CUDA",
            warmup=10,
            timed={1: 50, 50: 200},
            needs="torchvision",
            gpu=True,
        ),
    )
}


def build(name: str):
    """The LightningModule and an endless batch source for workload ``name``."""
    import lightning as L
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(0)

    class Module(L.LightningModule):
        def __init__(self, net: nn.Module, batch: tuple, opt: str, lr: float) -> None:
            super().__init__()
            self.net, self.opt, self.lr = net, opt, lr
            # buffers, so that the batch moves to the device once with the model
            self.register_buffer("x", batch[0], persistent=False)
            self.register_buffer("y", batch[1], persistent=False)

        def training_step(self, batch, batch_idx):
            logits = self.net(self.x)
            logits = getattr(logits, "logits", logits)  # transformers' models return an output object
            return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.y.reshape(-1))

        def configure_optimizers(self):
            if self.opt == "adamw":
                return torch.optim.AdamW(self.parameters(), lr=self.lr)
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9 if self.opt == "momentum" else 0.0)

    def mlp(block: int, n_embd: int, hidden: int, depth: int, batch: int) -> Module:
        layers: list[nn.Module] = [nn.Embedding(27, n_embd), nn.Flatten()]
        fan_in = block * n_embd
        for _ in range(depth):
            layers += [nn.Linear(fan_in, hidden, bias=False), nn.BatchNorm1d(hidden), nn.Tanh()]
            fan_in = hidden
        layers += [nn.Linear(fan_in, 27, bias=False), nn.BatchNorm1d(27)]
        x = torch.randint(0, 27, (batch, block), generator=g)
        return Module(nn.Sequential(*layers), (x, torch.randint(0, 27, (batch,), generator=g)), "sgd", 0.1)

    if name == "makemore-deep":
        return mlp(block=3, n_embd=10, hidden=100, depth=5, batch=32)
    if name == "wide":
        return mlp(block=8, n_embd=64, hidden=1024, depth=4, batch=512)
    if name in ("gpt2", "gpt2-124m"):
        from transformers import GPT2Config, GPT2LMHeadModel

        small = name == "gpt2"
        vocab, block = (65, 128) if small else (50257, 1024)
        config = GPT2Config(
            n_layer=6 if small else 12,
            n_embd=384 if small else 768,
            n_head=6 if small else 12,
            n_positions=block,
            vocab_size=vocab,
            bos_token_id=0,
            eos_token_id=0,
        )
        tokens = torch.randint(0, vocab, (8, block + 1), generator=g)
        return Module(GPT2LMHeadModel(config), (tokens[:, :-1], tokens[:, 1:]), "adamw", 3e-4)
    if name in ("resnet18", "resnet50"):
        import torchvision

        small = name == "resnet18"
        net = torchvision.models.resnet18() if small else torchvision.models.resnet50()
        batch, px = (16, 64) if small else (64, 224)
        x = torch.randn(batch, 3, px, px, generator=g)
        return Module(net, (x, torch.randint(0, 1000, (batch,), generator=g)), "momentum", 0.1)

    n_embd, block, heads, depth = 128, 64, 4, 4

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
            self.attn = nn.MultiheadAttention(n_embd, heads, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))
            self.register_buffer("mask", torch.triu(torch.ones(block, block, dtype=torch.bool), 1))

        def forward(self, x):
            h = self.ln1(x)
            x = x + self.attn(h, h, h, attn_mask=self.mask, need_weights=False)[0]
            return x + self.mlp(self.ln2(x))

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok, self.pos = nn.Embedding(65, n_embd), nn.Parameter(torch.zeros(block, n_embd))
            self.blocks = nn.Sequential(*[Block() for _ in range(depth)])
            self.ln, self.head = nn.LayerNorm(n_embd), nn.Linear(n_embd, 65)

        def forward(self, idx):
            return self.head(self.ln(self.blocks(self.tok(idx) + self.pos)))

    tokens = torch.randint(0, 65, (32, block + 1), generator=g)
    return Module(GPT(), (tokens[:, :-1], tokens[:, 1:]), "adamw", 3e-4)


# --- the lecture's code, as a plain callback ---------------------------------------------------------


def lecture_callback(every: int):
    """The notebook's four cells run at every ``every``-th step, as a user would paste them into a callback."""
    import lightning as L
    import torch

    class LectureCode(L.Callback):
        def __init__(self) -> None:
            self.outs: dict[str, torch.Tensor] = {}
            self.on = False

        def on_fit_start(self, trainer, pl_module):
            from lightning_netdiag.activations import module_kind

            for name, m in pl_module.named_modules():
                if module_kind(m) is not None:  # the activation modules, as one would list them by hand
                    m.register_forward_hook(self._keep(name))

        def _keep(self, name):
            def hook(module, inputs, out):
                if self.on:
                    out.retain_grad()
                    self.outs[name] = out

            return hook

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.on = trainer.global_step % every == 0

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if not self.on:
                return
            tb, step, metrics = trainer.logger.experiment, trainer.global_step, {}
            with torch.no_grad():
                # torch.histogram and TensorBoard's numpy want float32 on the CPU: on a GPU in bf16, a copy there
                for name, t in self.outs.items():  # activation distribution
                    metrics[f"act/{name}/mean"], metrics[f"act/{name}/std"] = t.mean().item(), t.std().item()
                    metrics[f"act/{name}/saturated"] = ((t.abs() > 0.97).float().mean() * 100).item()
                    h = t.detach().float().cpu()
                    torch.histogram(h, density=True)
                    tb.add_histogram(f"act/{name}", h, step)
                for name, t in self.outs.items():  # gradient distribution
                    g = t.grad
                    metrics[f"act_grad/{name}/mean"], metrics[f"act_grad/{name}/std"] = g.mean().item(), g.std().item()
                    h = g.float().cpu()
                    torch.histogram(h, density=True)
                    tb.add_histogram(f"act_grad/{name}", h, step)
                lr = optimizer.param_groups[0]["lr"]
                for name, p in pl_module.named_parameters():
                    if p.ndim == 2:  # weights gradient distribution
                        g = p.grad
                        metrics[f"grad/{name}/mean"], metrics[f"grad/{name}/std"] = g.mean().item(), g.std().item()
                        metrics[f"grad/{name}/ratio"] = (g.std() / p.std()).item()
                        h = g.float().cpu()
                        torch.histogram(h, density=True)
                        tb.add_histogram(f"grad/{name}", h, step)
                    metrics[f"ud/{name}"] = ((lr * p.grad).std() / p.data.std()).log10().item()
            trainer.logger.log_metrics(metrics, step)
            self.outs = {}

    return LectureCode()


# --- one run ------------------------------------------------------------------------------------------


def worker(workload: str, config: str, every: int, warmup: int, timed: int, out: str, gpu: bool) -> None:
    import lightning as L
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_netdiag import (
        FlightRecorder,
        GradDataRatio,
        LogitMonitor,
        OptimizerState,
        SaturationMonitor,
        UpdateRatio,
        fast_tensorboard_checksums,
    )
    from lightning_netdiag.capture import ActivationHooks
    from lightning_netdiag.select import WEIGHT_NDIMS
    from lightning_netdiag.sinks import LoggerSink

    torch.manual_seed(0)
    model = build(workload)

    class Clock(L.Callback):
        """When each batch ended, and whether it led to a logging step."""

        def __init__(self) -> None:
            self.ends: list[float] = []
            self.logging: list[bool] = []

        def on_train_batch_start(self, trainer, *args) -> None:
            self.logging.append(trainer.global_step % every == 0)

        def on_train_batch_end(self, trainer, *args) -> None:
            if gpu:
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())
            self.inside.append(inside[0])

        inside: list[float] = []

    inside = [0.0]  # seconds spent in our hooks so far

    def clocked(fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                inside[0] += time.perf_counter() - start

        return run

    clock = Clock()
    ours = {
        "sat": SaturationMonitor,
        "d3": GradDataRatio,
        "d4": UpdateRatio,
        "logits": LogitMonitor,
        "adam": OptimizerState,
    }
    callbacks: list[L.Callback] = []
    if config != "fast-crc":  # as a plain install: the block checksums (netdiag's) or, with tb-crc, TensorBoard's
        sys.modules["google_crc32c"] = None  # type: ignore[assignment]
    if config in ("ours", "no-sink", "fast-crc", "tb-crc"):
        callbacks = [cls() for cls in ours.values()]
        if config == "ours":  # the hooks Lightning calls, and the module hooks, timed
            for cb in callbacks:  # (a hook set to None is not called; the first callback calls the others' step hooks)
                for hook in [h for h in vars(L.Callback) if h.startswith("on_") and getattr(cb, h) is not None]:
                    setattr(cb, hook, clocked(getattr(cb, hook)))
            ActivationHooks._hook = clocked(ActivationHooks._hook)
            ActivationHooks._pre_hook = clocked(ActivationHooks._pre_hook)
        if config == "no-sink":
            LoggerSink.emit = lambda *args, **kwargs: None  # everything computed, nothing written
        if config == "tb-crc":
            fast_tensorboard_checksums(False)
    elif config in ours:
        callbacks = [ours[config]()]
    elif config.startswith("flight"):  # on for BLOCK steps, off for the next BLOCK: both timed in this process
        from lightning_netdiag import origin

        options, no_fingerprint = FLIGHT_VARIANTS[config.partition(":")[2] or "default"]

        class Alternating(FlightRecorder):
            def on_train_batch_start(self, trainer, *args) -> None:
                if recording(trainer.global_step):
                    super().on_train_batch_start(trainer, *args)

            def on_before_optimizer_step(self, trainer, *args) -> None:
                if recording(trainer.global_step):
                    super().on_before_optimizer_step(trainer, *args)

            def on_before_backward(self, trainer, *args) -> None:
                if recording(trainer.global_step):
                    super().on_before_backward(trainer, *args)

            def on_train_batch_end(self, trainer, *args) -> None:
                if recording(trainer.global_step - 1):  # the step has been counted by now
                    super().on_train_batch_end(trainer, *args)
                    # what it holds for the update norms, and the weights it watches (before detach lets them go)
                    self.held = [sum(t.numel() * t.element_size() for t in ts) for ts in
                                 (self._snapshot, [p for _, p in self._params])]  # fmt: skip

        callbacks = [Alternating(**options)]
        if no_fingerprint:
            Alternating.batch_seen = lambda self, inputs, index: None
        # its hooks and the forward's (the replay's calls and output sums), timed
        for hook in [h for h in vars(L.Callback) if h.startswith("on_") and getattr(callbacks[0], h) is not None]:
            setattr(callbacks[0], hook, clocked(getattr(callbacks[0], hook)))
        origin.ForwardCalls._keep = clocked(origin.ForwardCalls._keep)
        origin.ForwardCalls._output = clocked(origin.ForwardCalls._output)
    elif config == "no-op":
        callbacks = [L.Callback() for _ in ours]
    elif config == "lecture":
        callbacks = [lecture_callback(every)]
    elif config == "wandb":
        import wandb

        wandb.init(mode="offline", dir=out, project="netdiag-bench")
        wandb.watch(model, log="all", log_freq=every)

        class Commit(L.Callback):  # what WandbLogger.log_metrics does each logged step: commit the row
            def on_train_batch_end(self, trainer, *args) -> None:
                if trainer.global_step % every == 0:
                    wandb.log({"trainer/global_step": trainer.global_step})

        callbacks = [Commit()]
    trainer = L.Trainer(
        max_steps=warmup + timed,
        accelerator="cuda" if gpu else "cpu",
        devices=1,
        precision="bf16-mixed" if gpu else "32-true",
        logger=TensorBoardLogger(out, name="tb"),
        log_every_n_steps=every,
        callbacks=[*callbacks, clock],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = torch.utils.data.DataLoader(range(10**9), batch_size=None)  # batches come from the module
    trainer.fit(model, loader)
    ends, logging = clock.ends, clock.logging
    window = range(warmup, warmup + timed)
    steps = {i: ends[i] - ends[i - 1] for i in window}
    logging_ms = [1000 * steps[i] for i in window if logging[i]]
    other_ms = [1000 * steps[i] for i in window if not logging[i]]
    spent = clock.inside
    ours_other_ms = [1000 * (spent[i] - spent[i - 1]) for i in window if not logging[i]]
    if gpu:
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    weights = [p for p in model.parameters() if p.requires_grad and p.dim() in WEIGHT_NDIMS]
    result = {
        "step_ms": 1000 * (ends[window[-1]] - ends[warmup - 1]) / timed,
        "logging_ms": statistics.mean(logging_ms) if logging_ms else None,
        "other_ms": statistics.median(other_ms) if other_ms else None,
        "ours_other_ms": statistics.mean(ours_other_ms) if ours_other_ms and config == "ours" else None,
        "peak_mb": peak_mb,
        "snapshot_mb": sum(p.numel() * p.element_size() for p in weights) / 2**20,  # UpdateRatio's copy
    }
    if config.startswith("flight"):  # the steps that are not logging steps, with the recorder and without
        on = [1000 * steps[i] for i in window if not logging[i] and recording(i)]
        off = [1000 * steps[i] for i in window if not logging[i] and not recording(i)]
        result["on_ms"], result["off_ms"] = statistics.median(on), statistics.median(off)
        result["inside_ms"] = statistics.median(
            1000 * (spent[i] - spent[i - 1]) for i in window if not logging[i] and recording(i)
        )
        result["held_mb"], result["watched_mb"] = (b / 2**20 for b in callbacks[0].held)
    print(json.dumps(result))
    if config == "wandb":
        wandb.finish()


def run_one(workload: Workload, config: str, every: int, timed: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
        args = [sys.executable, __file__, "--worker", workload.name, config, str(every), str(workload.warmup)]
        args += [str(timed), out, str(int(workload.gpu))]
        done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{workload.name}/{config}/every {every} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the table ----------------------------------------------------------------------------------------

TARGETS = {  # (workload, cadence) -> the most our step may cost, as a ratio to bare
    ("makemore-deep", 50): 1.02,
    ("makemore-deep", 1): 3.0,
    ("wide", 50): 1.01,
    ("wide", 1): 1.15,
    ("gpt2", 50): 1.01,
    ("gpt2", 1): 1.10,
    ("resnet18", 50): 1.01,
    ("resnet18", 1): 1.15,
}
#: workload -> the most a step that is not a logging step may cost, as a ratio to bare's (at every 50 steps)
OTHER_STEP_TARGETS = {"makemore-deep": 1.01}


def missing(workload: Workload) -> str | None:
    """Why ``workload`` cannot run here, or None."""
    import importlib.util

    if workload.needs and importlib.util.find_spec(workload.needs) is None:
        return f"{workload.needs} is not installed (pip install -e '.[models]' torchvision)"
    if workload.gpu:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU here"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one short round of makemore-deep (a smoke test)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per configuration")
    parser.add_argument("--models", nargs="+", choices=list(WORKLOADS), help="default: every CPU model (--gpu: GPU)")
    parser.add_argument("--breakdown", action="store_true", help="also run no-sink and each callback alone")
    parser.add_argument("--every", type=int, nargs="+", choices=(1, 50), help="the cadences (default: both)")
    parser.add_argument("--gpu", action="store_true", help="the GPU models, in bf16-mixed on CUDA")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    parser.add_argument("--from-json", type=Path, nargs="+", help="print the tables of saved runs, run nothing")
    parser.add_argument(
        "--attention", action="store_true", help="only time one attention against its scores recomputed"
    )
    parser.add_argument("--flight", action="store_true", help="only time the flight recorder against bare")
    parser.add_argument(
        "--flight-variants", action="store_true", help="the recorder's variants (core, default, guard) side by side"
    )
    parser.add_argument("--records", action="store_true", help="only time records against x.sum() of the same tensors")
    parser.add_argument("--band", action="store_true", help="only time our step hooks called by one callback or each")
    args = parser.parse_args()
    if args.band:
        print(band_cost(args.rounds))
        return
    if args.records:
        print(records_cost())
        return
    if args.attention:
        print(attention_cost())
        return
    if args.flight:
        print(flight_cost(args.rounds, args.models or list(FLIGHT_TARGETS)))
        return
    if args.flight_variants:
        print(flight_variants(args.rounds, args.models or list(FLIGHT_TARGETS)))
        return
    if args.from_json:
        print_saved(args.from_json)
        return
    try:
        import wandb  # noqa: F401

        configs = CONFIGS
    except ImportError:
        print("wandb is not installed: the wandb.watch anchor is left out (pip install wandb to add it)")
        configs = tuple(c for c in CONFIGS if c != "wandb")
    if args.breakdown:
        configs += BREAKDOWN
    names = args.models or [n for n, w in WORKLOADS.items() if w.gpu == args.gpu]
    workloads, skipped = [], []
    for name in names:
        why = missing(WORKLOADS[name])
        if why is None:
            workloads.append(WORKLOADS[name])
        else:
            skipped.append(f"{name}: skipped, {why}")
            print(skipped[-1], flush=True)
    rounds = args.rounds
    if args.quick:
        workloads = [Workload("makemore-deep", WORKLOADS["makemore-deep"].about, warmup=10, timed={1: 20, 50: 50})]
        rounds = 1

    results: dict[tuple[str, int, str], list[dict]] = {}
    for w in workloads:
        if args.every:
            w.timed = {every: timed for every, timed in w.timed.items() if every in args.every}
        for every, timed in w.timed.items():
            for r in range(rounds):
                for config in configs:  # interleaved: A B C D A B C D ...
                    res = run_one(w, config, every, timed)
                    results.setdefault((w.name, every, config), []).append(res)
                    print(
                        f"  {w.name:16s} every {every:2d}  round {r + 1}  {config:8s} {res['step_ms']:9.2f} ms",
                        flush=True,
                    )

    print(table(workloads, configs, results))
    if args.breakdown:
        print(breakdown(workloads, results))
    for line in skipped:
        print(line)
    if args.json:
        raw = {f"{k[0]}|{k[1]}|{k[2]}": v for k, v in results.items()}
        args.json.write_text(json.dumps(raw, indent=1))


def print_saved(paths: list[Path]) -> None:
    """The tables of runs saved with ``--json``."""
    for path in paths:
        results = {}
        for key, runs in json.loads(path.read_text()).items():
            name, every, config = key.split("|")
            results[(name, int(every), config)] = runs
        configs = tuple(c for c in (*CONFIGS, *BREAKDOWN) if any(k[2] == c for k in results))
        workloads = []
        for name, w in WORKLOADS.items():
            cadences = sorted({k[1] for k in results if k[0] == name})
            if cadences:
                workloads.append(Workload(name, w.about, w.warmup, {c: w.timed[c] for c in cadences}))
        print(f"{path.name}:")
        print(table(workloads, configs, results))
        if set(BREAKDOWN) <= set(configs):
            print(breakdown(workloads, results))


def _median(runs: list[dict], key: str) -> float:
    values = [r[key] for r in runs if r[key] is not None]
    return statistics.median(values) if values else math.nan


def table(workloads: list[Workload], configs: tuple[str, ...], results: dict) -> str:
    lines = [
        "| model | logging | config | step ms (median, min-max) | ratio to bare | added vs anchors "
        "| logging step ms | other steps ms (vs bare) | peak MB (vs bare) | target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in workloads:
        for every in w.timed:
            runs = {c: results[(w.name, every, c)] for c in configs}
            med = {c: _median(runs[c], "step_ms") for c in configs}
            other = {c: _median(runs[c], "other_ms") for c in configs}
            for c in configs:
                ms = [r["step_ms"] for r in runs[c]]
                ratio = med[c] / med["bare"]
                added = ""
                if c == "ours":
                    added = ", ".join(
                        f"{(ratio - 1) / (med[a] / med['bare'] - 1):.2f} of {a}"
                        for a in configs
                        if a in ("lecture", "wandb") and med[a] > med["bare"]
                    )
                verdicts = []
                judged = ratio
                if c == "ours" and every > 1:
                    # a period from its parts (logging step, other steps, our time inside them): steadier than
                    # the window's mean against the drift between runs, so the target is judged on it
                    inside = _median(runs[c], "ours_other_ms")
                    log_ours, log_bare = _median(runs[c], "logging_ms"), _median(runs["bare"], "logging_ms")
                    period = (every - 1) * (other["bare"] + inside) + log_ours
                    judged = period / ((every - 1) * other["bare"] + log_bare)
                    verdicts.append(f"from its parts: {judged:.3f}x")
                if c == "ours" and (w.name, every) in TARGETS:
                    target = TARGETS[(w.name, every)]
                    verdicts.append(f"<= {target} {'met' if judged <= target else 'MISSED'}")
                if c == "ours" and every > 1:
                    share = 1 + inside / other["bare"]  # within the run: our hooks on the other steps
                    target = OTHER_STEP_TARGETS.get(w.name)
                    met = "" if target is None else f" <= {target} {'met' if share <= target else 'MISSED'}"
                    verdicts.append(f"other steps, inside our hooks: {share:.4f}x{met}")
                peak = _median(runs[c], "peak_mb")
                peak_bare = _median(runs["bare"], "peak_mb")
                other_cell = "" if math.isnan(other[c]) else f"{other[c]:.2f} ({other[c] / other['bare']:.3f}x)"
                lines.append(
                    f"| {w.name} | every {'step' if every == 1 else f'{every} steps'} | {c} | "
                    f"{med[c]:.2f} ({min(ms):.2f}-{max(ms):.2f}) | {ratio:.3f}x | {added} | "
                    f"{_median(runs[c], 'logging_ms'):.2f} | {other_cell} | {peak:.0f} ({peak - peak_bare:+.0f}) | "
                    f"{'; '.join(verdicts)} |"
                )
        snapshot = results[(w.name, next(iter(w.timed)), "bare")][0]["snapshot_mb"]
        lines.append(f"| {w.name} | | UpdateRatio's copy of the weights: {snapshot:.1f} MB | | | | | | | |")
    return "\n".join(lines)


def breakdown(workloads: list[Workload], results: dict) -> str:
    """Where a logging step's added time goes: per callback alone, and computing versus writing."""
    lines = [
        "| model | logging | added per logging step: ours | computing (no-sink) | TensorBoard write "
        "(ours - no-sink) | ours with C checksums (fast-crc) | ours with TensorBoard's checksums (tb-crc) "
        "| SaturationMonitor alone | GradDataRatio alone | UpdateRatio alone | LogitMonitor alone "
        "| OptimizerState alone |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in workloads:
        for every in w.timed:
            log = {c: _median(results[(w.name, every, c)], "logging_ms") for c in ("bare", "ours", *BREAKDOWN)}
            add = {c: log[c] - log["bare"] for c in log}
            lines.append(
                f"| {w.name} | every {'step' if every == 1 else f'{every} steps'} | {add['ours']:.2f} ms | "
                f"{add['no-sink']:.2f} ms | {add['ours'] - add['no-sink']:.2f} ms | {add['fast-crc']:.2f} ms | "
                f"{add['tb-crc']:.2f} ms | {add['sat']:.2f} ms | "
                f"{add['d3']:.2f} ms | {add['d4']:.2f} ms | {add['logits']:.2f} ms | {add['adam']:.2f} ms |"
            )
    return "\n".join(lines)


#: The most the flight recorder may cost every step, as a ratio to the same run's steps without it (issue 22).
FLIGHT_TARGETS = {"gpt2": 1.03, "makemore-deep": 1.15}
#: --flight-variants: the recorder's options, and whether the batch's fingerprint is left out. "core": the
#: per-step work of the recorder before issue 34 (a full copy for the update norms, no fingerprint, no batch kept,
#: no replay); "default": as shipped (a 1 % sample, the fingerprint, the replay's output sums and spike decision on
#: the CPU); "guard": the default with guard=3 (its decision read every step).
FLIGHT_VARIANTS = {
    "core": ({"update_norms": "exact", "keep_batch": 0, "replay": False}, True),
    "default": ({}, False),
    "guard": ({"guard": 3}, False),
}


def flight_variants(rounds: int, models: list[str]) -> str:
    """Each of :data:`FLIGHT_VARIANTS` in its own process, interleaved round by round, on and off as ``--flight``:
    the time inside the recorder's hooks (and the forward hooks of its replay) per recorded step, the memory it
    holds for the update norms, and the on/off ratio."""
    lines = ["| model | variant | inside the recorder, ms per step (median of runs) | step ms without | ratio (median; "
             "min-max) | held for the update norms |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name in models:
        w = WORKLOADS[name]
        runs: dict[str, list[dict]] = {v: [] for v in FLIGHT_VARIANTS}
        for r in range(rounds):
            for variant in FLIGHT_VARIANTS:
                res = run_one(w, f"flight:{variant}", 50, w.timed[50])
                runs[variant].append(res)
                print(f"  {name:16s} round {r + 1}  {variant:8s} inside {res['inside_ms']:7.3f} ms  "
                      f"{res['on_ms'] / res['off_ms']:.3f}x", flush=True)  # fmt: skip
        for variant, done in runs.items():
            ratios = [x["on_ms"] / x["off_ms"] for x in done]
            lines.append(
                f"| {name} | {variant} | {_median(done, 'inside_ms'):.3f} | {_median(done, 'off_ms'):.2f} | "
                f"{statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f}) | "
                f"{done[0]['held_mb']:.2f} MB of {done[0]['watched_mb']:.1f} MB |"
            )
    return "\n".join(lines)


def flight_cost(rounds: int, models: list[str]) -> str:
    """The flight recorder's cost every step: in each run (logging every 50 steps) the recorder is on for
    :data:`BLOCK` steps and off for the next, so both halves are timed in one process (between processes this
    machine's step times differ by more than the recorder costs); per run the ratio of the two medians of the steps
    that are not logging steps; the median over ``rounds`` runs."""
    lines = ["| model | without: step ms (median) | with the flight recorder | ratio (median of runs; min-max) | "
             "target |", "|---|---|---|---|---|"]  # fmt: skip
    for name in models:
        w = WORKLOADS[name]
        if missing(w) is not None:
            lines.append(f"| {name} | skipped: {missing(w)} | | | |")
            continue
        runs = []
        for r in range(rounds):
            runs.append(run_one(w, "flight", 50, w.timed[50]))
            on, off = runs[-1]["on_ms"], runs[-1]["off_ms"]
            print(f"  {name:16s} round {r + 1}  off {off:8.3f} ms  on {on:8.3f} ms  {on / off:.3f}x", flush=True)
        ratios = [run["on_ms"] / run["off_ms"] for run in runs]
        ratio = statistics.median(ratios)
        target = FLIGHT_TARGETS.get(name)
        verdict = "" if target is None else f"<= {target} {'met' if ratio <= target else 'MISSED'}"
        lines.append(
            f"| {name} | {_median(runs, 'off_ms'):.3f} | {_median(runs, 'on_ms'):.3f} | {ratio:.3f}x "
            f"({min(ratios):.3f}-{max(ratios):.3f}) | {verdict} |"
        )
    return "\n".join(lines)


def records_cost(rounds: int = 15) -> str:
    """See the module's docstring (``--records``)."""
    import torch

    from lightning_netdiag import stats

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(1)  # issue 35's measurements: one thread
    g = torch.Generator().manual_seed(0)
    big = torch.randn(4096, 4096, generator=g)
    small = [torch.randn(4096, generator=g) for _ in range(200)]
    cases = {
        "4096 x 4096 float32": [big],
        "4096 x 4096 bf16": [big.bfloat16()],
        "200 tensors of 4,096 float32 (together)": small,
    }
    if cuda:
        cases["GELU output, 8 x 1024 x 3072 bf16"] = [torch.randn(8, 1024, 3072, generator=g).bfloat16()]
        cases["wte gradient, 50257 x 768 fp32"] = [torch.randn(50257, 768, generator=g) * 1e-3]
    bins = stats.log2_bins().to(device)

    def clocked(fn) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return 1000 * (time.perf_counter() - start)

    lines = [
        f"one record against one read of the same tensors (`x.sum()`), "
        f"{'on ' + torch.cuda.get_device_name() if cuda else 'on the CPU, one thread'}; "
        f"medians of {rounds} interleaved rounds",
        "",
        "| tensors | x.sum() ms | record ms | reads | without histogram: reads |",
        "|---|---|---|---|---|",
    ]
    for name, xs in cases.items():
        xs = [x.to(device) for x in xs]
        ways = {
            "sum": lambda xs=xs: [x.sum() for x in xs],
            "record": lambda xs=xs: stats.tensor_records(xs, bins),
            "moments": lambda xs=xs: stats.tensor_records(xs, None),
        }
        times: dict[str, list[float]] = {way: [] for way in ways}
        for _ in range(rounds + 1):
            for way, fn in ways.items():
                times[way].append(clocked(fn))
        med = {way: statistics.median(t[1:]) for way, t in times.items()}
        lines.append(
            f"| {name} | {med['sum']:.2f} | {med['record']:.2f} | {med['record'] / med['sum']:.1f} | "
            f"{med['moments'] / med['sum']:.1f} |"
        )
    return "\n".join(lines)


def band_cost(rounds: int, block: int = 10, steps: int = 2001) -> str:
    """See the module's docstring (``--band``)."""
    import lightning as L
    import torch

    import lightning_netdiag
    from lightning_netdiag.callbacks import _common

    torch.set_num_threads(1)

    class Alternate(L.Callback):
        """Switches our callbacks between the band and Lightning's own dispatch every ``block`` steps."""

        def __init__(self) -> None:
            self.ends: list[float] = []
            self.banded: list[bool] = []

        def on_train_batch_start(self, trainer, *args) -> None:
            self.banded.append(trainer.global_step // block % 2 == 0)

        def on_train_batch_end(self, trainer, *args) -> None:
            self.ends.append(time.perf_counter())
            if trainer.global_step % block:
                return
            ours = [cb for cb in trainer.callbacks if type(cb).__module__.startswith("lightning_netdiag")]
            for cb in ours:  # Lightning's dispatch to each: every hook back on the instance's class
                if isinstance(cb, _common.DiagnosticCallback):
                    cb._give_back_band()
                _common.dispatch_again(cb)
            if trainer.global_step // block % 2 == 0:
                for cb in ours:
                    _common.quiet_unused_hooks(cb)
                for cb in ours:
                    if isinstance(cb, _common.DiagnosticCallback):
                        cb._take_band(trainer)

    lines = [
        f"steps between logging steps, makemore-deep, every 50 steps, medians; blocks of {block} steps alternating",
        "",
        "| callbacks | round | one callback a run, ms | each callback, ms | saved, us a step |",
        "|---|---|---|---|---|",
    ]
    for r in range(rounds):
        for name, chosen in (("the five monitors", {"flight": None, "plots": None, "report": None}),
                             ("netdiag_callbacks()", {"plots": None})):  # fmt: skip
            clock = Alternate()
            trainer = L.Trainer(
                max_steps=steps, logger=False, log_every_n_steps=50, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False,
                callbacks=[*lightning_netdiag.netdiag_callbacks(every_n_steps=50, **chosen), clock],
            )  # fmt: skip
            trainer.fit(build("makemore-deep"), torch.utils.data.DataLoader(range(10**9), batch_size=None))
            times: dict[bool, list[float]] = {True: [], False: []}
            for i in range(2 * block + 1, len(clock.ends)):  # step i ended at ends[i]; the first of a block left out
                if i % 50 and i % block:
                    times[clock.banded[i]].append(clock.ends[i] - clock.ends[i - 1])
            band, each = (1000 * statistics.median(times[k]) for k in (True, False))
            lines.append(f"| {name} | {r + 1} | {band:.3f} | {each:.3f} | {1000 * (each - band):.0f} |")
    return "\n".join(lines)


def attention_cost(rounds: int = 30) -> str:
    """One causal attention of GPT-2 6x384 (batch 8, 6 heads, 128 tokens, head 64), forward and backward,
    against LogitMonitor's recomputation of its scores (largest logit and softmax entropy); interleaved, medians."""
    import torch
    from torch.nn import functional as F

    from lightning_netdiag.attention import score_stats, sdpa_scores

    torch.manual_seed(0)
    q, k, v = (torch.randn(8, 6, 128, 64, requires_grad=True) for _ in range(3))

    def attention() -> None:
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    def ours() -> None:
        score_stats(sdpa_scores(q, k, is_causal=True))

    times: dict[str, list[float]] = {"attention": [], "ours": []}
    for _ in range(rounds):
        for name, fn in (("attention", attention), ("ours", ours)):
            start = time.perf_counter()
            fn()
            times[name].append(1000 * (time.perf_counter() - start))
    a, b = statistics.median(times["attention"]), statistics.median(times["ours"])
    return (f"one attention (forward and backward): {a:.2f} ms; its scores recomputed (largest logit, entropy): "
            f"{b:.2f} ms ({b / a:.2f} of the attention)")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, name, cfg, every_s, warmup_s, timed_s, out_dir, gpu_s = sys.argv
        worker(name, cfg, int(every_s), int(warmup_s), int(timed_s), out_dir, gpu_s == "1")
    else:
        main()
