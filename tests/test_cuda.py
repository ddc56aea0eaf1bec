"""CUDA checks: 16-mixed with a GradScaler on the GPU, attention and output logits and Adam's state in bf16-mixed
against a direct computation, no host synchronisation off logging steps, and the flight recorder's.

CI has no GPU: these skip there. Run them on a CUDA machine with ``python -m pytest tests/test_cuda.py``.
"""

import copy
import math
import warnings

import lightning as L
import pytest
import torch
from helpers import TinyNet, assert_matches_reference, loader, read_tensorboard, trainer
from lightning import Callback
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

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


@pytest.mark.parametrize("deterministic", [False, True], ids=["histc", "index_add"])
def test_records_on_the_gpu_equal_the_cpu_records(deterministic, monkeypatch):
    """The sync-free records (histc's counts; index_add_'s where deterministic algorithms are asked for) of a
    chunked tensor, a plain one and many small ones, with non-finite values, equal the CPU's exactly in counts (the
    large one's histogram: the same sample, scaled alike), and in moments at least to float32's precision (float64
    sums on both, added in another order)."""
    from lightning_netdiag import stats

    monkeypatch.setattr(stats, "_GPU_CHUNK", 1 << 16)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(300_000, generator=g) * 1e-3, torch.randn(5000, generator=g), torch.randn(40, generator=g)]
    xs[0][7], xs[1][3], xs[2][0] = math.nan, math.inf, -math.inf
    torch.use_deterministic_algorithms(deterministic)
    try:
        for bins in (stats.log2_bins(), stats.linear_bins(-1.0, 1.0)):
            cpu = [stats.tensor_record(x, bins) for x in xs] + stats.tensor_records(xs, bins)
            on_gpu = [x.cuda() for x in xs]
            gpu_bins = bins.to(torch.device("cuda"))
            gpu = [stats.tensor_record(x, gpu_bins) for x in on_gpu] + stats.tensor_records(on_gpu, gpu_bins)
            for i, (a, b) in enumerate(zip(cpu, gpu, strict=True)):
                b = b.cpu()
                assert torch.equal(a[stats.NONFINITE :], b[stats.NONFINITE :])  # the counts
                if i >= len(xs):
                    assert torch.allclose(a, b, rtol=1e-12, atol=0)
                else:
                    ma, mb = stats.Moments.of(a.tolist()), stats.Moments.of(b.tolist())
                    assert ma.mean == pytest.approx(mb.mean, abs=1e-6 * mb.std)
                    assert ma.std == pytest.approx(mb.std, rel=1e-6)
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("case", ["huge", "tiny", "mean 1e4 spreads", "bf16 mean 1e2 spreads"])
def test_gpu_records_of_huge_tiny_and_mean_dominated_values_match_float64(case):
    """A tensor recorded alone on a GPU (an activation, its gradient) is summed in float64 (stats._device_moments):
    float32 sums gave an inf std for values near 1e20, 0 for values near 1e-25, and lost a spread that the mean
    dwarfs (a sigmoid's output near 1: 17 % off)."""
    from lightning_netdiag import stats

    g = torch.Generator().manual_seed(1)
    base = torch.randn(300_000, generator=g)
    x = {
        "huge": base * 1e20,
        "tiny": base * 1e-25,
        "mean 1e4 spreads": 1 + 1e-4 * base,
        "bf16 mean 1e2 spreads": (1 + 1e-2 * base).bfloat16(),
    }[case]
    m = stats.Moments.of(stats.tensor_record(x.cuda(), stats.log2_bins().to(torch.device("cuda"))).tolist())
    expected = x.double()
    assert m.count == x.numel() and m.nonfinite == 0
    assert m.mean == pytest.approx(expected.mean().item(), rel=1e-9)
    assert m.std == pytest.approx(expected.std().item(), rel=1e-6)


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
    print("synchronisations per logging step, three callbacks:", guard.logging_syncs)
    assert all(1 <= n <= 3 for n in guard.logging_syncs), guard.logging_syncs


