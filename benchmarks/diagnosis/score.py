"""Scores the health report on the diagnosis suite: does it name each fault, and stay silent on healthy runs?

    python benchmarks/diagnosis/score.py                    # the whole suite, seeds 0 and 1, two runs at a time
    python benchmarks/diagnosis/score.py --quick            # the quick subset (the tests run it), seed 0
    python benchmarks/diagnosis/score.py --json out.json    # also keep every run's records
    python benchmarks/diagnosis/score.py --from-json out.json   # score kept runs again, with today's rules
    python benchmarks/diagnosis/score.py --quick --front loop   # through the plain-PyTorch front end
    python benchmarks/diagnosis/score.py --quick --front hf     # through the Hugging Face Trainer

Each run trains on the CPU with SaturationMonitor, GradDataRatio, UpdateRatio, LogitMonitor, OptimizerState,
FlightRecorder and HealthReport attached, all with default arguments (measured every ``log_every_n_steps`` = 50
steps; the flight recorder every step), and keeps what the report warned during training (each rule's first warning
and its step) and what it says at the end. The
warnings are also found again from the records (``report.replay``: the rules evaluated at every logged step, as
the callback does):
``--from-json`` scores stored runs that way, and a live run checks that both agree.

Labels: a healthy run must get no warning at all; a fault must be named by its own check. A learning-rate
sweep's points are labelled from their final loss (the mean of the last 100 steps' training losses) against
the best of the same sweep and seed: within 3x of the best rate, healthy (above the best and more than 5 % worse:
warnings of instability, a rate too high, dead units or a spike allowed: a run clearly worse than it could be,
named by a warning whose advice includes the rate, is no false alarm); 10x or more above (below) it and
more than 5 % worse, the learning rate is too high (too low) and the report must say so, with a factor that
moves toward the best; 10x or more away but not clearly worse, that one advice is allowed and nothing else.
An instability run (a transformer at a high rate, in fp16, without weight decay, ...) is labelled from its final
loss against its healthy twin's of the same seed: more than 5 % worse, or diverged, and its own check must name
it; else healthy (10x or more above the best rate: its own check allowed). The table gives, per run, the step of
the first warning and the lead time: the steps from it to the first logged step from which the run's loss (the
mean of the 50 steps before) stays more than 5 % above its twin's, or is no longer finite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from suite import (  # noqa: E402
    ATTENTION,
    DEAD_UNITS,
    FAULT_CAUSES,
    FLIGHT_CHECKS,
    HEALTHY,
    NONFINITE,
    NOT_INJECTED,
    SPIKE,
    TOO_HIGH,
    TOO_LOW,
    Run,
    all_runs,
)  # fmt: skip

from lightning_netdiag.flight.events import named_first  # noqa: E402

NEAR, FAR, WORSE = 3.4, 9.9, 1.05  # "within 3x", "10x or more" on a grid of ~3.16x steps; "more than 5 % worse"


# --- one run (in a process of its own) ------------------------------------------------------------------


def train(run: Run, seed: int) -> dict[str, Any]:
    """Train ``run`` with the diagnostics and the report attached; what they recorded, as plain data."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback
    from models import BUILDERS

    from lightning_netdiag import (
        FlightRecorder,
        GradDataRatio,
        HealthReport,
        LogitMonitor,
        OptimizerState,
        SaturationMonitor,
        UpdateRatio,
    )

    class Losses(Callback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.values.append(float(outputs["loss"]))

    model, loader = BUILDERS[run.recipe.model](run.recipe, seed)
    plugins = []
    if run.recipe.precision in ("16-mixed", "16-unscaled"):
        from lightning.pytorch.plugins.precision import MixedPrecision

        scaler = torch.amp.GradScaler("cpu", enabled=run.recipe.precision == "16-mixed")
        plugins.append(MixedPrecision("16-mixed", "cpu", scaler))
    monitors = [SaturationMonitor(), GradDataRatio(), UpdateRatio(), LogitMonitor(), OptimizerState(), FlightRecorder()]
    health, losses = HealthReport(print_table=False), Losses()
    trainer = L.Trainer(
        max_steps=run.recipe.steps, callbacks=[*monitors, health, losses], plugins=plugins, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        devices=1, use_distributed_sampler=False,
    )  # fmt: skip
    start = time.perf_counter()
    with warnings.catch_warnings():  # the report's warnings are read from `health.warnings`
        warnings.simplefilter("ignore")
        trainer.fit(model, loader)
    return {**recorded(monitors, losses.values, start), "warned": [[v.check, v.step] for v in health.warnings]}


def recorded(meters: list[Any], losses: list[float], start: float) -> dict[str, Any]:
    """A run's result as plain data: its losses, and the records of its meters (SaturationMonitor, GradDataRatio,
    UpdateRatio or the plain loop's), whole (``Record.to_json``)."""
    return {
        "seconds": time.perf_counter() - start,
        "losses": losses,
        "records": {m.kind: m.record.to_json() for m in meters},
    }


def train_loop(run: Run, seed: int) -> dict[str, Any]:
    """``train`` through the plain-PyTorch front end (``NetDiag``): the same model, batches, optimizer,
    schedule and precision, in a hand-written loop; the warnings are the report replayed at each logged step."""
    import itertools

    import torch
    from models import BUILDERS

    from lightning_netdiag import NetDiag

    model, loader = BUILDERS[run.recipe.model](run.recipe, seed)
    conf = model.configure_optimizers()
    optimizer = conf["optimizer"] if isinstance(conf, dict) else conf
    schedule = conf.get("lr_scheduler", {}).get("scheduler") if isinstance(conf, dict) else None
    fp16 = run.recipe.precision in ("16-mixed", "16-unscaled")
    scaler = torch.amp.GradScaler("cpu", enabled=run.recipe.precision == "16-mixed") if fp16 else None
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    batches = itertools.chain.from_iterable(itertools.repeat(loader))  # epochs, as the Trainer runs them
    with warnings.catch_warnings(), NetDiag(model, optimizer, every_n_steps=50, scaler=scaler) as diag:
        warnings.simplefilter("ignore")  # `self.log` outside a Trainer
        for i, batch in zip(range(run.recipe.steps), batches, strict=False):
            with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
                loss = model.training_step(batch, i)
            optimizer.zero_grad()
            diag.loss(loss)  # the flight recorder's loss, before the step it belongs to (unscaled)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            if schedule is not None:
                schedule.step()
            losses.append(float(loss))
    result = recorded(diag.meters, losses, start)
    result["warned"] = replay(result)[0]
    return result


#: The runs the Hugging Face front end cannot run on the CPU, and why.
NOT_THROUGH_HF = {"16-mixed": "the Trainer's fp16 has no GradScaler on the CPU"}


def train_hf(run: Run, seed: int) -> dict[str, Any]:
    """``train`` through the Hugging Face Trainer's front end (``NetDiagCallback``, default arguments: every
    ``logging_steps`` = 50): the same model, batches, optimizer and schedule, the training step wrapped as a
    model that returns its loss; no clipping, as the other fronts. On the CPU the Trainer's fp16 does nothing
    (accelerate: no autocast, no GradScaler), so an fp16 run without a scaler autocasts in the wrapper and one
    with a scaler is not run here (see :data:`NOT_THROUGH_HF`). The warnings are the report replayed at each
    logged step."""
    import torch
    import transformers
    from models import BUILDERS

    from lightning_netdiag.hf import NetDiagCallback

    model, loader = BUILDERS[run.recipe.model](run.recipe, seed)
    conf = model.configure_optimizers()
    optimizer = conf["optimizer"] if isinstance(conf, dict) else conf
    schedule = conf.get("lr_scheduler", {}).get("scheduler") if isinstance(conf, dict) else None
    schedule = schedule or torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    losses: list[float] = []

    # the suite's Classifier prepares a step's batch apart from its loss; the other models are their training step
    prepare = getattr(model, "prepare", lambda batch: (batch,))
    loss_of = getattr(model, "loss_of", lambda batch: model.training_step(batch, 0))

    class Steps(torch.nn.Module):
        """The LightningModule's loss as a model that returns it, as Hugging Face models do; its batch prepared
        (the fault injected, the step counted) before the forward, as a collator would, so that the flight
        recorder's replay of a forward changes nothing of the run."""

        def __init__(self) -> None:
            super().__init__()
            self.module = model

        def forward(self, *prepared: Any) -> dict[str, Any]:
            with torch.autocast("cpu", dtype=torch.float16, enabled=run.recipe.precision == "16-unscaled"):
                return {"loss": loss_of(*prepared)}

    class OnTheSuitesBatches(transformers.Trainer):
        def get_train_dataloader(self) -> Any:
            return loader

        def compute_loss(self, steps: Any, inputs: Any, return_outputs: bool = False, **kwargs: Any) -> Any:
            loss = steps(*prepare(inputs))["loss"]
            losses.append(float(loss))
            return loss

    import tempfile

    args = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="netdiag-hf-"), max_steps=run.recipe.steps, logging_steps=50,
        max_grad_norm=0.0, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
        remove_unused_columns=False, seed=seed,
    )  # fmt: skip
    callback = NetDiagCallback(print_report=False)
    rng = torch.random.get_rng_state()  # the Trainer seeds the global generator: keep the other fronts' stream
    trainer = OnTheSuitesBatches(model=Steps(), args=args, callbacks=[callback], optimizers=(optimizer, schedule))
    torch.random.set_rng_state(rng)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # `self.log` outside a Lightning Trainer
        trainer.train()
    result = recorded(callback.diag.meters, losses, start)  # type: ignore[union-attr]
    result["warned"] = replay(result)[0]
    return result


