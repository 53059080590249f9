"""Overload benchmark: normal load, then far more than the queue holds, then normal load again.

    python -m benchmarks.overload --repo models --out overload.json

Starts `notsure serve` (one inference thread, a small queue) on 127.0.0.1 and measures, per
phase, the answers by status and their latency, how fast readiness probes are answered while the
service sheds, and how long after the overload ends the first request is served again.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

from benchmarks.soak import ServeProcess
from service import v2codec

MODEL = "tiny-rce"


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    concurrency: int
    images: int  # per request


@dataclass
class PhaseResult:
    name: str
    requests: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # status -> p50/p99
    retry_after: list[str] = field(default_factory=list)  # distinct Retry-After values on 503


def _pct(values: list[float]) -> dict[str, float]:
    a = np.array(values) * 1000
    return {
        "p50": round(float(np.median(a)), 1),
        "p99": round(float(np.percentile(a, 99)), 1),
        "max": round(float(a.max()), 1),
    }


def _body(shape: tuple[int, ...], images: int) -> tuple[bytes, dict[str, str]]:
    x = np.random.default_rng(images).random((images, *shape), dtype=np.float32)
    return v2codec.encode_request([("input", x)], outputs=["label"])


async def run_phase(
    client: httpx.AsyncClient, phase: Phase, shape: tuple[int, ...], ended: dict[str, float]
) -> PhaseResult:
    res = PhaseResult(phase.name)
    lat: dict[str, list[float]] = {}
    body, headers = _body(shape, phase.images)
    deadline = time.monotonic() + phase.seconds

    async def worker() -> None:
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            r = await client.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers)
            code = str(r.status_code)
            res.requests += 1
            res.by_status[code] = res.by_status.get(code, 0) + 1
            lat.setdefault(code, []).append(time.perf_counter() - t0)
            if r.status_code == 503 and r.headers.get("retry-after") not in res.retry_after:
                res.retry_after.append(r.headers.get("retry-after", "missing"))
            if r.status_code == 200 and "first_200" not in ended:
                ended["first_200"] = time.monotonic()

    await asyncio.gather(*(worker() for _ in range(phase.concurrency)))
    res.latency_ms = {code: _pct(v) for code, v in lat.items()}
    return res


async def probe(
    client: httpx.AsyncClient, stop: asyncio.Event, out: list[tuple[float, int, float]]
) -> None:
    """GET /v2/health/ready every 50 ms: (time, status, seconds)."""
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            status = (await client.get("/v2/health/ready")).status_code
        except httpx.HTTPError:
            status = 0
        out.append((time.monotonic(), status, time.perf_counter() - t0))
        await asyncio.sleep(0.05)


async def run(url: str, phases: list[Phase]) -> dict[str, object]:
    limits = httpx.Limits(max_connections=max(p.concurrency for p in phases) + 8)
    async with (
        httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client,
        httpx.AsyncClient(base_url=url, timeout=60) as health,
    ):
        meta = (await client.get(f"/v2/models/{MODEL}")).json()
        shape = tuple(meta["inputs"][0]["shape"][1:])
        probes: list[tuple[float, int, float]] = []
        stop = asyncio.Event()
        prober = asyncio.create_task(probe(health, stop, probes))
        results, marks = [], {}
        for phase in phases:
            ended: dict[str, float] = {}
            marks[phase.name] = (time.monotonic(), ended)
            results.append(await run_phase(client, phase, shape, ended))
        stop.set()
        await prober
        metrics = (await client.get("/metrics")).text
    out: dict[str, object] = {"phases": [asdict(r) for r in results]}
    bounds = [(p.name, marks[p.name][0]) for p in phases] + [("end", float("inf"))]
    health_by_phase = {}
    for (name, start), (_, stop_t) in itertools.pairwise(bounds):
        mine = [(s, d) for t, s, d in probes if start <= t < stop_t]
        health_by_phase[name] = {
            "probes": len(mine),
            "non_200": sum(1 for s, _ in mine if s != 200),
            **_pct([d for _, d in mine]),
        }
    out["health"] = health_by_phase
    last = phases[-1].name
    start, ended = marks[last]
    out["recovery_s"] = round(ended["first_200"] - start, 3) if "first_200" in ended else None
    out["rejected_total"] = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("notsure_shed_requests_total{")
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repo", type=Path, default=Path("models"))
    p.add_argument("--queue-images", type=int, default=256)
    p.add_argument("--seconds", type=float, default=10.0, help="length of the overload phase")
    p.add_argument("--intra-op-threads", type=int, default=0, help="0: onnxruntime's default")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    phases = [
        Phase("normal", 5, 4, 32),
        Phase("overload", a.seconds, 128, 128),
        Phase("recovered", 5, 4, 32),
    ]
    settings = {
        "NOTSURE_INFERENCE_THREADS": "1",
        "NOTSURE_MAX_QUEUE_IMAGES": str(a.queue_images),
        "NOTSURE_MAX_BATCH_SIZE": "64",
        "NOTSURE_RETRY_AFTER_S": "1",
        "NOTSURE_INTRA_OP_THREADS": str(a.intra_op_threads),
    }
    with ServeProcess(a.repo, Path("overload-server.log"), settings) as server:
        out = asyncio.run(run(server.url, phases))
        out["settings"] = settings
        out["server_exit_code"] = server.terminate()
    text = json.dumps(out, indent=2)
    if a.out:
        a.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
