"""Every attached logger gets each step once; the TensorBoard chart layout; state through a checkpoint."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from helpers import TinyNet, all_callbacks, loader, read_csv, read_tensorboard, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.plugins.custom_scalar import layout_pb2

from lightning_netdiag import GradDataRatio, checksum, fast_tensorboard_checksums, sinks
from lightning_netdiag.sinks import CHARTS
from lightning_netdiag.tags import KIND_OF


class CountingCSVLogger(CSVLogger):
    """A real CSVLogger that also remembers each log_metrics call."""

    def __init__(self, *a, **k) -> None:
        super().__init__(*a, **k)
        self.calls: list[tuple[int, tuple[str, ...]]] = []

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((step, tuple(sorted(metrics))))
        super().log_metrics(metrics, step)


def test_several_loggers_each_get_one_call_per_callback_and_step(tmp_path):
    tb, csv = TensorBoardLogger(tmp_path, name="tb"), CountingCSVLogger(tmp_path, name="csv")
    cbs = all_callbacks(2)
    trainer(tmp_path, cbs, logger=[tb, csv], max_steps=4, limit_val_batches=0).fit(TinyNet(), loader())
    ours = [(step, keys) for step, keys in csv.calls if any(k.startswith("netdiag/") for k in keys)]
    assert [step for step, _ in ours] == [0, 0, 0, 2, 2, 2]  # one call per callback and logging step
    tb_scalars, hists, _ = read_tensorboard(tb.log_dir)
    csv_scalars = read_csv(f"{csv.log_dir}/metrics.csv")
    for tag, points in tb_scalars.items():
        if tag.startswith("netdiag/"):
            for step, value in points.items():
                assert abs(csv_scalars[tag][step] - value) <= 1e-6 * max(1.0, abs(value)), tag
    # histograms went to TensorBoard; the CSV logger got quantiles in their place, and no histogram
    assert "netdiag/act/net.2" in hists and "netdiag/act/net.2/q50" not in tb_scalars
    assert "netdiag/act/net.2/q50" in csv_scalars


def test_tensorboard_custom_scalars_layout(tmp_path):
    cbs = all_callbacks(1)
    t = trainer(tmp_path, cbs, max_steps=2, limit_val_batches=0)
    t.fit(TinyNet(), loader())
    scalars, _, acc = read_tensorboard(t.logger.log_dir)
    events = acc.Tensors("custom_scalars__config__")
    # Rewritten only when a callback logs layers that no chart covers yet: once per callback, at its first
    # step. TensorBoard shows the latest.
    assert len(events) == 3
    layout = layout_pb2.Layout.FromString(events[-1].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    attached = {"saturation", "grad_data", "update"}  # the kinds of the three callbacks: one category per chart
    assert {cat.title for cat in layout.category} == {
        f"netdiag: {title}" for title, metric in CHARTS.items() if KIND_OF[metric] in attached
    }

    def lines(title: str) -> list[str]:
        (regex,) = charts[title]
        return sorted(t for t in scalars if re.fullmatch(regex, t))

    assert lines("D1 activation saturated %") == ["netdiag/act_saturated_pct/net.2", "netdiag/act_saturated_pct/net.4"]
    assert lines("D2 activation-gradient std") == ["netdiag/act_grad_std/net.2", "netdiag/act_grad_std/net.4"]
    assert lines("D3 grad:data ratio") == [f"netdiag/grad_data_ratio/net.{i}.weight" for i in (0, 3, 5)]
    # D4's chart includes the -3 reference line
    d4 = next(k for k in charts if k.startswith("D4"))
    assert lines(d4) == [
        "netdiag/update_data_log10/_target",
        "netdiag/update_data_log10/net.0.weight",
        "netdiag/update_data_log10/net.3.weight",
        "netdiag/update_data_log10/net.5.weight",
    ]
    assert set(scalars["netdiag/update_data_log10/_target"].values()) == {-3.0}


def test_history_round_trips_through_a_checkpoint(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    first = all_callbacks(2)
    t = trainer(
        tmp_path,
        [*first, ModelCheckpoint(ckpt_dir, save_last=True)],
        max_steps=4,
        limit_val_batches=0,
        enable_checkpointing=True,
    )
    t.fit(TinyNet(), loader())
    ckpt = ckpt_dir / "last.ckpt"
    raw = torch.load(ckpt, weights_only=True)  # plain containers only
    states = {k: v for k, v in raw["callbacks"].items() if "prefix" in k}
    assert len(states) == 3

    second = all_callbacks(2)
    t2 = trainer(tmp_path, second, max_steps=8, limit_val_batches=0)
    t2.fit(TinyNet(), loader(), ckpt_path=ckpt)
    for before, after in zip(first, second, strict=True):
        for tag, points in before.history.items():
            assert after.history[tag][: len(points)] == points, tag
        assert [s for s, _ in after.history[next(iter(after.history))]] == [0, 2, 4, 6]
    hist_before = first[0].history.histograms["netdiag/act/net.2"]
    assert second[0].history.histograms["netdiag/act/net.2"][:2] == hist_before


def events(log_dir) -> list:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    (path,) = Path(log_dir).glob("events.out.tfevents.*")
    return list(EventFileLoader(str(path)).Load())


def test_tensorboard_gets_one_event_per_callback_and_step_that_every_reader_reads_back(tmp_path):
    tbparse = pytest.importorskip("tbparse")
    cbs = all_callbacks(2)
    t = trainer(tmp_path, cbs, max_steps=5, limit_val_batches=0)
    t.fit(TinyNet(), loader())
    everything = [e for e in events(t.logger.log_dir) if any(v.tag.startswith("netdiag/") for v in e.summary.value)]
    # each meter's description once, as JSON text, when it first measures (for the `netdiag` command)
    meta = [e for e in everything if e.summary.value[0].tag.startswith("netdiag/meta/")]
    kinds = {e.summary.value[0].tag: json.loads(e.summary.value[0].tensor.string_val[0])["kind"] for e in meta}
    assert [e.step for e in meta] == [0, 0, 0] and set(kinds.values()) == {"saturation", "grad_data", "update"}
    ours = [e for e in everything if e not in meta]
    # one event per callback and logging step (0, 2, 4), holding all of its scalars and histograms
    assert [e.step for e in ours] == [0, 0, 0, 2, 2, 2, 4, 4, 4]
    logged = {tag: dict(points) for cb in cbs for tag, points in cb.history.items()}
    assert sum(len(e.summary.value) for e in ours) == sum(len(p) for p in logged.values()) + 3 * 7  # + histograms

    # EventAccumulator and tbparse read every value back as its own point
    scalars, hists, _ = read_tensorboard(t.logger.log_dir)
    frame = tbparse.SummaryReader(t.logger.log_dir).scalars
    parsed = {(r.tag, r.step): r.value for r in frame.itertuples()}
    for tag, points in logged.items():
        for step, value in points.items():
            assert scalars[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-30), tag  # float32 on disk
            assert parsed[(tag, step)] == pytest.approx(value, rel=1e-6, abs=1e-30), tag
    assert {tag for tag in hists} == {tag for cb in cbs for tag in cb.history.histograms}
    assert all(sorted(steps) == [0, 2, 4] for steps in hists.values())


def test_a_tensorboard_logger_with_a_key_prefix_keeps_its_own_per_value_calls(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb", prefix="run1")
    cb = GradDataRatio(every_n_steps=1)
    trainer(tmp_path, [cb], logger=logger, max_steps=2).fit(TinyNet(), loader())
    scalars, hists, _ = read_tensorboard(logger.log_dir)
    assert scalars["run1-netdiag/grad_data_ratio/net.3.weight"][1] == pytest.approx(
        dict(cb.history["netdiag/grad_data_ratio/net.3.weight"])[1], rel=1e-6
    )
    assert "netdiag/grad/net.3.weight" in hists


@pytest.fixture
def tensorboards_checksum():
    """TensorBoard's own masked CRC32C; what netdiag chose and installed is put back after the test."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
    from tensorboard.summary.writer import record_writer

    saved = record_writer.masked_crc32c, sinks._CHECKSUMS_CHOSEN[0]
    record_writer.masked_crc32c, sinks._CHECKSUMS_CHOSEN[0] = masked_crc32c, None
    yield masked_crc32c
    record_writer.masked_crc32c, sinks._CHECKSUMS_CHOSEN[0] = saved