# --- the report, replayed on the recorded records ---------------------------------------------------------


def records_of(result: dict[str, Any]) -> dict[str, Any]:
    """A run's records, as its meters held them."""
    from lightning_netdiag.record import Record

    return {kind: Record.from_json(data) for kind, data in result["records"].items()}


def replay(result: dict[str, Any]) -> tuple[list[list[Any]], list[dict[str, Any]]]:
    """What the report warned at each logged step (each rule's first time) and its summary at the end; also keeps
    in ``result["signals"]`` where the run stands against each of the report's constants."""
    from lightning_netdiag import report

    records = records_of(result)
    # the signals at the meters' logging steps (not at the flight recorder's steps between them: the rules hold
    # over logging steps in a row)
    logged = {step for kind, record in records.items() if kind != "flight" for step in record.steps}
    warned, seen, per_step = [], set(), []
    for step, partial in report.replay(**records):
        for v in report.evaluate(**partial):
            if v.rule not in seen:
                seen.add(v.rule)
                warned.append([v.check, v.step])
        if step in logged:
            per_step.append(step_signals(partial, step))
    result["signals"] = {**init_signals(records), **persistent(per_step)}
    final = [asdict(v) for v in report.summarize(**records).verdicts]
    return warned, final


# --- where each run stands against each constant ----------------------------------------------------------


