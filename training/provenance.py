"""When and where a result was measured: every results file carries it (`"run"`), so a figure
can be read with the machine that produced it (this project's figures are CPU figures)."""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime


def machine() -> str:
    """'x86_64, 2 CPU cores, no GPU': the architecture, the cores this process may use, and
    whether CUDA is visible (torch is asked only when it is already imported)."""
    import sys

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch = sys.modules.get("torch")
    gpu = torch is not None and torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if gpu else "no GPU"  # type: ignore[union-attr]
    return f"{platform.machine()}, {cores} CPU cores, {name}"


def run_record() -> dict[str, str]:
    """{"date": the UTC time now, "machine": `machine()`} for a results file."""
    return {"date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "machine": machine()}
