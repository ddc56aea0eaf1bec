"""What the diagnostics cost: training step time with and without them, and against two anchors.

    python benchmarks/overhead.py            # the full table (about 15 minutes on a 2-core CPU)
    python benchmarks/overhead.py --quick    # a smoke run: one short round of the small model

Configurations, each run in a process of its own, interleaved (bare, ours, lecture, wandb, bare, ...):

- ``bare``: training with a TensorBoard logger attached and no diagnostics;
- ``ours``: SaturationMonitor + GradDataRatio + UpdateRatio, histograms on, TensorBoard;
- ``lecture``: the lecture's notebook code written as a plain callback: ``retain_grad`` on every
  nonlinearity's output, ``.item()`` per statistic, ``torch.histogram``, TensorBoard's ``add_histogram``,
  and the ``lr * grad`` update estimate (it computes less than ours: no dead units, no non-finite counts);
- ``wandb``: ``wandb.watch(model, log="all")`` in offline mode (parameters and gradients, no activations);
  left out with a note when wandb is not installed.

Each run discards its warm-up steps and times a window of steps that holds whole logging periods; a
configuration's number is the median over rounds of the mean step time of its window (min-max shown).
"""

from __future__ import annotations

import argparse
import json
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


# --- models --------------------------------------------------------------------------------------------


@dataclass
class Workload:
    """A model, its batch, and how many steps to warm up and to time at each cadence."""

    name: str
    about: str
    warmup: int
    timed: dict[int, int]  # cadence -> timed steps (a multiple of the cadence)


WORKLOADS = {
    "makemore-deep": Workload(
        "makemore-deep",
        "lecture's deep MLP: block 3, n_embd 10, 5 x [Linear(100, bias=False), BatchNorm1d, Tanh], SGD, batch 32",
        warmup=50,
        timed={1: 200, 50: 400},
    ),
    "wide": Workload(
        "wide",
        "MLP: block 8, n_embd 64, 4 x [Linear(1024, bias=False), BatchNorm1d, Tanh], SGD, batch 512",
        warmup=5,
        timed={1: 20, 50: 100},
    ),
    "char-transformer": Workload(
        "char-transformer",
        "GPT: 4 layers, 4 heads, n_embd 128, block 64, LayerNorm, GELU MLP, AdamW, batch 32",
        warmup=5,
        timed={1: 30, 50: 100},
    ),
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
            self.net, self.batch, self.opt, self.lr = net, batch, opt, lr

        def training_step(self, batch, batch_idx):
            x, y = self.batch
            logits = self.net(x)
            return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

        def configure_optimizers(self):
            if self.opt == "adamw":
                return torch.optim.AdamW(self.parameters(), lr=self.lr)
            return torch.optim.SGD(self.parameters(), lr=self.lr)

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
    from torch import nn

    class LectureCode(L.Callback):
        def __init__(self) -> None:
            self.outs: dict[str, torch.Tensor] = {}
            self.on = False

        def on_fit_start(self, trainer, pl_module):
            for name, m in pl_module.named_modules():
                if isinstance(m, (nn.Tanh, nn.GELU)):
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
                for name, t in self.outs.items():  # activation distribution
                    metrics[f"act/{name}/mean"], metrics[f"act/{name}/std"] = t.mean().item(), t.std().item()
                    metrics[f"act/{name}/saturated"] = ((t.abs() > 0.97).float().mean() * 100).item()
                    torch.histogram(t.detach(), density=True)
                    tb.add_histogram(f"act/{name}", t.detach(), step)
                for name, t in self.outs.items():  # gradient distribution
                    g = t.grad
                    metrics[f"act_grad/{name}/mean"], metrics[f"act_grad/{name}/std"] = g.mean().item(), g.std().item()
                    torch.histogram(g, density=True)
                    tb.add_histogram(f"act_grad/{name}", g, step)
                lr = optimizer.param_groups[0]["lr"]
                for name, p in pl_module.named_parameters():
                    if p.ndim == 2:  # weights gradient distribution
                        g = p.grad
                        metrics[f"grad/{name}/mean"], metrics[f"grad/{name}/std"] = g.mean().item(), g.std().item()
                        metrics[f"grad/{name}/ratio"] = (g.std() / p.std()).item()
                        torch.histogram(g, density=True)
                        tb.add_histogram(f"grad/{name}", g, step)
                    metrics[f"ud/{name}"] = ((lr * p.grad).std() / p.data.std()).log10().item()
            trainer.logger.log_metrics(metrics, step)
            self.outs = {}

    return LectureCode()


# --- one run ------------------------------------------------------------------------------------------


def worker(workload: str, config: str, every: int, warmup: int, timed: int, out: str) -> None:
    import lightning as L
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_netdiag import GradDataRatio, SaturationMonitor, UpdateRatio

    torch.manual_seed(0)
    model = build(workload)

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_train_batch_end(self, *args) -> None:
            self.ends.append(time.perf_counter())

    clock = Clock()
    callbacks: list[L.Callback] = []
    if config == "ours":
        callbacks = [SaturationMonitor(), GradDataRatio(), UpdateRatio()]
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
        accelerator="cpu",
        logger=TensorBoardLogger(out, name="tb"),
        log_every_n_steps=every,
        callbacks=[*callbacks, clock],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = torch.utils.data.DataLoader(range(10**9), batch_size=None)  # batches come from the module
    trainer.fit(model, loader)
    step_ms = 1000 * (clock.ends[-1] - clock.ends[warmup - 1]) / timed
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"step_ms": step_ms, "peak_rss_mb": peak_mb}))
    if config == "wandb":
        wandb.finish()