def init_signals(records: dict[str, Any]) -> dict[str, float]:
    """The signals of the rules at init, as each compares them with its line (the registry's)."""
    from lightning_netdiag.rules import RULES

    return signals_at(records, 0, [r for r in RULES if r.when == "init"])


def step_signals(records: dict[str, Any], step: int) -> dict[str, float]:
    """The signals of the rules during training at ``step``."""
    from lightning_netdiag.rules import RULES

    return signals_at(records, step, [r for r in RULES if r.when != "init"])


def signals_at(records: dict[str, Any], step: int, rules: list[Any]) -> dict[str, float]:
    out = {}
    for rule in rules:
        if rule.signal is not None and (value := rule.signal(records, step)) is not None:
            out[rule.signal_name] = value
    return out


def low_bad() -> set[str]:
    """The signals whose low values are the bad ones (the others: high values)."""
    from lightning_netdiag.rules import RULES

    return {rule.signal_name for rule in RULES if rule.signal is not None and not rule.above}


def held(per_step: list[dict[str, float]], n: int) -> dict[str, float]:
    """Each signal's most extreme value held over ``n`` logged steps in a row (n = 1: at any one logged step)."""
    out: dict[str, float] = {}
    lows = low_bad()
    for key in {k for signals in per_step for k in signals}:
        series = [signals.get(key) for signals in per_step]
        low = key in lows
        windows = [series[i : i + n] for i in range(len(series) - n + 1)]
        values = [(max(w) if low else min(w)) for w in windows if all(v is not None for v in w)]
        if values:
            out[key] = min(values) if low else max(values)
    return out


