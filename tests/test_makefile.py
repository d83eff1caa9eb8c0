"""The Makefile never replaces a box's own torch: what `make install` would run in each mode (make -n)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Under `make test` the parent make's flags would reach the child make (and print its directory changes).
ENV = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}


def planned(*args: str) -> str:
    if shutil.which("make") is None:
        pytest.fail("make is not installed")
    r = subprocess.run(["make", "-n", "-B", "install", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, env=ENV)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_default_installs_the_cpu_wheel_in_a_venv():
    plan = planned()
    assert "-m venv  .venv" in plan or "-m venv .venv" in plan
    assert 'pip install --quiet "torch==2.13.0"' in plan and "torch-pin" not in plan


def test_empty_torch_spec_uses_and_pins_the_torch_already_there():
    assert "--system-site-packages .venv-system" in planned("TORCH_SPEC=")  # never the CPU-wheel .venv
    plan = planned("TORCH_SPEC=", "VENV=/tmp/e1min-venv")
    assert "--system-site-packages /tmp/e1min-venv" in plan
    assert 'install --quiet "torch' not in plan and "-c .torch-pin.txt -e" in plan
    assert "import torch; print('torch==' + torch.__version__)" in plan


def test_no_venv_installs_e1min_only_into_the_given_python():
    plan = planned("VENV=", "PYTHON=/opt/conda/bin/python")
    assert "-m venv" not in plan and 'install --quiet "torch' not in plan
    assert "/opt/conda/bin/python -m pip install --quiet -c .torch-pin.txt -e" in plan


def test_gpu_check_installs_nothing():
    r = subprocess.run(["make", "-n", "gpu-check"], cwd=ROOT, capture_output=True, text=True, timeout=60, env=ENV)
    assert r.returncode == 0 and r.stdout.strip() == "PYTHONPATH=. python3 tools/gpu_check.py", r.stdout
