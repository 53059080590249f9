"""Load generation for the benchmarks: request bodies, wrk as the client, servers in their own
processes on 127.0.0.1. Shared by serving.py and batching_ab.py."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import numpy as np

from benchmarks import ROOT
from benchmarks.serve_process import free_port
from service import v2codec
from service.manifest import Manifest

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


# The body kinds of notsure's cells, with the route each is posted to (format: model name).
NOTSURE_APIS: dict[str, str] = {
    "native": "/v1/models/{}/predict",  # integer pixels 0-255 as JSON
    "native-float": "/v1/models/{}/predict",  # float pixels in [0, 1], 4 decimals, as JSON
    "png": "/v1/models/{}/predict",  # base64 PNG strings in the JSON body
    "multipart": "/v1/models/{}/predict/files",  # PNG files, multipart/form-data
    "v2-json": "/v2/models/{}/infer",  # KServe V2 JSON, FP32 tensor "input"
    "v2-binary": "/v2/models/{}/infer",  # KServe V2 binary extension, FP32 tensor "input"
}
# The outputs a V2 request asks for: the label and the scores of the thresholding test.
V2_OUTPUTS = ("label", "j_score", "confidence", "non_me")
BOUNDARY = "notsure-bench-boundary"


def _png(image: np.ndarray) -> bytes:
    """(H, W) uint8 -> PNG bytes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _v2_binary(name: str, x: np.ndarray, outputs: tuple[str, ...]) -> tuple[bytes, str]:
    """A V2 binary-extension request body (service.v2codec, as every other V2 client here) and
    the wrk Lua line setting its header-length header."""
    body, headers = v2codec.encode_request(
        [(name, x)], outputs=outputs, parameters={"binary_data_output": True}
    )
    return body, f'wrk.headers["{v2codec.HEADER_LENGTH}"] = "{headers[v2codec.HEADER_LENGTH]}"'


def bodies(manifest: Manifest, n: int, tmp: Path) -> dict[str, tuple[Path, str, str]]:
    """Request bodies for the same n images in every body kind: (file, content type, extra
    wrk Lua). notsure's kinds are NOTSURE_APIS; the comparison servers' are "v2-json-u8" and
    "v2-binary-u8" (the UINT8 tensor "images" of benchmarks/others/pytriton_app.py: Triton
    speaks only V2, and notsure's V2 input is "input"). Every kind carries the same pixels:
    integers 0-255, or those divided by 255 where the body holds floats."""
    rng = np.random.default_rng(0)
    pixels = (rng.random((n, *manifest.input_shape[1:])) * 255).round().astype(np.uint8)
    x = (pixels.astype(np.float32) / 255)[:, None]  # (n, 1, H, W) in [0, 1]
    out: dict[str, tuple[Path, str, str]] = {}

    def put(kind: str, data: bytes, ctype: str, extra: str = "") -> None:
        path = tmp / f"{kind}-{n}.body"
        path.write_bytes(data)
        out[kind] = (path, ctype, extra)

    def dumps(obj: object) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    put("native", dumps({"instances": pixels.tolist()}), "application/json")
    floats = np.round(x[:, 0].astype(np.float64), 4)
    put("native-float", dumps({"instances": floats.tolist()}), "application/json")
    pngs = [_png(p) for p in pixels]
    put(
        "png",
        dumps({"instances": [base64.b64encode(p).decode() for p in pngs]}),
        "application/json",
    )
    parts = b"".join(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="{i}.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + p
        + b"\r\n"
        for i, p in enumerate(pngs)
    )
    put("multipart", parts + f"--{BOUNDARY}--\r\n".encode(),
        f"multipart/form-data; boundary={BOUNDARY}")  # fmt: skip
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    put(
        "v2-json",
        dumps({"inputs": [{**tensor, "data": np.round(x.ravel().astype(np.float64), 4).tolist()}]}),
        "application/json",
    )
    data, extra = _v2_binary("input", x, V2_OUTPUTS)
    put("v2-binary", data, "application/octet-stream", extra)
    images = {"name": "images", "shape": list(pixels.shape), "datatype": "UINT8"}
    # V2 JSON tensors are flat, row-major.
    put("v2-json-u8", dumps({"inputs": [{**images, "data": pixels.ravel().tolist()}]}),
        "application/json")  # fmt: skip
    data, extra = _v2_binary("images", pixels, ("label", "j_score", "accepted"))
    put("v2-binary-u8", data, "application/octet-stream", extra)
    return out


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


def wait_quiet(
    servers: Sequence[Server], share: float = 0.1, window: float = 0.3, timeout: float = 60.0
) -> float:
    """Wait until the servers together use under `share` of one core over `window` seconds:
    a server left with abandoned requests (wrk drops its connections when a cell ends, and a
    server without a queue bound keeps working through what it had read: 64 requests of 64
    images are seconds of CPU) would otherwise run on into the next cell and the ceiling
    measured before it. Returns the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        before = sum(s.cpu_seconds() for s in servers)
        time.sleep(window)
        if sum(s.cpu_seconds() for s in servers) - before < share * window:
            break
    return time.monotonic() - start


class Server:
    """A server process on a free port; stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(
        self, cmd: list[str], env: dict[str, str], ready_path: str, cwd: Path = ROOT
    ) -> None:
        """`cwd`: the folder it starts in; for `python -m notsure.cli`, the checkout whose
        code runs (the current folder comes first on `-m`'s module path)."""
        self.port = free_port()
        # notsure's gRPC port gets a free one too (unless given): two servers at once (batching
        # on and off) would both want 8001.
        env = {**os.environ, "NOTSURE_GRPC_PORT": str(free_port()), **env,
               "PORT": str(self.port), "NOTSURE_PORT": str(self.port)}  # fmt: skip
        self.cmd = [c.replace("{port}", str(self.port)) for c in cmd]
        self.proc = subprocess.Popen(
            ["nice", "-n", "-15", *self.cmd],
            env=env,
            cwd=cwd,
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

    def cpu_seconds(self) -> float:
        """CPU time (user + system) so far of every live process in the server's process group:
        Triton's server and Python backend stubs, LitServe's and BentoML's workers included."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                # After "(comm)": state ppid pgrp ... utime(14) stime(15), 1-based over the line.
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited meanwhile
            if int(fields[2]) == self.proc.pid:
                total += int(fields[11]) + int(fields[12])
        return total / tick

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