class FusedLM(L.LightningModule):
    """test_logits' HandLM with SDPA attention (flash or memory-efficient on the GPU), AdamW."""

    def __init__(self) -> None:
        super().__init__()
        from test_logits import HandLM

        self.lm = HandLM(fused=True)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.lm(batch[0]).flatten(0, 1), batch[0].flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-2, eps=1e-6)


def tokens() -> DataLoader:
    return DataLoader(TensorDataset(torch.randint(0, 11, (96, 32), generator=torch.Generator().manual_seed(0))), 16)


def test_logits_and_adam_state_in_bf16_match_a_direct_computation(tmp_path):
    from lightning_netdiag import LogitMonitor, OptimizerState

    model = FusedLM()
    start = copy.deepcopy(model.lm).double()  # the weights the one measured step's forward used
    t = cuda_trainer(tmp_path, [LogitMonitor(), OptimizerState()], max_steps=1, precision="bf16-mixed")
    t.fit(model, tokens())
    logged, _, _ = read_tensorboard(t.logger.log_dir)
    idx = next(iter(tokens()))[0]
    x = start.wte(idx)
    for i, block in enumerate(start.blocks):
        q, k, _ = block.qk(x)
        s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        masked = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), -math.inf)
        assert logged[f"netdiag/attn_logit_max/lm.blocks.{i}"][0] == pytest.approx(masked.max().item(), rel=2e-2)
        # the softmax's entropy over log(keys): causal row r sees r + 1 keys; row 0 (one key) left out
        h = torch.special.entr(torch.softmax(masked, -1)).sum(-1)[..., 1:]
        want = (h / torch.arange(2, h.shape[-1] + 2, dtype=h.dtype).log()).mean().item()
        assert logged[f"netdiag/attn_entropy/lm.blocks.{i}"][0] == pytest.approx(want, rel=2e-2)  # bf16 q, k
        x = x + block(x)
    z = start.head(x)
    assert logged["netdiag/output_logz/lm.head"][0] == pytest.approx(torch.logsumexp(z, -1).mean().item(), rel=2e-2)
    assert logged["netdiag/output_logit_max/lm.head"][0] == pytest.approx(z.max().item(), rel=2e-2)
    optimizer = t.optimizers[0]
    for name, p in model.named_parameters():
        tag = f"netdiag/adam_step_rms/{name}"
        if p.dim() < 2:
            assert tag not in logged
            continue
        s = optimizer.state[p]
        m = s["exp_avg"].double() / (1 - 0.9)
        v = s["exp_avg_sq"].double() / (1 - 0.999)
        u = m / (v.sqrt() + 1e-6)
        assert logged[tag][0] == pytest.approx(u.pow(2).mean().sqrt().item(), rel=1e-5)
        want = 100 * (v.sqrt() < 1e-6).double().mean().item()
        assert logged[f"netdiag/adam_eps_pct/{name}"][0] == pytest.approx(want, abs=100 / p.numel())  # one element


def test_logits_and_adam_state_synchronise_only_on_logging_steps(tmp_path):
    from lightning_netdiag import LogitMonitor, OptimizerState

    guard = SyncGuard()
    cbs = [LogitMonitor(every_n_steps=EVERY), OptimizerState(every_n_steps=EVERY)]
    t = cuda_trainer(tmp_path, [guard, *cbs], logger=False, max_steps=12, precision="bf16-mixed")
    t.fit(FusedLM(), tokens())
    assert guard.idle_steps == 9 and len(guard.logging_syncs) == 3
    print("synchronisations per logging step, LogitMonitor and OptimizerState:", guard.logging_syncs)
    assert all(1 <= n <= 2 for n in guard.logging_syncs), guard.logging_syncs


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
    # replay=True: one synchronisation a step, and the step's forward replayed before the optimizer steps
    from lightning_netdiag import FlightRecorder

    model, on = Quiet(), [False]
    model.net[3].register_forward_hook(lambda m, i, out: out / torch.zeros_like(out) if on[0] else None)

    class Switch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            on[0] = trainer.global_step >= 10

    recorder = FlightRecorder(replay=True)
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
