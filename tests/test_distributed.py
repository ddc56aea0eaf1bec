"""Two CPU ranks (gloo) log the same D1-D4 as one process on the concatenated global batch.

DDP and ddp_spawn (replicated parameters) and FSDP2 (ModelParallelStrategy with `fully_shard`: DTensor
shards of unequal size) in fp32, 16-mixed with a GradScaler and bf16-mixed; HSDP (DTensors replicated over
the ranks: each rank's record counts half) and FSDP2 with activation checkpointing (recomputed Tanh
forwards: neither recorded again nor counted as a second call) in fp32. A Tanh and a functional sigmoid that
only rank 0 runs check that the ranks' records line up; faults on one rank must end the job, not hang it.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import read_csv

from lightning_netdiag.tags import record_file

SCRIPT = Path(__file__).with_name("distributed_run.py")
PRECISIONS = ["32-true", "16-mixed", "bf16-mixed"]


def launch(
    out: Path, strategy: str, devices: int, precision: str = "32-true", fault: str = "none", optimizer: str = "sgd"
):
    args = [sys.executable, str(SCRIPT), str(out), strategy, str(devices), precision, fault, optimizer]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


def run(out: Path, strategy: str, devices: int, precision: str, optimizer: str = "sgd") -> dict[str, dict[int, float]]:
    done = launch(out, strategy, devices, precision, optimizer=optimizer)
    assert done.returncode == 0, done.stderr[-3000:]
    return read_csv(out / "csv" / "version_0" / "metrics.csv")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    cache: dict[str, dict] = {}

    def get(precision: str) -> dict[str, dict[int, float]]:
        if precision not in cache:
            cache[precision] = run(tmp_path_factory.mktemp("one"), "auto", 1, precision)
        return cache[precision]

    return get


def tolerance(tag: str, step: int, reference: dict[str, dict[int, float]], precision: str) -> dict[str, float]:
    # In half precision a batch of 16 rounds differently from two of 8.
    rel, spread = (1e-5, 1e-4) if precision == "32-true" else (1e-2, 0.05)
    _, metric, *rest = tag.split("/")
    if metric.endswith("_mean") or len(rest) == 2:  # a mean, or a quantile of a histogram
        # Means and medians can sit near 0 (a softmax layer's bias gradient sums to 0), where only an
        # absolute tolerance makes sense: a small fraction of the spread.
        std = reference[f"netdiag/{metric.removesuffix('_mean')}_std/{rest[0]}"][step]
        return {"rel_tol": rel, "abs_tol": spread * std}
    return {"rel_tol": rel, "abs_tol": 1e-9}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "precision"),
    [("ddp", p) for p in PRECISIONS]
    + [("ddp_spawn", "32-true"), ("hsdp", "32-true"), ("fsdp2_ac", "32-true")]
    + [("fsdp2", p) for p in PRECISIONS],
)
def test_two_ranks_equal_one_process_on_the_global_batch(tmp_path, one_process, strategy, precision):
    reference = one_process(precision)
    two = run(tmp_path, strategy, 2, precision)
    assert set(two) == set(reference)
    tags = [t for t in reference if t.startswith("netdiag/")]
    for metric in (
        "act_saturated_pct/net.1",
        "act_dead_pct/net.3",
        "act_std/side",  # run by rank 0 only
        "act_grad_std/side",
        "act_saturated_pct/sigmoid",  # a functional call that rank 1 never makes
        "act_grad_std/sigmoid",
        "grad_data_ratio/net.2.weight",  # 5 rows: FSDP2 shards of 3 and 2
        "grad/net.2.weight/q50",
        "update_data_log10/net.4.bias",
        "init_loss",  # each rank's loss on its half of the batch, averaged over the ranks
        "loss_median",  # so are each step's, before their median
    ):
        assert f"netdiag/{metric}" in tags, metric
    for tag in tags:  # the batch's fingerprint too: additive, the two halves' add up to the global batch's
        at_init = tag.split("/")[1].startswith("init_")  # the output and loss at initialisation: step 0 only
        assert sorted(two[tag]) == sorted(reference[tag]) == ([0] if at_init else [0, 1, 2]), tag
        for step, value in reference[tag].items():
            # D2 included: each rank's output gradient is world_size times its share of the global one
            assert math.isclose(two[tag][step], value, **tolerance(tag, step, reference, precision)), (
                tag,
                step,
                two[tag][step],
                value,
            )


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp2", "hsdp"])
def test_adams_state_over_two_ranks_equals_one_process(tmp_path, strategy):
    """Adam's moments sharded like the weights (FSDP2: shards of 3 and 2 rows; HSDP: a full copy on each rank): the
    ranks' sums of squares and eps counts add up to the whole weight's, and the count of its values is the whole
    weight's (known on the host, not summed from the ranks)."""
    reference = run(tmp_path / "one", "auto", 1, "32-true", optimizer="adamw")
    two = run(tmp_path / "two", strategy, 2, "32-true", optimizer="adamw")
    tags = [t for t in reference if t.startswith("netdiag/adam_")]
    assert "netdiag/adam_step_rms/net.2.weight" in tags and "netdiag/adam_eps_pct/net.4.weight" in tags
    for tag in tags:
        assert sorted(two[tag]) == sorted(reference[tag]) == [0, 1, 2], tag
        for step, value in reference[tag].items():
            assert math.isclose(two[tag][step], value, rel_tol=1e-4, abs_tol=1e-9), (tag, step, two[tag][step], value)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_an_exception_on_one_rank_ends_the_job(tmp_path, strategy):
    done = launch(tmp_path, strategy, 2, fault="raise")  # the timeout would raise if it hung
    assert done.returncode != 0
    assert "rank 1 fails at step 1" in done.stderr


