"""Several server processes on one port (`workers`), for hosts with more cores.

One Python process runs its request handling on one core at most (the GIL), so on a host with
many cores a single server leaves most of them to onnxruntime alone. With `workers` = N the
supervisor starts N independent server processes (spawned: nothing is shared but the ports).
Each binds the HTTP port (and the gRPC port) with SO_REUSEPORT, so the kernel spreads new
connections over them, loads the models and runs its own batchers on cores / N. Their metrics
go to one folder in prometheus_client's multiprocess mode, so /metrics, whichever worker
answers it, adds up all of them.

SIGTERM and SIGINT are passed on to every worker, which drains as a single server does. When a
worker exits by itself the others are stopped too and the supervisor exits 1: a half-sized
server is better restarted whole by whatever runs it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from service.config import Settings, export_metrics_dir

log = logging.getLogger(__name__)
# What a worker runs: a whole server on the given sockets (`service.server.serve`).
Serve = Callable[[Settings, list[socket.socket]], None]


def shared_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) that other processes may bind too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host.strip("[]"), port))
    return sock


def _worker(settings: Settings, serve: Serve) -> None:
    """One worker process: a whole server on the shared ports."""
    # Its own process group: a Ctrl-C in a terminal reaches the supervisor only, which passes it
    # on once (uvicorn takes a second SIGINT as "exit now, do not drain").
    os.setpgid(0, 0)
    serve(settings, [shared_socket(settings.host, settings.port)])


def run_workers(settings: Settings, serve: Serve) -> int:
    """Run `settings.workers` processes of `serve` until they exit; the exit status. (`serve`
    must be a module-level function: the workers are spawned and import it anew.)"""
    metrics_dir = Path(tempfile.mkdtemp(prefix="notsure-metrics-"))
    export_metrics_dir(metrics_dir)  # inherited by the workers
    each = settings.model_copy(update={"metrics_dir": metrics_dir})
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_worker, args=(each, serve), name=f"notsure-worker-{i}")
        for i in range(settings.workers)
    ]
    asked = False  # to stop, by a signal

    def stop(signum: int) -> None:
        for p in procs:
            if p.pid is not None and p.exitcode is None:
                os.kill(p.pid, signum)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal asked
        asked = True
        stop(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stopping = False
    try:
        for p in procs:
            p.start()
        log.info("%d workers on port %d: pids %s", len(procs), settings.port,
                 ", ".join(str(p.pid) for p in procs))  # fmt: skip
        while any(p.exitcode is None for p in procs):
            time.sleep(0.2)
            gone = [p for p in procs if p.exitcode is not None]
            if gone and not asked and not stopping:
                log.error("worker %s exited (status %s); stopping the others", gone[0].pid,
                          gone[0].exitcode)  # fmt: skip
                stopping = True
                stop(signal.SIGTERM)
        for p in procs:
            p.join()
        return 0 if asked and not any(p.exitcode for p in procs) else 1
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
