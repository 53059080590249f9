"""Helpers for the deployment tests: the Dockerfile as parsed by the official parser, the service
started exactly as the image starts it (`notsure serve` in a subprocess), and traffic for it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import dockerfile
import httpx
import numpy as np
import pytest

from service.manifest import MANIFEST_FILE, Manifest
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "notsure.json"
PROMETHEUS_DIR = DEPLOY / "prometheus"

START_TIMEOUT_S = 120.0  # model loading shares 2 cores with whatever else runs


def tool(name: str) -> str:
    """A command-line tool from this Python's bin folder (the dev extra) or the PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: `make install-dev system-deps` installs it")
    return found


# --- the Dockerfile ---------------------------------------------------------------------------


@dataclass
class Stage:
    """One FROM ... AS name block of the Dockerfile."""

    base: str
    name: str | None
    commands: list[dockerfile.Command] = field(default_factory=list)

    def all(self, cmd: str) -> list[dockerfile.Command]:
        return [c for c in self.commands if c.cmd == cmd]

    def env(self) -> dict[str, str]:
        """ENV key=value pairs of this stage, later ones winning (values left unexpanded)."""
        out: dict[str, str] = {}
        for c in self.all("ENV"):
            out.update(zip(c.value[::2], c.value[1::2], strict=True))
        return out

    def copies(self) -> list[tuple[str, str]]:
        """(destination in the image, source in the build context) of COPYs from the context."""
        return [
            (c.value[-1], src)
            for c in self.all("COPY")
            if not any(f.startswith("--from") for f in c.flags)
            for src in c.value[:-1]
        ]


def dockerfile_stages(path: Path = DOCKERFILE) -> list[Stage]:
    stages: list[Stage] = []
    for c in dockerfile.parse_file(str(path)):
        if c.cmd == "FROM":
            name = c.value[2] if len(c.value) == 3 and c.value[1].upper() == "AS" else None
            stages.append(Stage(base=c.value[0], name=name))
        elif stages:
            stages[-1].commands.append(c)
    return stages


def to_host_path(container_path: str, copies: Sequence[tuple[str, str]]) -> Path | None:
    """Where a path inside the image comes from in the repository, following the COPYs."""
    p = PurePosixPath(container_path)
    for dst, src in copies:
        d = PurePosixPath(dst)
        if p == d:
            return ROOT / src
        if d in p.parents:
            return ROOT / src / p.relative_to(d)
    return None


# --- the service, started the way the image starts it --------------------------------------------


def service_env(overrides: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without NOTSURE_* (the developer's shell must not leak in),
    the serving stage's NOTSURE_* ENV with image paths mapped to the repository, then overrides."""
    serve = dockerfile_stages()[-1]
    copies = serve.copies()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOTSURE_")}
    for key, value in serve.env().items():
        if key.startswith("NOTSURE_"):
            host = to_host_path(value, copies) if value.startswith("/") else None
            env[key] = str(host) if host is not None else value
    env.update(overrides)
    return env


def image_command(argv: Sequence[str], copies: Sequence[tuple[str, str]]) -> list[str]:
    """An exec-form CMD of the image as a host command: tools from this Python's bin folder,
    files the image COPYs from the repository at their repository path."""
    out = []
    for i, arg in enumerate(argv):
        host = to_host_path(arg, copies) if arg.startswith("/") else None
        if host is not None:
            out.append(str(host))
        elif i == 0:
            out.append(sys.executable if arg in ("python", "python3") else tool(arg))
        else:
            out.append(arg)
    return out


class ServiceProcess:
    """The serving image's CMD, run on this host against a model repository on 127.0.0.1."""

    def __init__(self, log_dir: Path, env: Mapping[str, str]) -> None:
        self.port = free_port()
        serve = dockerfile_stages()[-1]
        self.argv = image_command(tuple(serve.all("CMD")[-1].value), serve.copies())
        self.grpc_port = free_port()
        self.env = service_env({"NOTSURE_HOST": "127.0.0.1", "NOTSURE_PORT": str(self.port),
                                "NOTSURE_GRPC_PORT": str(self.grpc_port), **env})  # fmt: skip
        self.log_path = log_dir / f"service-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_headers: dict[str, str] = {}  # e.g. an API key when health is protected

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def __enter__(self) -> ServiceProcess:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.log_path.parent,
                                         stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.__exit__()
                pytest.fail(f"`{' '.join(self.argv)}` exited early:\n{self.log_tail()}")
            try:
                r = httpx.get(f"{self.url}/v2/health/ready", headers=self.ready_headers, timeout=2)
                if r.status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.__exit__()
        pytest.fail(f"service not ready within {START_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    def __exit__(self, *exc: object) -> None:
        stop_process(self.proc)
        self.proc = None


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL after 20 s; a no-op for a process that is gone or never started."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def noise_instances(repo: Path, model: str, n: int, seed: int) -> list[list[list[float]]]:
    """n pixel arrays (HxW, or CxHxW for colour models) in [0, 1] for one model of a repository."""
    manifest = Manifest.load(repo / model / "1" / MANIFEST_FILE)
    c, h, w = manifest.input_shape
    x = np.random.default_rng(seed).random((n, c, h, w)).round(3)
    return [img[0].tolist() if c == 1 else img.tolist() for img in x]


def predict(url: str, model: str, instances: list[object], threshold: float | None = None
            ) -> list[str]:  # fmt: skip
    """POST /v1/models/{model}/predict; returns the decisions."""
    body: dict[str, object] = {"instances": instances}
    if threshold is not None:
        body["threshold"] = threshold
    r = httpx.post(f"{url}/v1/models/{model}/predict", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return [p["decision"] for p in r.json()["predictions"]]


# --- the Grafana dashboard ------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    panel: str
    panel_type: str
    ref: str
    expr: str
    format: str


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_targets() -> list[Target]:
    return [Target(p["title"], p["type"], t["refId"], t["expr"], t.get("format", "time_series"))
            for p in dashboard()["panels"] for t in p.get("targets", [])]  # fmt: skip


def grafana_to_promql(expr: str, rate_interval: str = "5m") -> str:
    """A dashboard query as Grafana sends it with every model selected."""
    return expr.replace("$__rate_interval", rate_interval).replace('"$model"', '".+"')
