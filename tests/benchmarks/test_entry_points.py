"""Every benchmark runs as a module of the `benchmarks` package from the repository root, with
nothing added to its module path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULES = [
    "serving",
    "batching_ab",
    "soak",
    "fleet_soak",
    "overload",
    "profile_server",
    "grpc_load",
    "model_control",
]


@pytest.mark.parametrize("module", MODULES)
def test_runs_with_python_m(module: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", "--help"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout and f"benchmarks.{module}" in out.stdout.replace("/", ".")
