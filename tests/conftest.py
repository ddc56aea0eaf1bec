"""Fixtures shared by the test modules, and ``--gpu-path``: every test with a GPU's record paths taken on the CPU.

    python -m pytest --gpu-path

A GPU's paths differ from the CPU's where a host read would wait for the device: no host read inside a record (its
values cleaned up on the device instead), a GPU's chunks and attention blocks, tensors reduced together in float64
(``stats.host_reads_free``, ``stats.launch_bound``). Under ``--gpu-path`` every test takes them, in this process
(not in the subprocesses of the multi-process tests); tests about the host's path alone are marked ``host_path`` and
skip.
"""

import contextlib

import pytest

from lightning_netdiag import stats


def pytest_addoption(parser):
    parser.addoption("--gpu-path", action="store_true", help="take a GPU's record paths on the CPU in every test")


@pytest.fixture(autouse=True)
def _gpu_path_everywhere(request):
    if request.config.getoption("--gpu-path"):
        if request.node.get_closest_marker("host_path"):
            pytest.skip("about the host's path")
        with stats.as_gpu():
            yield
    else:
        yield


@pytest.fixture(params=["host", "gpu-path"])
def path(request):
    """The CPU's records, and (``gpu-path``) those a GPU takes, on the CPU: no host read inside a record, its chunks,
    tensors reduced together (stats._grouped_records)."""
    if request.param == "host" and request.config.getoption("--gpu-path"):
        pytest.skip("about the host's path")
    with stats.as_gpu() if request.param == "gpu-path" else contextlib.nullcontext():
        yield request.param
