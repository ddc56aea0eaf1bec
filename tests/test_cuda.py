"""CUDA checks: 16-mixed with a GradScaler on the GPU, and no host synchronisation off logging steps.

CI has no GPU: these skip there. Run them on a CUDA machine with ``python -m pytest tests/test_cuda.py``.
"""

import warnings

import pytest
import torch
from helpers import TinyNet, assert_matches_reference, loader, read_tensorboard, trainer
from lightning import Callback

from lightning_netdiag import GradDataRatio, SaturationMonitor, UpdateRatio

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

EVERY = 4


def cuda_trainer(tmp_path, callbacks, **kw):
    return trainer(tmp_path, callbacks, accelerator="cuda", devices=1, limit_val_batches=0, **kw)


def test_cuda_16_mixed_gradients_are_unscaled(tmp_path):
    model = TinyNet()
    cbs = [SaturationMonitor(every_n_steps=1), GradDataRatio(every_n_steps=1), UpdateRatio(every_n_steps=1)]
    t = cuda_trainer(tmp_path, cbs, max_steps=3, precision="16-mixed")
    t.fit(model, loader())
    assert t.precision_plugin.scaler.get_scale() >= 2.0**15  # the scale was really in play
    scalars, _, _ = read_tensorboard(t.logger.log_dir)
    assert assert_matches_reference(scalars, model.ref, rel=1e-3, abs_=1e-6) > 40


class Quiet(TinyNet):
    """TinyNet without its reference bookkeeping, which reads values to the host on every step."""

    def forward(self, x):
        return self.net(x)

    def on_before_optimizer_step(self, optimizer):
        pass

    def on_train_batch_end(self, outputs, batch, batch_idx):
        pass


class SyncGuard(Callback):
    """CUDA's sync debug mode from batch start to batch end: "error" on non-logging steps, so that any
    synchronisation there raises; "warn" on logging steps, where the warnings are counted."""

    def __init__(self) -> None:
        self.idle_steps = 0
        self.logging_syncs: list[int] = []
        self._catch = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        logging = trainer.global_step % EVERY == 0
        if logging:
            self._catch = warnings.catch_warnings(record=True)
            self._seen = self._catch.__enter__()
            warnings.simplefilter("always")
        else:
            self.idle_steps += 1
        torch.cuda.set_sync_debug_mode("warn" if logging else "error")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.cuda.set_sync_debug_mode(0)
        if self._catch is not None:
            self.logging_syncs.append(sum("synchroniz" in str(w.message) for w in self._seen))
            self._catch.__exit__(None, None, None)
            self._catch = None


def test_no_host_synchronisation_off_logging_steps(tmp_path):
    # Listed first: its batch hooks wrap the netdiag callbacks' (callbacks run in list order).
    guard = SyncGuard()
    cbs = [SaturationMonitor(every_n_steps=EVERY), GradDataRatio(every_n_steps=EVERY), UpdateRatio(every_n_steps=EVERY)]
    t = cuda_trainer(tmp_path, [guard, *cbs], logger=False, max_steps=12)
    t.fit(Quiet(), loader())  # the batch reaches the GPU before batch start; "error" raises on any sync after
    assert guard.idle_steps == 9 and len(guard.logging_syncs) == 3
    # One transfer per callback per logging step: the records of every layer in one tolist().
    assert all(1 <= n <= 3 for n in guard.logging_syncs), guard.logging_syncs


class GuardEnd(Callback):
    """Ends a SyncGuard's window after every other callback's batch-end hook (listed last)."""

    def __init__(self, guard: SyncGuard) -> None:
        self.guard = guard

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        SyncGuard.on_train_batch_end(self.guard, trainer, pl_module, outputs, batch, batch_idx)


class OpenEnded(SyncGuard):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pass  # GuardEnd closes the window


def test_asked_to_the_recorder_replays_a_nan_made_on_the_gpu_and_names_its_module(tmp_path):
    # replay_nonfinite=True: one synchronisation a step, and the step's forward replayed before the optimizer steps
    from lightning_netdiag import FlightRecorder

    model, on = Quiet(), [False]
    model.net[3].register_forward_hook(lambda m, i, out: out / torch.zeros_like(out) if on[0] else None)

    class Switch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            on[0] = trainer.global_step >= 10

    recorder = FlightRecorder(replay_nonfinite=True)
    cuda_trainer(tmp_path, [Switch(), recorder], logger=False, max_steps=12).fit(model, loader())
    first = recorder.events[0]
    assert first["step"] == 10 and first["made"] == {"in": "forward", "module": "net.3"}, first


def test_the_flight_recorder_synchronises_only_at_an_event(tmp_path):
    # Its verdict of each step travels to pinned memory without waiting and is read one step later: no step
    # without an event, measured or not, reads anything back from the GPU (its ring stays there).
    from lightning_netdiag import FlightRecorder

    guard = OpenEnded()
    recorder = FlightRecorder()
    t = cuda_trainer(tmp_path, [guard, recorder, GuardEnd(guard)], logger=False, max_steps=80)
    t.fit(Quiet(), loader())
    assert guard.idle_steps == 60 and recorder.events == []
    assert recorder.record.steps == list(range(80))  # written out at the end: one copy, outside the guard
