"""Process metrics (CPU, memory, file descriptors) of every worker of a multi-process server.

prometheus_client's multiprocess mode adds up the workers' counters and gauges from files but
keeps no process metrics: its `ProcessCollector` reads /proc of the process that answers the
scrape, which would change from one scrape to the next as the kernel spreads connections. This
collector reads each live worker's /proc instead and labels its series with the worker's pid,
as prometheus_client labels the per-process gauges of that mode.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import ProcessCollector
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# prometheus_client names each worker's value file <kind>[_<mode>]_<pid>.db.
_PID_FILE = re.compile(r"_(\d+)\.db$")


def worker_pids(folder: Path) -> list[int]:
    """The pids of the workers that keep values in `folder` and are still running."""
    pids = {int(m.group(1)) for p in folder.glob("*.db") if (m := _PID_FILE.search(p.name))}
    return sorted(pid for pid in pids if os.path.exists(f"/proc/{pid}"))


class WorkerProcessCollector(Collector):
    """process_* metrics of every live worker, labelled pid."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for pid in worker_pids(self.folder):
            one = ProcessCollector(pid=lambda pid=pid: pid, registry=None)  # type: ignore[misc]
            for fam in one.collect():
                out = families.get(fam.name)
                if out is None:
                    out = families[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                for s in fam.samples:
                    out.add_sample(s.name, {**s.labels, "pid": str(pid)}, s.value)
        yield from families.values()
