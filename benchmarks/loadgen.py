"""Load generation for the benchmarks: request bodies, wrk as the client, servers in their own
processes on 127.0.0.1. Shared by serving.py and batching_ab.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.serve_process import free_port
from service import v2codec
from service.manifest import Manifest

ROOT = Path(__file__).resolve().parents[1]

LUA = """
local f = io.open("{body}", "rb")
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "{ctype}"
{extra}
"""


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:  # e.g. a comparison framework missing from its venv
            raise RuntimeError(f"exited with status {proc.returncode} before {url} was ready")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} never became ready")


def bodies(manifest: Manifest, n: int, tmp: Path) -> dict[str, tuple[Path, str, str]]:
    """Request bodies for n images: native JSON (integer pixels), V2 binary, and V2 JSON.

    "v2-json" carries the native body's integer pixels as the UINT8 tensor "images" of
    benchmarks/others/pytriton_app.py (Triton speaks only V2; notsure's V2 input is "input").
    """
    rng = np.random.default_rng(0)
    x = rng.random((n, *manifest.input_shape), dtype=np.float32)
    native = tmp / f"native-{n}.json"
    pixels = (x[:, 0] * 255).round().astype(int)  # (n, H, W)
    native.write_text(json.dumps({"instances": pixels.tolist()}, separators=(",", ":")))
    v2_json = tmp / f"v2-{n}.json"
    images = {
        "name": "images",
        "shape": list(pixels.shape),
        "datatype": "UINT8",
        "data": pixels.ravel().tolist(),  # V2 JSON tensors are flat, row-major
    }
    v2_json.write_text(json.dumps({"inputs": [images]}, separators=(",", ":")))
    body, headers = v2codec.encode_request(
        [("input", x)],
        outputs=("label", "j_score", "confidence", "non_me"),
        parameters={"binary_data_output": True},
    )
    v2 = tmp / f"v2-{n}.bin"
    v2.write_bytes(body)
    extra = f'wrk.headers["{v2codec.HEADER_LENGTH}"] = "{headers[v2codec.HEADER_LENGTH]}"'
    return {
        "native": (native, "application/json", ""),
        "v2-binary": (v2, "application/octet-stream", extra),
        "v2-json": (v2_json, "application/json", ""),
    }


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    if not m:
        return float("nan")
    v, unit = float(m.group(1)), m.group(2)
    return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v


def run_wrk(
    url: str, body: tuple[Path, str, str], conc: int, duration: float, tmp: Path
) -> tuple[float, float, float, int]:
    path, ctype, extra = body
    script = tmp / f"{path.stem}.lua"
    script.write_text(LUA.format(body=path, ctype=ctype, extra=extra))
    threads = 1 if conc == 1 else 2
    cmd = [
        "nice",
        "-n",
        "-15",
        "wrk",
        f"-t{threads}",
        f"-c{conc}",
        f"-d{int(duration)}s",
        "--latency",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    # Anchored: "85.50%" in the Stdev column must not be read as a percentile.
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    errs = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errs += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errs += sum(int(g) for g in m.groups())
    return max(total - errs, 0) / duration, p50, p99, errs


def wait_idle(url: str, timeout: float = 60.0) -> None:
    """Wait until the server has no request in flight (wrk abandons requests when it stops)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            text = httpx.get(url + "/metrics", timeout=5.0).text
        except httpx.HTTPError:
            time.sleep(0.5)
            continue
        inflight = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("notsure_inflight_requests{")
        )
        if inflight <= 0:
            return
        time.sleep(0.5)


class Server:
    """A server process on a free port; stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, cmd: list[str], env: dict[str, str], ready_path: str) -> None:
        self.port = free_port()
        # notsure's gRPC port gets a free one too (unless given): two servers at once (batching
        # on and off) would both want 8001.
        env = {**os.environ, "NOTSURE_GRPC_PORT": str(free_port()), **env,
               "PORT": str(self.port), "NOTSURE_PORT": str(self.port)}  # fmt: skip
        self.cmd = [c.replace("{port}", str(self.port)) for c in cmd]
        self.proc = subprocess.Popen(
            ["nice", "-n", "-15", *self.cmd],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, so stop() reaches forked workers
        )
        self.url = f"http://127.0.0.1:{self.port}"
        try:
            wait_ready(self.url + ready_path, self.proc)
        except RuntimeError:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM the whole process group: LitServe and BentoML fork workers of their own."""
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
