"""`notsure serve` as a child process on a free loopback port (soak, overload, fault tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

# --- the server under test -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int | None:
    """Resident memory of a process in KiB (Linux /proc), None once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class ServeProcess:
    """`notsure serve` in a subprocess on a free 127.0.0.1 port, configured by NOTSURE_* vars."""

    def __init__(
        self,
        repo: Path,
        log_path: Path,
        settings: Mapping[str, str] | None = None,
        start_timeout_s: float = 120.0,
        port: int | None = None,  # a fixed port, e.g. to restart a replica behind a balancer
    ) -> None:
        self.port, self.grpc_port = port or free_port(), free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("NOTSURE_")}
        self.env.update(
            {
                "NOTSURE_HOST": "127.0.0.1",
                "NOTSURE_PORT": str(self.port),
                "NOTSURE_GRPC_PORT": str(self.grpc_port),
                "NOTSURE_MODEL_REPOSITORY": str(repo),
                "NOTSURE_DEVICE": "cpu",
                **(settings or {}),
            }
        )
        self.log_path, self.start_timeout_s = log_path, start_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> ServeProcess:
        argv = [sys.executable, "-m", "notsure.cli", "serve"]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"notsure serve exited early:\n{self.log()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"notsure serve not ready in {self.start_timeout_s} s:\n{self.log()}")

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then wait for the exit code (SIGKILL only if it hangs past timeout_s)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            return -9

    def kill(self) -> int:
        """SIGKILL, as the OOM killer or a lost node ends a process: no drain, the kernel
        closes its connections as they stand; the exit code (-9)."""
        assert self.proc is not None
        self.proc.kill()
        return self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.terminate()

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- the traffic ------------------------------------------------------------------------------
