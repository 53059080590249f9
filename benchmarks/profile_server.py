"""Where a request's CPU goes: py-spy samples `notsure serve` under a bounded local load.

    python -m benchmarks.profile_server --body float-json --concurrency 8 --seconds 15

starts the server on 127.0.0.1, sends one body kind from a keep-alive async client for the
warm-up plus `--seconds`, and during that window records the server with py-spy in `--gil`
mode (only the thread holding the GIL is sampled: the Python work, which one core at most can
do) and reads the process's CPU time from /proc. It reports the server's CPU microseconds per
request (all threads: onnxruntime included) and, per component of the Python work, its share
of the GIL samples and microseconds per request (samples / rate / requests answered in the
window). A sample goes to the first component that one of its frames matches, from the
innermost frame out.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from benchmarks import ROOT
from benchmarks.serve_process import ServeProcess
from service import v2codec

BODIES = ("float-json", "int-json", "png-json", "files", "v2-json", "v2-binary")
# (component, what a frame's "function (file:line)" text contains), innermost match wins.
COMPONENTS: list[tuple[str, tuple[str, ...]]] = [
    ("onnxruntime", ("onnxruntime",)),
    ("metrics", ("prometheus_client",)),
    ("scoring + decision", ("service/scoring.py", "service/kdensity.py")),
    ("tensor conversion", ("service/imaging.py", "from_values", "_stack", "check_batch")),
    ("body parse", ("service/fastjson.py", "pydantic", "v2codec.py:", "multipart", "_read (")),
    ("response", ("_response", "encode ", "json/encoder", "orjson", "responses.py")),
    # A finished batch wakes the event loop from the worker thread (uvloop's
    # call_soon_threadsafe, C code under this Python frame); the batcher hands batches over.
    ("thread hand-offs", ("_call_set_state", "ThreadPoolExecutor.submit")),
    ("batcher", ("service/batching.py",)),
    ("routing + middleware", ("starlette", "fastapi", "service/middleware.py", "routing.py")),
    ("HTTP protocol (uvicorn)", ("uvicorn", "httptools", "h11")),
    ("event loop", ("asyncio", "selectors", "uvloop")),
]


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((img[0] * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def request_for(kind: str, model: str, n: int) -> dict[str, object]:
    """httpx.post keyword arguments for n random 1x28x28 images sent as `kind`."""
    x = np.random.default_rng(0).random((n, 1, 28, 28), dtype=np.float32)
    native = f"/v1/models/{model}/predict"
    if kind == "float-json":  # pixels in [0, 1] with 4 decimals, as a browser or notebook sends
        pixels = np.round(x[:, 0], 4).tolist()
        return {"url": native, "content": json.dumps({"instances": pixels}).encode()}
    if kind == "int-json":
        pixels = (x[:, 0] * 255).round().astype(int).tolist()
        return {"url": native, "content": json.dumps({"instances": pixels}).encode()}
    if kind == "png-json":
        b64 = [base64.b64encode(_png(i)).decode() for i in x]
        return {"url": native, "content": json.dumps({"instances": b64}).encode()}
    if kind == "files":
        files = [("files", (f"{i}.png", _png(x[i]), "image/png")) for i in range(n)]
        return {"url": f"{native}/files", "files": files}
    infer = f"/v2/models/{model}/infer"
    body, headers = v2codec.encode_request([("input", x)], binary_inputs=kind == "v2-binary")
    return {"url": infer, "content": body, "headers": headers}


async def load(url: str, req: dict[str, object], concurrency: int, until: float) -> list[float]:
    """Closed-loop keep-alive requests until `until`; the finish time of every 200."""
    done: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:

        async def worker() -> None:
            while time.monotonic() < until:
                r = await client.post(**req)  # type: ignore[arg-type]
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
                done.append(time.monotonic())

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def component(stack: str) -> str:
    for frame in reversed(stack.split(";")):
        for name, needles in COMPONENTS:
            if any(n in frame for n in needles):
                return name
    return "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--body", choices=BODIES, default="float-json")
    p.add_argument("--images", type=int, default=1, help="images per request")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seconds", type=float, default=15.0, help="profiled window")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--model", default="mnist-resnet32-rce")
    p.add_argument("--repo", type=Path, default=ROOT / "models")
    p.add_argument("--env", action="append", default=[], help="NOTSURE_X=value for the server")
    p.add_argument("--out", type=Path, help="write the summary JSON here")
    p.add_argument("--raw", type=Path, help="keep py-spy's raw stacks here")
    args = p.parse_args()
    settings = dict(kv.split("=", 1) for kv in args.env)
    req = request_for(args.body, args.model, args.images)
    with (
        tempfile.TemporaryDirectory() as tmp,
        ServeProcess(
            args.repo, Path(tmp) / "serve.log", {"NOTSURE_MODELS": args.model, **settings}
        ) as server,
    ):
        raw = Path(tmp) / "profile.txt"
        start = time.monotonic()
        window = (start + args.warmup, start + args.warmup + args.seconds)
        spy = ["py-spy", "record", "--pid", str(server.pid), "--rate", str(args.rate),
               "--duration", str(int(args.seconds)), "--format", "raw", "--gil", "--nonblocking",
               "--output", str(raw)]  # fmt: skip

        cpu: list[float] = []

        async def run() -> list[float]:
            task = asyncio.create_task(load(server.url, req, args.concurrency, window[1]))
            await asyncio.sleep(args.warmup)
            proc = await asyncio.create_subprocess_exec(
                Path(sys.executable).with_name("py-spy"), *spy[1:],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            cpu.append(cpu_seconds(server.pid))
            await asyncio.sleep(int(args.seconds))
            cpu.append(cpu_seconds(server.pid))
            done = await task
            await proc.wait()
            return done

        done = asyncio.run(run())
        answered = sum(window[0] <= t < window[0] + int(args.seconds) for t in done)
        counts: Counter[str] = Counter()
        if args.raw:
            args.raw.write_text(raw.read_text())
        for line in raw.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            counts[component(stack)] += int(n)
    total = sum(counts.values())
    per_req_us = {k: 1e6 * v / args.rate / max(answered, 1) for k, v in counts.items()}
    summary = {
        "body": args.body, "images": args.images, "concurrency": args.concurrency,
        "seconds": int(args.seconds), "requests": answered,
        "req_per_s": round(answered / int(args.seconds), 1),
        "server_cpu_us_per_request": round(1e6 * (cpu[1] - cpu[0]) / max(answered, 1), 1),
        "python_us_per_request": round(1e6 * total / args.rate / max(answered, 1), 1),
        "gil_samples": total,
        "components": {
            k: {"share": round(v / total, 3), "us_per_request": round(per_req_us[k], 1)}
            for k, v in counts.most_common()
        },
    }  # fmt: skip
    text = json.dumps(summary, indent=2)
    if args.out:
        args.out.write_text(text)
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
