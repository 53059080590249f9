"""Overload: past the queue bound the service sheds with 503 + Retry-After at once, health stays
responsive, every accepted request runs exactly once, and the service recovers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.config import Settings
from tests.conftest import LiveServer
from tests.reliability.conftest import RCE, model_version, pixels, slow_down, v2_binary

pytestmark = pytest.mark.slow
IMAGES = 8  # per request
QUEUE = 32  # images: 4 requests wait while one batch runs


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples that carry these labels (0 when there are none)."""
    return sum(
        float(s.value)
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def burst(url: str, n: int) -> tuple[list[tuple[str, httpx.Response, float]], list[float]]:
    """n concurrent infer requests, and health probes every 20 ms while they are in flight."""
    x = pixels(IMAGES)
    limits = httpx.Limits(max_connections=n + 4)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def one(i: int) -> tuple[str, httpx.Response, float]:
            rid = f"burst-{i}"
            body, headers = v2_binary(x, rid)
            t0 = time.perf_counter()
            r = await client.post(
                f"/v2/models/{RCE}/infer", content=body, headers={**headers, "X-Request-ID": rid}
            )
            return rid, r, time.perf_counter() - t0

        async def probe(done: asyncio.Event) -> list[float]:
            waits = []
            while not done.is_set():
                for path in ("/v2/health/live", "/v2/health/ready"):
                    t0 = time.perf_counter()
                    r = await client.get(path)
                    assert r.status_code == 200, (path, r.status_code)
                    waits.append(time.perf_counter() - t0)
                await asyncio.sleep(0.02)
            return waits

        done = asyncio.Event()
        prober = asyncio.create_task(probe(done))
        results = await asyncio.gather(*(one(i) for i in range(n)))
        done.set()
        return list(results), await prober


def test_overload_sheds_fast_keeps_health_and_recovers(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(
        model_repository=model_repo,
        max_queue_images=QUEUE,
        max_batch_size=IMAGES,
        inference_threads=1,
        retry_after_s=2,
    )
    with LiveServer(settings) as server:
        batches = slow_down(monkeypatch, model_version(server), 0.05)  # 50 ms a batch
        results, probes = asyncio.run(burst(server.url, 96))

        ok = [(rid, r, t) for rid, r, t in results if r.status_code == 200]
        shed = [(rid, r, t) for rid, r, t in results if r.status_code == 503]
        assert len(ok) + len(shed) == len(results), {r.status_code for _, r, _ in results}
        for rid, r, _ in results:  # one answer per request, carrying its id
            assert r.headers["x-request-id"] == rid
        for _, r, _ in ok:
            assert r.json()["id"] is not None and len(r.json()["outputs"][0]["data"]) == IMAGES
        for _, r, _ in shed:
            assert r.headers["retry-after"] == "2"
            assert "queue full" in r.json()["error"] and "retry after 2 s" in r.json()["fix"]
        assert len(ok) >= QUEUE // IMAGES and len(shed) >= len(results) // 2
        # Every accepted image ran exactly once; shed ones never reached the model.
        assert sum(batches) == IMAGES * len(ok)

        shed_s = np.array([t for *_, t in shed])
        ok_s = np.array([t for *_, t in ok])
        print(
            f"\noverload: {len(results)} requests x {IMAGES} images, queue {QUEUE} images, "
            f"50 ms batches: {len(ok)} served (p50 {np.median(ok_s) * 1000:.0f} ms), "
            f"{len(shed)} shed (p50 {np.median(shed_s) * 1000:.0f} ms, "
            f"p99 {np.percentile(shed_s, 99) * 1000:.0f} ms); "
            f"health p99 {np.percentile(probes, 99) * 1000:.0f} ms over {len(probes)} probes"
        )
        # Shedding does not wait for inference: faster than serving, and well under a second.
        assert np.median(shed_s) < np.median(ok_s) and np.percentile(shed_s, 99) < 1.0
        assert probes and max(probes) < 1.0

        text = httpx.get(f"{server.url}/metrics").text
        assert metric(text, "notsure_rejected_total", model=RCE, reason="queue_full") == len(shed)

        # Load gone: everything is served again, and nothing is left queued.
        for i in range(8):
            body, headers = v2_binary(pixels(IMAGES, seed=i))
            assert (
                httpx.post(
                    f"{server.url}/v2/models/{RCE}/infer", content=body, headers=headers
                ).status_code
                == 200
            )
        assert model_version(server).batcher.queued_images == 0  # type: ignore[union-attr]
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