def run_one(workload: Workload, config: str, every: int, timed: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
        args = [sys.executable, __file__, "--worker", workload.name, config, str(every), str(workload.warmup)]
        done = subprocess.run([*args, str(timed), out], capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{workload.name}/{config}/every {every} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the table ----------------------------------------------------------------------------------------

TARGETS = {  # (workload, cadence) -> the most our step may cost, as a ratio to bare
    ("makemore-deep", 50): 1.02,
    ("wide", 50): 1.02,
    ("makemore-deep", 1): 1.5,
    ("wide", 1): 1.15,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one short round of makemore-deep (a smoke test)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per configuration")
    parser.add_argument("--models", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = parser.parse_args()
    try:
        import wandb  # noqa: F401

        configs = CONFIGS
    except ImportError:
        print("wandb is not installed: the wandb.watch anchor is left out (pip install wandb to add it)")
        configs = tuple(c for c in CONFIGS if c != "wandb")
    workloads = [WORKLOADS[m] for m in args.models]
    rounds = args.rounds
    if args.quick:
        workloads = [Workload("makemore-deep", WORKLOADS["makemore-deep"].about, warmup=10, timed={1: 20, 50: 50})]
        rounds = 1

    results: dict[tuple[str, int, str], list[dict]] = {}
    for w in workloads:
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
    if args.json:
        raw = {f"{k[0]}|{k[1]}|{k[2]}": v for k, v in results.items()}
        args.json.write_text(json.dumps(raw, indent=1))


def table(workloads: list[Workload], configs: tuple[str, ...], results: dict) -> str:
    lines = [
        "| model | logging | config | step ms (median, min-max) | ratio to bare | added vs anchors | peak RSS MB "
        "| target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for w in workloads:
        for every in w.timed:
            med = {c: statistics.median(r["step_ms"] for r in results[(w.name, every, c)]) for c in configs}
            for c in configs:
                runs = results[(w.name, every, c)]
                ms = [r["step_ms"] for r in runs]
                ratio = med[c] / med["bare"]
                added = ""
                if c == "ours":
                    added = ", ".join(
                        f"{(ratio - 1) / (med[a] / med['bare'] - 1):.2f} of {a}"
                        for a in configs
                        if a in ("lecture", "wandb") and med[a] > med["bare"]
                    )
                target = TARGETS.get((w.name, every)) if c == "ours" else None
                verdict = "" if target is None else f"<= {target} {'met' if ratio <= target else 'MISSED'}"
                rss = statistics.median(r["peak_rss_mb"] for r in runs)
                lines.append(
                    f"| {w.name} | every {'step' if every == 1 else f'{every} steps'} | {c} | "
                    f"{med[c]:.2f} ({min(ms):.2f}-{max(ms):.2f}) | {ratio:.3f}x | {added} | {rss:.0f} | {verdict} |"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, name, cfg, every_s, warmup_s, timed_s, out_dir = sys.argv
        worker(name, cfg, int(every_s), int(warmup_s), int(timed_s), out_dir)
    else:
        main()
