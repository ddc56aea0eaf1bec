"""Two CPU ranks (gloo) log the same D1-D4 as one process on the concatenated global batch."""

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import read_csv

SCRIPT = Path(__file__).with_name("ddp_run.py")


def run(out: Path, strategy: str, devices: int) -> dict[str, dict[int, float]]:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), strategy, str(devices)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return read_csv(out / "csv" / "version_0" / "metrics.csv")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return run(tmp_path_factory.mktemp("one"), "auto", 1)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_two_ranks_equal_one_process_on_the_global_batch(tmp_path, one_process, strategy):
    two = run(tmp_path, strategy, 2)
    assert set(two) == set(one_process)
    tags = [t for t in one_process if t.startswith("netdiag/")]
    for metric in (
        "act_saturated_pct",
        "act_dead_pct",
        "act_std",
        "act_grad_std",
        "grad_data_ratio",
        "update_data_log10",
    ):
        assert any(f"/{metric}/" in t for t in tags), metric
    for tag in tags:
        assert sorted(two[tag]) == sorted(one_process[tag]) == [0, 1, 2], tag
        for step, value in one_process[tag].items():
            # D2 included: each rank's output gradient is world_size times its share of the global one
            assert two[tag][step] == pytest.approx(value, rel=1e-5, abs=1e-9), (tag, step)