def persistent(per_step: list[dict[str, float]]) -> dict[str, float]:
    """The signals as the rules during training see them: each held over PERSIST logged steps; and, for the lines
    that count at once (a rule's ``at_once``), at any one logged step, as ``"<signal>, one step"``."""
    from lightning_netdiag.rules import PERSIST

    return {**held(per_step, PERSIST), **{f"{k}, one step": v for k, v in held(per_step, 1).items()}}


# --- labels and scores ------------------------------------------------------------------------------------


def final_loss(losses: list[float]) -> float:
    tail = losses[-100:]
    return statistics.fmean(tail) if tail and all(math.isfinite(x) for x in tail) else math.inf


def labels(rows: list[dict[str, Any]]) -> None:
    """Each sweep point's label, from the sweep's best final loss of the same seed."""
    sweeps: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        if row["sweep"]:
            sweeps.setdefault((row["sweep"], row["seed"]), []).append(row)
    for points in sweeps.values():
        best = min(points, key=lambda r: r["loss"])
        for row in points:
            ratio, worse = row["lr"] / best["lr"], row["loss"] > WORSE * best["loss"]
            row["best_lr"] = best["lr"]
            if 1 / NEAR <= ratio <= NEAR:  # clearly worse all the same: a warning of instability is no false alarm
                row["expect"], row["allowed"] = (
                    HEALTHY,
                    ([ATTENTION, TOO_HIGH, DEAD_UNITS, *FLIGHT_CHECKS[SPIKE]] if worse and ratio > 1 else []),
                )
            elif ratio >= FAR:
                row["expect"], row["allowed"] = (TOO_HIGH, []) if worse else (HEALTHY, [TOO_HIGH])
            elif ratio <= 1 / FAR:
                row["expect"], row["allowed"] = (TOO_LOW, []) if worse else (HEALTHY, [TOO_LOW])
            else:  # between 3x and 10x (not on this grid)
                row["expect"], row["allowed"] = HEALTHY, [TOO_HIGH if ratio > 1 else TOO_LOW]


def twin_labels(rows: list[dict[str, Any]]) -> None:
    """Each instability run's label, from its final loss against its healthy twin's of the same seed; and when its
    loss became clearly worse (``worse_at``)."""
    by_name = {(row["name"], row["seed"]): row for row in rows}
    defined = {run.name: run for run in all_runs()}  # today's definitions: kept runs are scored by them
    for row in rows:
        twin = by_name.get((row.get("twin"), row["seed"]))
        if twin is None:
            continue
        unstable = not math.isfinite(row["loss"]) or row["loss"] > WORSE * twin["loss"]
        run, twin_run = defined.get(row["name"]), defined.get(twin["name"])
        lr, twin_lr = (run.recipe.lr, twin_run.recipe.lr) if run and twin_run else (row["lr"], twin["lr"])
        far = lr >= FAR * twin_lr
        own = run.expect if run else row["own"]
        row["expect"], row["allowed"] = (own, []) if unstable else (HEALTHY, [own] if far else [])
        row["worse_at"] = worse_at(row["losses"], twin["losses"]) if unstable else None


def worse_at(losses: list[float], twin: list[float], window: int = 50) -> int | None:
    """The first logged step from which the mean loss of the ``window`` steps before stays more than 5 % above the
    twin's (or the first step whose loss is not finite, if that comes first)."""
    bad = next((i for i, x in enumerate(losses) if not math.isfinite(x)), None)
    ends = range(window, min(len(losses), len(twin)) + 1, window)
    worse = [statistics.fmean(losses[e - window : e]) > WORSE * statistics.fmean(twin[e - window : e]) for e in ends]
    first = next((e for i, e in enumerate(ends) if all(worse[i:])), None)
    found = [x for x in (bad, first) if x is not None]
    return min(found) if found else None


