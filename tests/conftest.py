"""Fixtures shared by the test modules, and ``--gpu-path``: every test with a GPU's record paths taken on the CPU.

    python -m pytest --gpu-path

A GPU's paths differ from the CPU's where a host read would wait for the device: no host read inside a record (its
values cleaned up on the device instead), a GPU's chunks and attention blocks, tensors reduced together in float64
(``stats.host_reads_free``, ``stats.launch_bound``). Under ``--gpu-path`` every test takes them, in this process
(not in the subprocesses of the multi-process tests); tests about the host's path alone are marked ``host_path`` and
skip.
"""

import pytest

from lightning_netdiag import attention, stats


def pytest_addoption(parser):
    parser.addoption("--gpu-path", action="store_true", help="take a GPU's record paths on the CPU in every test")


def take_gpu_path(monkeypatch) -> None:
    """netdiag's GPU paths on the CPU (as ``benchmarks/logging_step_ops.py --as-gpu`` counts them)."""
    monkeypatch.setattr(stats, "host_reads_free", lambda x: False)
    monkeypatch.setattr(stats, "launch_bound", lambda device: True)
    monkeypatch.setattr(attention, "launch_bound", lambda device: True)


@pytest.fixture(autouse=True)
def _gpu_path_everywhere(request, monkeypatch):
    if request.config.getoption("--gpu-path"):
        if request.node.get_closest_marker("host_path"):
            pytest.skip("about the host's path")
        take_gpu_path(monkeypatch)


@pytest.fixture(params=["host", "gpu-path"])
def path(request, monkeypatch):
    """The CPU's records, and (``gpu-path``) those a GPU takes, on the CPU: no host read inside a record, its chunks,
    tensors reduced together (stats._grouped_records)."""
    if request.param == "gpu-path":
        take_gpu_path(monkeypatch)
    elif request.config.getoption("--gpu-path"):
        pytest.skip("about the host's path")
    return request.param
