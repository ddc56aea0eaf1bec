"""Hooks as resources: idle off logging steps, removed on teardown and on a crash, nothing retained."""

import gc
import inspect
import weakref
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import TinyNet, all_callbacks, loader, read_tensorboard, trainer
from torch import nn

import lightning_netdiag
from lightning_netdiag import SaturationMonitor, stats
from lightning_netdiag.capture import HookHandles

PACKAGE_DIR = str(Path(lightning_netdiag.__file__).parent)


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_are_removed_after_fit_and_removal_is_safe_twice(tmp_path):
    model = TinyNet()
    sat = SaturationMonitor(every_n_steps=1)
    probe = []

    class Probe(L.Callback):
        def on_train_batch_start(self, *args):
            probe.append(hook_count(model))

    trainer(tmp_path, [sat, Probe()], max_steps=2).fit(model, loader())
    assert probe == [2, 2]  # one forward hook per Tanh while training
    assert hook_count(model) == 0
    sat.teardown(None, model, "fit")  # a second removal does nothing
    assert hook_count(model) == 0

    handles = HookHandles()
    with handles:
        handles.add(model.net[2].register_forward_hook(lambda *a: None))
        assert len(handles) == 1
    assert hook_count(model) == 0 and len(handles) == 0
    handles.remove()


class CrashAt(TinyNet):
    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == 2:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_hooks_are_removed_when_training_crashes(tmp_path):
    model = CrashAt()
    t = trainer(tmp_path, [SaturationMonitor(every_n_steps=1, modules=[nn.Tanh, nn.GELU])], max_steps=5)
    with pytest.raises(RuntimeError, match="boom"):
        t.fit(model, loader())
    assert hook_count(model) == 0