def flight_named(row: dict[str, Any]) -> tuple[int | None, int | None, str | None, str | None]:
    """A flight run's injected step (for a death without one: its first non-finite loss) and layer, and the flight
    recorder's first event: its step and the weight it named first."""
    fault = row["fault"]
    at = (
        fault["step"]
        if fault["kind"] not in NOT_INJECTED
        else next((i for i, x in enumerate(row["losses"]) if not math.isfinite(x)), None)
    )
    events = row["records"].get("flight", {}).get("events", [])
    first = events[0] if events else {}
    return at, first.get("step"), fault["layer"], named_first(first)


def judge_flight(row: dict[str, Any]) -> None:
    """A flight run is right where the recorder's first event is of its kind, at its step (within one step; a
    death may be foretold earlier by a spike) and, where the fault has a layer, names that layer first."""
    at, step, layer, named = flight_named(row)
    first = next((v for v in row["final"] if v["check"] in FLIGHT_CHECKS[row["expect"]]), None)
    wrong = []
    if step is None or first is None and row["expect"] != NONFINITE:
        wrong.append(f"missed {row['expect']}")
    elif at is None or not (0 <= step - at <= 1 or (row["expect"] == NONFINITE and step < at)):
        wrong.append(f"step {step}, not {at}")
    # the layer's name as a part of the weight's (the fronts wrap the model: "net.", "module.net.")
    if layer is not None and (named is None or not re.search(rf"(^|\.){re.escape(layer)}(\.|$)", named)):
        wrong.append(f"named {named}, not {layer}")
    want, said = FAULT_CAUSES.get(row["fault"]["kind"]), said_cause(row)
    if want is not None and first is not None and said != want:
        wrong.append(f"cause {said}, not {want}")
    row["ok"], row["wrong"] = not wrong, wrong


def said_cause(row: dict[str, Any]) -> str | None:
    """The cause the report gave the run's first spike, or for a run expected to die its first death (its verdict's
    ``why``)."""
    checks = FLIGHT_CHECKS[NONFINITE if row["expect"] == NONFINITE else SPIKE]
    first = next((v for v in row["final"] if v["check"] in checks), None)
    return None if first is None else first.get("why") or None


