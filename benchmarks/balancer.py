"""Several `notsure serve` replicas on 127.0.0.1 behind a real haproxy configured with
deploy/haproxy/haproxy.cfg, and the real Prometheus scraping each replica with
deploy/prometheus's config and rules (benchmarks/fleet_soak.py)."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from benchmarks import ROOT
from benchmarks.serve_process import ServeProcess, free_port
from service.config import PROMETHEUS_DIR_VARIABLE

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"

HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"


def haproxy_config(port: int, replica_ports: list[int], stats_socket: Path,
                   grpc: tuple[int, list[int]] | None = None) -> str:  # fmt: skip
    """deploy/haproxy/haproxy.cfg with its listen addresses, stats socket and servers moved to
    127.0.0.1 (every other setting as shipped). `grpc`: the gRPC listen port and each replica's
    gRPC port (in replica_ports' order); without it the gRPC listener gets a free port and its
    servers point at the replicas' HTTP ports (never used)."""
    text = HAPROXY_CFG.read_text()
    text, binds = re.subn(r"(?m)^(\s*)bind \S+$", rf"\1bind 127.0.0.1:{port}", text)
    grpc_port, grpc_ports = grpc or (free_port(), replica_ports)
    text, h2_binds = re.subn(r"(?m)^(\s*)bind \S+ proto h2$",
                             rf"\1bind 127.0.0.1:{grpc_port} proto h2", text)  # fmt: skip
    text, socks = re.subn(r"stats socket \S+", f"stats socket {stats_socket}", text)
    http = "".join(f"    server r{i} 127.0.0.1:{p} check\n" for i, p in enumerate(replica_ports))
    h2 = "".join(f"    server g{i} 127.0.0.1:{g} check port {p} check-proto h1 proto h2\n"
                 for i, (p, g) in enumerate(zip(replica_ports, grpc_ports,
                                                strict=True)))  # fmt: skip
    # Each backend's server lines give way to the replicas', in place.
    text = re.sub(r"(?m)^\s*server [rg][1-9]\d* .*\n", "", text)
    text, n = re.subn(r"(?m)^\s*server r0 .*\n", lambda _: http, text)
    text, n_h2 = re.subn(r"(?m)^\s*server g0 .*\n", lambda _: h2, text)
    if (binds, h2_binds, socks, n, n_h2) != (1, 1, 1, 1, 1):
        raise RuntimeError(f"{HAPROXY_CFG}: expected one HTTP and one h2 bind, one stats "
                           "socket, servers r0... and g0...")  # fmt: skip
    return text


def _wait(what: str, probe: Callable[[], bool], timeout: float, proc: subprocess.Popen[bytes],
          log: Path) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited:\n{log.read_text(errors='replace')[-3000:]}")
        if probe():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready within {timeout} s")


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


class Process:
    """A helper binary (haproxy, prometheus) in the foreground, stopped with SIGTERM."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.argv, self.log = argv, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> subprocess.Popen[bytes]:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)
        return self.proc

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed: `make system-deps` installs it")
    return found


class Fleet:
    """n replicas, haproxy in front on `url`, Prometheus scraping every replica each second."""

    def __init__(self, repo: Path, workdir: Path, replicas: int = 3,
                 settings: dict[str, str] | None = None,
                 counter_files: bool = False) -> None:  # fmt: skip
        """`counter_files`: each replica instance keeps its metrics in files of its own
        (prometheus_client's multiprocess store), so that its counters can still be read after
        it was killed: /metrics answers the same series, and no scrape reaches a dead process."""
        self.repo, self.workdir, self.settings = repo, workdir, settings or {}
        self.counter_files = counter_files
        self.ports = [free_port() for _ in range(replicas)]
        self.replicas: list[ServeProcess | None] = [None] * replicas
        self.starts = [0] * replicas
        self.grpc_ports = [free_port() for _ in range(replicas)]
        self.port, self.grpc_port, self.prom_port = free_port(), free_port(), free_port()
        cfg = workdir / "haproxy.cfg"
        cfg.write_text(haproxy_config(self.port, self.ports, workdir / "haproxy.sock",
                                      (self.grpc_port, self.grpc_ports)))  # fmt: skip
        self.haproxy = Process([binary("haproxy"), "-f", str(cfg), "-db"], workdir / "haproxy.log")
        self.prometheus = Process(self._prometheus_argv(), workdir / "prometheus.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def grpc_target(self) -> str:
        """haproxy's gRPC (HTTP/2) listener."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def prom_url(self) -> str:
        return f"http://127.0.0.1:{self.prom_port}"

    def _prometheus_argv(self) -> list[str]:
        config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        config["rule_files"] = [str(PROMETHEUS_DIR / f) for f in config["rule_files"]]
        targets = {"notsure": [f"127.0.0.1:{p}" for p in self.ports],
                   "prometheus": [f"127.0.0.1:{self.prom_port}"]}  # fmt: skip
        for job in config["scrape_configs"]:
            job["static_configs"] = [{"targets": targets[job["job_name"]]}]
        path = self.workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        return [binary("prometheus"), f"--config.file={path}",
                f"--storage.tsdb.path={self.workdir / 'prometheus-data'}",
                f"--web.listen-address=127.0.0.1:{self.prom_port}", "--log.level=warn"]  # fmt: skip

    def start_replica(self, i: int) -> ServeProcess:
        self.starts[i] += 1
        log = self.workdir / f"replica-{i}-{self.starts[i]}.log"
        settings = {**self.settings, "NOTSURE_GRPC_PORT": str(self.grpc_ports[i])}
        if self.counter_files:
            folder = self.metrics_dir(i, self.starts[i])
            folder.mkdir()
            settings.update(
                {"NOTSURE_METRICS_DIR": str(folder), PROMETHEUS_DIR_VARIABLE: str(folder)}
            )
        server = ServeProcess(self.repo, log, settings, port=self.ports[i]).start()
        self.replicas[i] = server
        return server

    def terminate_replica(self, i: int) -> int:
        """SIGTERM, as Kubernetes sends it; returns the exit code after the drain."""
        server = self.replicas[i]
        assert server is not None
        self.replicas[i] = None
        return server.terminate()

    def freeze_replica(self, i: int) -> None:
        """SIGSTOP: the replica hangs; the kernel still accepts connections and requests for it,
        and nothing answers them."""
        server = self.replicas[i]
        assert server is not None and server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)

    def kill_replica(self, i: int) -> int:
        """SIGKILL: no drain; returns the exit code (-9)."""
        server = self.replicas[i]
        assert server is not None
        self.replicas[i] = None
        return server.kill()

    def metrics_dir(self, i: int, start: int) -> Path:
        """Where instance `start` (1, 2, ...) of replica i keeps its counters (counter_files)."""
        return self.workdir / f"metrics-r{i}-{start}"

    def counters_left(self, i: int, start: int) -> list[tuple[str, dict[str, str], float]]:
        """The counter samples (name, labels, value) an instance left in its files, read the
        way its /metrics would have read them; complete even after a SIGKILL, since every
        increment is written to the shared memory map of the file at once."""
        if not self.counter_files:
            raise RuntimeError("the fleet was started without counter_files=True")
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.metrics_dir(i, start)))  # type: ignore[no-untyped-call]
        return [(s.name, s.labels, s.value) for metric in registry.collect()
                if metric.type == "counter" for s in metric.samples
                if s.name.endswith("_total")]  # fmt: skip

    def __enter__(self) -> Fleet:
        try:
            for i in range(len(self.ports)):
                self.start_replica(i)
            proc = self.haproxy.start()
            _wait("haproxy", lambda: _http_ok(f"{self.url}/v2/health/ready"), 30, proc,
                  self.haproxy.log)  # fmt: skip
            proc = self.prometheus.start()
            _wait("prometheus", lambda: _http_ok(f"{self.prom_url}/-/ready"), 60, proc,
                  self.prometheus.log)  # fmt: skip
            self.wait_until(lambda: self.targets_up() == len(self.ports), 30, "every target up")
            # Every replica in haproxy's rotation (rise 2 = two passing checks) before traffic.
            self.wait_until(lambda: self.servers_up() == len(self.ports), 30, "every server UP")
            self.wait_until(lambda: self.servers_up("notsure_grpc") == len(self.ports), 30,
                            "every gRPC server UP")  # fmt: skip
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.haproxy.stop()
        for i, server in enumerate(self.replicas):
            if server is not None:
                server.stop()
                self.replicas[i] = None
        self.prometheus.stop()

    # --- observation --------------------------------------------------------------------------

    @staticmethod
    def wait_until(probe: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not probe():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.2)

    def query(self, expr: str, at: float | None = None) -> list[tuple[dict[str, str], float]]:
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        body = httpx.get(f"{self.prom_url}/api/v1/query", params=params, timeout=10).json()
        if body["status"] != "success":
            raise RuntimeError(f"query {expr!r} failed: {body}")
        return [(s["metric"], float(s["value"][1])) for s in body["data"]["result"]]

    def targets_up(self) -> int:
        return sum(v == 1.0 for _, v in self.query('up{job="notsure"}'))

    def _stat(self) -> list[dict[str, str]]:
        """Rows of haproxy's runtime `show stat` CSV, as dicts by column name."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.workdir / "haproxy.sock"))
            sock.sendall(b"show stat\n")
            out = b"".join(iter(lambda: sock.recv(65536), b""))
        lines = [line for line in out.decode().splitlines() if line]
        header = lines[0].removeprefix("# ").split(",")
        return [dict(zip(header, line.split(","), strict=False)) for line in lines[1:]]

    def servers_up(self, backend: str = "notsure") -> int:
        """Replicas haproxy has in rotation (backend notsure_grpc: for gRPC)."""
        return sum(r["status"] == "UP" for r in self._stat()
                   if r["pxname"] == backend and r["svname"] != "BACKEND")  # fmt: skip

    def backend_counters(self, backend: str = "notsure") -> dict[str, int]:
        """Retries, redispatches and responses by class of the backend, from haproxy itself."""
        (row,) = [r for r in self._stat() if r["pxname"] == backend and r["svname"] == "BACKEND"]
        keys = ("stot", "wretr", "wredis", "econ", "eresp", "hrsp_2xx", "hrsp_4xx", "hrsp_5xx")
        return {k: int(row[k] or 0) for k in keys}