class WeakNet(L.LightningModule):
    """Keeps only weak references to its activations: any strong one left is the callbacks'."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.act, self.out = nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)
        self.refs: list[weakref.ref] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.act(self.lin(x))
        self.refs.append(weakref.ref(h))
        return nn.functional.cross_entropy(self.out(h), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_no_activation_tensor_outlives_its_step(tmp_path):
    model = WeakNet()
    alive_after_step = []

    class Probe(L.Callback):
        def on_train_batch_end(self, *args):
            gc.collect()
            alive_after_step.append(sum(r() is not None for r in model.refs[:-1]))

    cbs = all_callbacks(1)
    trainer(tmp_path, [*cbs, Probe()], max_steps=4).fit(model, loader())
    assert len(model.refs) == 4 and alive_after_step == [0, 0, 0, 0]
    assert len(cbs[0].history["netdiag/act_std/act"]) == 4


def test_validation_and_sanity_check_never_count(tmp_path):
    model = TinyNet()
    sat = SaturationMonitor(every_n_steps=1)
    t = trainer(tmp_path, [sat], max_steps=4, val_check_interval=2, num_sanity_val_steps=2)
    t.fit(model, loader(), loader())
    scalars, _, _ = read_tensorboard(t.logger.log_dir)
    assert "val_loss" in scalars  # validation did run, on inputs x100 that saturate every Tanh
    for step in range(4):
        assert scalars["netdiag/act_saturated_pct/net.4"][step] == pytest.approx(
            model.ref[step]["netdiag/act_saturated_pct/net.4"]
        )
        assert scalars["netdiag/act_saturated_pct/net.4"][step] < 90


def test_one_host_transfer_per_callback_per_logging_step_and_no_work_otherwise(tmp_path, monkeypatch):
    # The path a GPU takes: on CPU a record reads its sums on the host once to skip the clean-up passes
    # (free there; stats.host_reads_free), which would count here.
    monkeypatch.setattr(stats, "host_reads_free", lambda x: False)
    calls: list[tuple[int, str]] = []
    records: list[int] = []
    state = {"on": False, "step": -1}

    def spy(method):
        original = getattr(torch.Tensor, method)

        def wrapper(self, *a, **k):
            caller = inspect.currentframe().f_back.f_code.co_filename
            if state["on"] and caller.startswith(PACKAGE_DIR):
                calls.append((state["step"], method))
            return original(self, *a, **k)

        return wrapper

    for method in ("tolist", "item", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, method, spy(method))

    def counting(real):
        def record(*a, **k):
            records.append(state["step"])
            return real(*a, **k)

        return record

    for name in ("tensor_record", "tensor_records"):  # a record alone, and records taken together
        monkeypatch.setattr(stats, name, counting(getattr(stats, name)))

    class Step(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            state["on"], state["step"] = True, trainer.global_step

    cbs = all_callbacks(3)
    # Step first so that it labels the batch before the others hook in.
    trainer(tmp_path, [Step(), *cbs], max_steps=7, limit_val_batches=0).fit(TinyNet(), loader())
    assert sorted(calls) == [(s, "tolist") for s in (0, 3, 6) for _ in range(3)]
    assert set(records) == {0, 3, 6}  # no statistics at all on the other steps


class CrashInForward(L.LightningModule):
    """A functional activation, then a crash inside a submodule's forward, on a logging step."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.out = nn.Linear(6, 8), nn.Linear(8, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = torch.relu(self.lin(x))
        if self.trainer.global_step == 1:
            self.out.register_forward_hook(lambda *a: 1 / 0)
        return nn.functional.cross_entropy(self.out(h), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_crash_mid_forward_leaves_no_function_mode_and_no_global_hook(tmp_path):
    from torch.nn.modules import module as module_globals
    from torch.overrides import _get_current_function_mode_stack

    sat = SaturationMonitor(every_n_steps=1)
    with pytest.raises(ZeroDivisionError):
        trainer(tmp_path, [sat], max_steps=3, logger=False).fit(CrashInForward(), loader())
    assert "netdiag/act_std/relu" in sat.history  # step 0 watched the functional call
    assert _get_current_function_mode_stack() == []
    assert not module_globals._global_forward_hooks and not module_globals._global_forward_pre_hooks
    torch.relu(torch.ones(2))  # and torch works as before


class ReluAttentionNet(L.LightningModule):
    """A functional activation and an attention module: something for both function modes to see at every step."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.out = nn.Linear(6, 8), nn.Linear(8, 4)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = torch.relu(self.lin(x))[:, None]
        return nn.functional.cross_entropy(self.out(self.attn(h, h, h)[0][:, 0]), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("model, later", [(TinyNet, []), (ReluAttentionNet, ["_AttentionCapture", "_CallCapture"])])
def test_function_modes_stay_on_after_the_first_measured_step_only_where_they_found_calls(tmp_path, model, later):
    """The captures pass each torch call of a measured forward through a Python handler: at the first measured step
    always; later only where that step found a call to watch (a functional activation, an attention). A model of
    activation modules and no attention (TinyNet: its numbers at every step are checked in test_both_packages) runs
    its later measured forwards with no function mode on."""
    from torch.overrides import _get_current_function_mode_stack

    from lightning_netdiag import LogitMonitor

    modes: dict[int, list[str]] = {}

    class Modes(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            def seen(*args) -> None:
                names = sorted(type(m).__name__ for m in _get_current_function_mode_stack())
                modes.setdefault(trainer.global_step, names)

            next(m for m in pl_module.modules() if isinstance(m, nn.Linear)).register_forward_hook(seen)

    cbs = [SaturationMonitor(every_n_steps=2), LogitMonitor(every_n_steps=2), Modes()]
    trainer(tmp_path, cbs, max_steps=5, limit_val_batches=0, logger=False).fit(model(), loader())
    assert modes == {0: ["_AttentionCapture", "_CallCapture"], 1: [], 2: later, 3: [], 4: later}
    if later:
        assert "netdiag/act_std/relu" in cbs[0].history and len(cbs[0].history["netdiag/act_std/relu"]) == 3


def test_idle_steps_run_only_flag_checks(tmp_path):
    """What runs of ours on a step that is not measured: counted, function by function, and no torch call."""
    import collections
    import sys

    from torch.overrides import TorchFunctionMode

    state = {"step": 0}  # setup (attaching, probing) is not a step
    functions: collections.Counter = collections.Counter()
    torch_calls: list[str] = []

    def idle() -> bool:
        return state["step"] % 3 != 0

    def profile(frame, event, arg):
        if event == "call" and idle() and frame.f_code.co_filename.startswith(PACKAGE_DIR):
            functions[frame.f_code.co_name] += 1

    class TorchSpy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            caller = inspect.currentframe().f_back
            if idle() and caller is not None and caller.f_code.co_filename.startswith(PACKAGE_DIR):
                torch_calls.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    class Step(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            state["step"] = trainer.global_step

    cbs = all_callbacks(3)
    t = trainer(tmp_path, [Step(), *cbs], max_steps=7, limit_val_batches=0, logger=False)
    sys.setprofile(profile)
    try:
        with TorchSpy():
            t.fit(TinyNet(), loader())
    finally:
        sys.setprofile(None)
    idle_steps = 4  # steps 1, 2, 4, 5
    assert torch_calls == [], collections.Counter(torch_calls)
    per_step = {name: n / idle_steps for name, n in functions.items()}
    # One callback's step hooks (the first: Lightning dispatches to it alone) call each callback's part of the one
    # adapter, each passing on only the moments its meter acts at; no module hook (registered on measured steps only).
    assert per_step == (EXPECTED := {
        "on_train_batch_start": 1, "_batch_starts": 3, "logging_step": 3, "step_starts": 3, "forward_starts": 1,
        # SaturationMonitor holds the step's loss (detached, past the function modes; no kernel) for its median
        "loss_scale": 1, "scaler_scale": 1, "add_loss": 1, "own_work": 1, "_close_step": 1,
        # the meter's backward_starts, backward_ends and pause each pass the phase on to its hooks'
        "on_before_backward": 1, "unscaled_loss": 1, "needs_loss": 1, "backward_starts": 1, "backward": 1,
        "on_after_backward": 1, "backward_ends": 1, "backward_done": 1,
        "on_before_optimizer_step": 1, "before_step": 3,  # D1-D2's flush, D3's measure, D4's copy
        "on_train_batch_end": 1, "_batch_ends": 3, "after_step": 1, "pause": 1, "stop": 1,
        "state_key": 5,  # Lightning reads it to name each callback hook it calls: 5 hooks x 1 callback
    }), sorted(set(per_step.items()) ^ set(EXPECTED.items()))  # fmt: skip


def test_our_statistics_run_past_the_function_modes(tmp_path):
    """On a measured step, every torch call of our statistics bypasses the function modes that are on (ours watch
    the model's calls; through a Python handler each of our ops costs several times its launch on a GPU): a mode
    of the user's sees, from our package, only the model's own calls that our handlers pass on and the few buffers
    a step is armed with."""
    import collections

    from torch.overrides import TorchFunctionMode

    from lightning_netdiag import LogitMonitor, OptimizerState

    state = {"step": -1}  # setup (attaching, probing) is not a measured step
    seen: collections.Counter = collections.Counter()

    class TorchSpy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            caller = inspect.currentframe().f_back
            if state["step"] % 3 == 0 and caller is not None and caller.f_code.co_filename.startswith(PACKAGE_DIR):
                seen[f"{Path(caller.f_code.co_filename).name}:{caller.f_code.co_name}"] += 1
            return func(*args, **(kwargs or {}))

    class Step(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            state["step"] = trainer.global_step

    cbs = [*all_callbacks(3), LogitMonitor(every_n_steps=3), OptimizerState(every_n_steps=3)]
    t = trainer(tmp_path, [Step(), *cbs], max_steps=7, limit_val_batches=0, logger=False)
    with TorchSpy():
        t.fit(TinyNet(), loader())
    passed_on = {"capture.py:__torch_function__", "capture.py:_function_call"}  # the model's calls
    armed = {"capture.py:allocate", "capture.py:reset", "capture.py:prepare", "stats.py:to"}  # a few per layer
    assert seen.keys() & passed_on and set(seen) <= passed_on | armed, seen


def test_lightning_dispatches_a_steps_hooks_to_one_of_our_callbacks(tmp_path):
    """Lightning's dispatch costs about 2 µs a hook and callback: the first of each run of our meter callbacks calls
    the step hooks of the run (each hook still runs between the same other callbacks), the loss unscaled once for
    it; the others', and the batch hooks none of ours uses, are not dispatched. A subclass with a step hook of its
    own keeps its dispatch. Everything is put back after fit; the numbers are those of callbacks each alone (under
    a GradScaler and accumulation, where the loss handed over is rescaled)."""
    from lightning.pytorch.plugins import MixedPrecision

    from lightning_netdiag import DiagnosticPlots, FlightRecorder, GradDataRatio, HealthReport, UpdateRatio
    from lightning_netdiag.callbacks._common import STEP_HOOKS

    seen: list[int] = []

    class Mine(GradDataRatio):
        def on_train_batch_start(self, trainer, *args):
            seen.append(trainer.global_step)
            super().on_train_batch_start(trainer, *args)

    dispatched: dict[str, list[str]] = {}

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            for hook in (*STEP_HOOKS, "on_before_zero_grad", "on_validation_batch_end"):
                dispatched[hook] = [type(cb).__name__ for cb in trainer.callbacks if callable(getattr(cb, hook, None))]

    def fit(name: str, callbacks: list) -> None:
        torch.manual_seed(0)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        kw = {"accumulate_grad_batches": 2, "plugins": [MixedPrecision("16-mixed", "cpu", scaler)]}
        trainer(tmp_path / name, callbacks, max_steps=7, **kw).fit(TinyNet(), loader())

    makers = {
        "sat": lambda: SaturationMonitor(every_n_steps=3),
        "d3": lambda: GradDataRatio(every_n_steps=3),
        "d4": lambda: UpdateRatio(every_n_steps=3),
        "flight": FlightRecorder,
        "mine": lambda: Mine(every_n_steps=3),
    }
    meters = {name: make() for name, make in makers.items()}
    sat, d3, d4, flight, mine = meters.values()
    fit("together", [sat, d3, Spy(), d4, flight, mine, DiagnosticPlots(save_dir=str(tmp_path)), HealthReport()])
    assert dispatched["on_train_batch_start"] == ["SaturationMonitor", "Spy", "UpdateRatio", "Mine"]
    del dispatched["on_train_batch_start"]
    for names in dispatched.values():  # Spy's own no-ops are Lightning's to dispatch
        names.remove("Spy")
    band = ["SaturationMonitor", "UpdateRatio", "Mine"]
    assert dispatched["on_before_backward"] == dispatched["on_after_backward"] == band
    assert dispatched["on_train_batch_end"] == [*band, "DiagnosticPlots", "HealthReport"]
    assert dispatched["on_before_zero_grad"] == dispatched["on_validation_batch_end"] == []
    assert seen == [step for step in range(7) for _ in range(2)]  # each micro-batch
    for cb in meters.values():  # given back: a Trainer of their own would dispatch to each
        assert not set(vars(cb)) & set(STEP_HOOKS), cb
    assert sat.on_before_zero_grad is None  # no class of ours uses it

    for name, cb in meters.items():
        alone = makers[name]()
        fit(name, [alone])
        assert alone.history.keys() == cb.history.keys() and alone.history, name
        for tag, points in alone.history.items():
            assert [step for step, _ in cb.history[tag]] == [step for step, _ in points], tag
            values = [v for _, v in points]
            assert [v for _, v in cb.history[tag]] == pytest.approx(values, rel=1e-6, nan_ok=True), tag
    assert "netdiag/loss_median" in sat.history and "netdiag/flight_loss" in flight.history