def flight_table(rows: list[dict[str, Any]], seeds: list[int]) -> str:
    """One row per flight run: the injected step and layer, the recorder's first event (step, cause) and the weight
    it named first, how many steps its first series led the event, whether that was right."""
    by_name: dict[str, dict[int, dict[str, Any]]] = {}
    for row in rows:
        by_name.setdefault(row["name"], {})[row["seed"]] = row
    lines = [
        "| run | what it is | injected: step, layer | first event: step, cause | named first (its series, step) | "
        "lead | said why | right? |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cells(row: dict[str, Any]) -> tuple[str, ...]:
        at, step, layer, named = flight_named(row)
        events = row["records"].get("flight", {}).get("events", [])
        first = events[0] if events else {}
        began = (first.get("began") or [{}])[0]
        made = first.get("made") or {}
        if made.get("module"):
            what = f"{made['module']} (its forward, replayed)"
        else:
            what = f"{began['name']} ({began['series']}, {began['step']})" if began else "-"
        right = "yes" if row["ok"] else "**no**: " + ", ".join(row["wrong"])
        event = f"{step}, {first['cause']}" if first else "-"
        return f"{at}, {layer or '-'}", event, what, str(first.get("lead", "-")), said_cause(row) or "-", right

    for name, per_seed in by_name.items():
        columns = zip(*(cells(per_seed[s]) for s in seeds if s in per_seed), strict=True)
        joined = [" / ".join(c) if len(set(c)) > 1 else c[0] for c in columns]
        lines.append(f"| {name} | {next(iter(per_seed.values()))['about']} | " + " | ".join(joined) + " |")
    right = sum(r["ok"] for r in rows)
    lines += [
        "",
        f"Flight runs right (step within one, layer first where injected, the cause said): {right} of {len(rows)}.",
    ]
    return "\n".join(lines)


def fired(row: dict[str, Any]) -> set[str]:
    """The checks the report said of a run, during training or at its end."""
    return {check for check, _ in row["warned"]} | {v["check"] for v in row["final"]}


def named(row: dict[str, Any]) -> bool:
    """Whether a faulty run was named by its own check. A rate too high whose run diverged is labelled by its
    outcome too: the fatal non-finite check names it, and its advice lowers the rate first (relu-mlp at 10x its
    rate diverges on some CPUs and not on others)."""
    said = fired(row)
    diverged = row["expect"] == TOO_HIGH and not math.isfinite(row["loss"])
    return row["expect"] in said or (diverged and "non-finite" in said)


def judge(row: dict[str, Any]) -> None:
    """Whether the report was right about ``row``: ``ok``, and what went wrong in ``wrong``."""
    if row.get("fault"):
        judge_flight(row)
        return
    said = fired(row)
    expect, allowed = row["expect"], set(row.get("allowed", []))
    wrong = []
    if expect == HEALTHY:
        wrong += sorted(said - allowed)
    else:
        if not named(row):
            wrong.append(f"missed {expect}")
        opposite = {TOO_HIGH: TOO_LOW, TOO_LOW: TOO_HIGH}.get(expect)
        if opposite in said:
            wrong.append(opposite)
    if expect in (TOO_HIGH, TOO_LOW):
        advice = next((v["advice"] for v in row["final"] if v["check"] == expect), None)
        if advice is not None and "best_lr" in row and not toward_best(advice, row):  # known from a whole sweep
            wrong.append("factor not toward the best")
    row["ok"], row["wrong"] = not wrong, wrong


def toward_best(advice: str, row: dict[str, Any]) -> bool:
    """The suggested rate moves toward the sweep's best and lands within 3x of it or short of it."""
    factor = float(advice.split("about ")[1].split(" ")[0])
    suggested = row["lr"] / factor if advice.startswith("divide") else row["lr"] * factor
    lo, hi = sorted((row["lr"], row["best_lr"]))
    return lo / NEAR <= suggested <= hi * NEAR and abs(math.log(suggested / row["best_lr"])) < abs(
        math.log(row["lr"] / row["best_lr"])
    )


# --- the table --------------------------------------------------------------------------------------------


def _cells(row: dict[str, Any]) -> tuple[str, str, str, str]:
    """A run's expected label, its final loss, what the report said (each check once, with the step of its
    first warning; ``end`` for one said only at the end) and whether that was right."""
    expect = row["expect"] + (f" (or {row['allowed'][0]})" if row.get("allowed") else "")
    first = {check: step for check, step in reversed(row["warned"])}
    checks = dict.fromkeys([*first, *(v["check"] for v in row["final"])])
    said = [f"{c} ({first[c]})" if c in first else f"{c} (end)" for c in checks]
    right = "yes" if row["ok"] else "**no**: " + ", ".join(row["wrong"])
    return expect, f"{row['loss']:.4g}", ", ".join(said) or "-", right


def lead(row: dict[str, Any]) -> tuple[str, str, str]:
    """An unstable run's first warning of its own check, the step its loss became clearly worse, and the lead."""
    own = next((step for check, step in row["warned"] if check == row["expect"]), None)
    worse = row.get("worse_at")
    gap = "-" if own is None or worse is None else str(worse - own)
    return ("-" if own is None else str(own)), ("-" if worse is None else str(worse)), gap


def table(rows: list[dict[str, Any]], seeds: list[int]) -> str:
    """One row per run, its seeds' cells joined with " / " where they differ."""
    by_name: dict[str, dict[int, dict[str, Any]]] = {}
    for row in rows:
        by_name.setdefault(row["name"], {})[row["seed"]] = row
    lines = [
        "| run | what it is | expected | final loss | the report said (step of the first warning) | right? |",
        "|---|---|---|---|---|---|",
    ]
    twins = [row for row in rows if row.get("twin")]
    if twins:
        lines[0] += " first warning | clearly worse at | lead (steps) |"
        lines[1] += "---|---|---|"

    def row_cells(row: dict[str, Any]) -> tuple[str, ...]:
        unstable = row.get("twin") and row["expect"] != HEALTHY
        return _cells(row) + ((lead(row) if unstable else ("-", "-", "-")) if twins else ())

    for name, per_seed in by_name.items():
        columns = zip(*(row_cells(per_seed[s]) for s in seeds if s in per_seed), strict=True)
        cells = [" / ".join(c) if len(set(c)) > 1 or c[0][:1].isdigit() else c[0] for c in columns]
        lines.append(f"| {name} | {next(iter(per_seed.values()))['about']} | " + " | ".join(cells) + " |")
    faults = [r for r in rows if r["expect"] != HEALTHY]
    healthy = [r for r in rows if r["expect"] == HEALTHY]
    n_named = sum(named(r) for r in faults)
    alarms = sum(not r["ok"] for r in healthy)
    minutes = sum(r["seconds"] for r in rows) / 60
    lines += [
        "",
        f"Seeds {', '.join(map(str, seeds))} (cells: seed {' / seed '.join(map(str, seeds))} where they differ). "
        f"Faults named by their own check: {n_named} of {len(faults)}. Healthy runs with any warning: {alarms} of "
        f"{len(healthy)}. Runs the report got right: {sum(r['ok'] for r in rows)} of {len(rows)}. "
        f"Training time: {minutes:.0f} min (summed over runs).",
    ]
    return "\n".join(lines)


def constants() -> list[tuple[str, float, str, str | None, bool]]:
    """(constant, its value, the signal compared with it, the check it makes, whether high values are bad), from the
    rules' registry, in its order. The check of a line that counts at once is None: it must stay clear of every
    healthy run; the held line names the faults, the line at once only names them earlier."""
    from lightning_netdiag.rules import RULES

    out: list[tuple[str, float, str, str | None, bool]] = []
    for rule in RULES:
        if rule.signal is not None:
            out.append((rule.constant, rule.line, rule.signal_name, rule.check, rule.above))
        if rule.at_once is not None:
            out.append((rule.at_once_constant, rule.at_once, f"{rule.signal_name}, one step", None, rule.above))
    return out


def _nearest(points: list[tuple[dict[str, Any], float]], highest: bool) -> tuple[float, str] | None:
    """The highest (or lowest) value, with its run and seed."""
    if not points:
        return None
    row, value = (max if highest else min)(points, key=lambda p: p[1])
    return value, f"{row['name']}, seed {row['seed']}"


def evidence_table(rows: list[dict[str, Any]]) -> str:
    """Per constant: the healthy runs' value nearest to it, and the value of the faults it must name that is
    nearest to it (with the run): the constant separates them when it lies between."""
    lines = [
        "| constant | value | signal | healthy runs: nearest (run) | faults it must name: nearest (run) | separates? |",
        "|---|---|---|---|---|---|",
    ]
    for name, value, signal, check, high_bad in constants():
        at = [(r, r["signals"][signal]) for r in rows if signal in r["signals"]]
        healthy = _nearest([(r, v) for r, v in at if r["expect"] == HEALTHY and not r.get("allowed")], high_bad)
        faults = None if check is None else _nearest([(r, v) for r, v in at if r["expect"] == check], not high_bad)
        below, above = (healthy, faults) if high_bad else (faults, healthy)
        ok = (below is None or below[0] <= value) and (above is None or value < above[0])
        cells = ["-" if found is None else f"{found[0]:.3g} ({found[1]})" for found in (healthy, faults)]
        lines.append(f"| {name} | {value:g} | {signal} | {cells[0]} | {cells[1]} | {'yes' if ok else '**no**'} |")
    return "\n".join(lines)


# --- driver -----------------------------------------------------------------------------------------------


def row_of(run: Run, seed: int, result: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": run.name, "about": run.about, "seed": seed, "sweep": run.sweep, "twin": run.twin, "own": run.expect,
        "lr": run.recipe.lr, "fault": None if run.fault is None else asdict(run.fault),
        "expect": run.expect, "allowed": [], "loss": final_loss(result["losses"]), **result,
    }  # fmt: skip


def in_process(name: str, seed: int, quick: bool, out: str, front: str) -> None:
    """The child's side: train one run and write its result."""
    import torch

    torch.set_num_threads(int(os.environ.get("NETDIAG_THREADS", "1")))
    run = next(r for r in selected(quick) if r.name == name)
    result = {"lightning": train, "loop": train_loop, "hf": train_hf}[front](run, seed)
    result["replayed"], result["final"] = replay(result)
    Path(out).write_text(json.dumps(result))


def selected(quick: bool) -> list[Run]:
    return [r.shortened() for r in all_runs() if r.quick] if quick else all_runs()


def run_all(runs: list[Run], seeds: list[int], jobs: int, quick: bool, front: str) -> list[dict[str, Any]]:
    import tempfile

    threads = max(1, (os.cpu_count() or 1) // jobs)
    rows: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="netdiag-suite-"))

    def one(args: tuple[Run, int]) -> None:
        run, seed = args
        out = tmp / f"{abs(hash((run.name, seed)))}.json"
        cmd = [sys.executable, __file__, "--child", run.name, "--seed", str(seed), "--out", str(out)]
        cmd += ["--front", front] + (["--quick"] if quick else [])
        env = dict(os.environ, NETDIAG_THREADS=str(threads), PYTHONWARNINGS="ignore")
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"{run.name} (seed {seed}) failed:\n{done.stderr[-3000:]}")
        result = json.loads(out.read_text())
        if result["replayed"] != result["warned"]:
            raise RuntimeError(f"{run.name}: the replayed warnings {result['replayed']} differ from the live ones")
        rows.append(row_of(run, seed, result))
        print(f"  {run.name} (seed {seed}): final loss {rows[-1]['loss']:.4g}, {result['seconds']:.0f} s", flush=True)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, [(run, seed) for seed in seeds for run in runs]))
    order = {(r.name, s): i for i, (r, s) in enumerate((r, s) for r in runs for s in seeds)}
    return sorted(rows, key=lambda row: order[(row["name"], row["seed"])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the quick subset, seed 0")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 (quick: 0)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, each in a process of its own")
    parser.add_argument("--runs", nargs="+", default=None, help="only the runs whose name contains one of these")
    parser.add_argument("--json", default=None, help="write every run (records included) to this file")
    parser.add_argument("--from-json", default=None, help="score the runs stored in this file again")
    parser.add_argument(
        "--front", choices=("lightning", "loop", "hf"), default="lightning", help="train with the Lightning "
        "callbacks (default), through the plain-PyTorch front end (NetDiag) or the Hugging Face Trainer's",
    )  # fmt: skip
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        in_process(args.child, args.seed, args.quick, args.out, args.front)
        return
    seeds = args.seeds or ([0] if args.quick else [0, 1])
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())["rows"]
        for row in rows:
            row["warned"], row["final"] = replay(row)
    else:
        runs = [r for r in selected(args.quick) if args.runs is None or any(s in r.name for s in args.runs)]
        if args.front == "hf":
            for r in (r for r in runs if r.recipe.precision in NOT_THROUGH_HF):
                print(f"not run through the Hugging Face Trainer: {r.name} ({NOT_THROUGH_HF[r.recipe.precision]})")
            runs = [r for r in runs if r.recipe.precision not in NOT_THROUGH_HF]
        print(f"{len(runs)} runs x {len(seeds)} seeds, {args.jobs} at a time", flush=True)
        start = time.perf_counter()
        rows = run_all(runs, seeds, args.jobs, args.quick, args.front)
        print(f"wall time: {(time.perf_counter() - start) / 60:.1f} min")
        if args.json:  # kept before scoring: the runs are the expensive part
            Path(args.json).write_text(json.dumps({"rows": rows}))
    labels(rows)
    twin_labels(rows)
    for row in rows:
        judge(row)
    seeds = sorted({r["seed"] for r in rows})
    flights = [r for r in rows if r.get("fault")]
    print(table([r for r in rows if not r.get("fault")], seeds))
    if flights:
        print()
        print(flight_table(flights, seeds))
    print()
    print(evidence_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
