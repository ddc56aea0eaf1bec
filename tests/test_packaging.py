"""What users of a package expect: a wheel that carries py.typed and one version, and mypy passing."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import lightning_netdiag

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_builds_with_py_typed_and_the_package_version(tmp_path):
    pytest.importorskip("setuptools")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("lightning_netdiag-*.whl")
    assert wheel.name.startswith(f"lightning_netdiag-{lightning_netdiag.__version__}-")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lightning_netdiag/py.typed" in names and "lightning_netdiag/callbacks/saturation.py" in names
    assert not any(n.startswith(("tests/", "examples/", "benchmarks/")) for n in names)
    shutil.rmtree(ROOT / "build", ignore_errors=True)


@pytest.mark.slow
def test_mypy_passes_on_the_package():
    pytest.importorskip("mypy")
    done = subprocess.run(
        [sys.executable, "-m", "mypy", str(ROOT / "lightning_netdiag")], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stdout + done.stderr