@pytest.mark.slow
def test_a_fatal_verdict_from_one_rank_stops_every_rank(tmp_path):
    # Rank 1's infinite loss reaches every rank's gradients through the all-reduce; the reduced records
    # are equal on every rank, so every HealthReport stops at the same step and no rank is left waiting.
    done = launch(tmp_path, "ddp", 2, fault="nan")
    assert done.returncode == 0, done.stderr[-3000:]
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["2", "2"]


@pytest.mark.slow
def test_the_plain_loop_on_two_ranks_equals_lightning_on_the_global_batch(tmp_path, one_process):
    import json

    reference = one_process("32-true")
    done = subprocess.run(
        [sys.executable, str(SCRIPT.with_name("distributed_loop.py")), str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    loop = {
        tag: {int(s): v for s, v in points.items()}
        for tag, points in json.loads((tmp_path / "loop.json").read_text()).items()
    }
    tags = {t for t in reference if t.startswith("netdiag/")}
    assert set(loop) == tags
    assert {"netdiag/act_std/side", "netdiag/act_saturated_pct/sigmoid", "netdiag/init_loss"} <= tags
    for tag in tags - {"netdiag/flight_batch"}:  # a fingerprint of what each front end sees (labels under Lightning)
        assert set(loop[tag]) == set(reference[tag]), tag
        for step, value in reference[tag].items():
            assert math.isclose(loop[tag][step], value, **tolerance(tag, step, reference, "32-true")), (tag, step)


TORCHRUN = """
import sys, torch, torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from lightning_netdiag import NetDiag

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = DistributedDataParallel(nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 4)))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
g = torch.Generator().manual_seed(rank)
with NetDiag(model, optimizer, writer=SummaryWriter(sys.argv[1]) if rank == 0 else None, every_n_steps=10) as diag:
    for step in range(100):
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 4, (16,), generator=g)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        diag.loss(loss)
        optimizer.step()
        if rank == 1 and step == 60:
            raise RuntimeError("rank 1 fails at step 60")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_a_rank_that_fails_under_torchrun_leaves_rank_0s_window(tmp_path):
    # When rank 1 dies, rank 0 gets gloo's error (its peer is gone) and then torchrun's SIGTERM, perhaps while it
    # writes its window: the window is on disk to the step every rank completed, written once, with one event.
    script, logs = tmp_path / "run.py", tmp_path / "logs"
    script.write_text(TORCHRUN)
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(logs)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "rank 1 fails at step 60" in done.stderr
    saved = json.loads((logs / record_file("netdiag", "flight")).read_text())
    assert saved["steps"] == list(range(61)) and [e["step"] for e in saved["events"]] == [60]
    out = subprocess.run([sys.executable, "-m", "lightning_netdiag.cli", "report", str(logs)], capture_output=True,
                         text=True)  # fmt: skip
    assert out.returncode == 0 and "after step 60" in out.stdout, out.stderr