def test_block_checksums_are_tensorboards_own(tensorboards_checksum):
    google_crc32c = pytest.importorskip("google_crc32c")
    g = torch.Generator().manual_seed(0)
    lengths = [*range(300), 511, 512, 513, 4096, 17_626, 65_537]
    for n in lengths:
        data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).numpy().tobytes()
        assert checksum.crc32c(data) == google_crc32c.value(data), n
    for n in (0, 8, 63, 64, 256, 1000):  # the masked form, against TensorBoard's pure-Python code itself
        data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).numpy().tobytes()
        assert checksum.masked_crc32c(data) == tensorboards_checksum(data), n


@pytest.mark.parametrize("google", [True, False])
def test_fast_checksums_are_installed_at_the_first_write_and_tensorboard_reads_them(
    tmp_path, monkeypatch, tensorboards_checksum, google
):
    from tensorboard.summary.writer import record_writer

    if not google:  # as where google-crc32c is not installed: the block checksums
        monkeypatch.setitem(sys.modules, "google_crc32c", None)
    assert record_writer.masked_crc32c is tensorboards_checksum  # nothing is replaced on import
    data = [b"", b"a", bytes(range(256)) * 9, torch.randint(0, 256, (5000,), dtype=torch.uint8).numpy().tobytes()]
    t = trainer(tmp_path, all_callbacks(2), max_steps=3, limit_val_batches=0)
    t.fit(TinyNet(), loader())
    installed = record_writer.masked_crc32c
    assert installed is not tensorboards_checksum
    assert (installed is checksum.masked_crc32c) is not google
    assert [installed(d) for d in data] == [tensorboards_checksum(d) for d in data]
    # TensorBoard's reader checks every record's checksum with its own code
    ours = [e for e in events(t.logger.log_dir) if any(v.tag.startswith("netdiag/") for v in e.summary.value)]
    assert [e.step for e in ours] == [0] * 6 + [2, 2, 2]  # with each meter's description at step 0


def test_tensorboards_own_checksums_stay_where_the_user_chose_them(tmp_path, tensorboards_checksum):
    from tensorboard.summary.writer import record_writer

    fast_tensorboard_checksums(False)
    trainer(tmp_path, all_callbacks(2), max_steps=3, limit_val_batches=0).fit(TinyNet(), loader())
    assert record_writer.masked_crc32c is tensorboards_checksum
