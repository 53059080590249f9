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
from service.runner import LoadedModel
from tests.conftest import LiveServer
from tests.reliability.conftest import RCE, loaded_model, pixels, slow_down, v2_binary

pytestmark = pytest.mark.slow
IMAGES = 8  # per request, and per batch
QUEUE = 16  # images: two requests wait while one batch runs
BATCH_S = 2.0  # each batch takes this long: the queue stays full for about that long
BURST = 24


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples that carry these labels (0 when there are none)."""
    return sum(
        float(s.value)
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def overload(url: str, model: LoadedModel) -> dict[str, list]:  # type: ignore[type-arg]
    """A burst that fills the queue, then, while it is full, single requests and health probes
    one after another (so their latency is the server's, not a connection storm's)."""
    x = pixels(IMAGES)
    limits = httpx.Limits(max_connections=BURST + 2)
    async with (
        httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client,
        httpx.AsyncClient(base_url=url, timeout=60) as single,
    ):

        async def infer(c: httpx.AsyncClient, rid: str) -> tuple[str, httpx.Response, float]:
            body, headers = v2_binary(x, rid)
            t0 = time.perf_counter()
            r = await c.post(
                f"/v2/models/{RCE}/infer", content=body, headers={**headers, "X-Request-ID": rid}
            )
            return rid, r, time.perf_counter() - t0

        t_burst = time.monotonic()
        burst = asyncio.gather(*(infer(client, f"burst-{i}") for i in range(BURST)))
        while model.batcher.queued_images < QUEUE:  # wait until the queue is full
            await asyncio.sleep(0.01)
        sheds, probes = [], []
        for i in range(10):
            sheds.append(await infer(single, f"single-{i}"))
            for path in ("/v2/health/live", "/v2/health/ready"):
                t0 = time.perf_counter()
                assert (await single.get(path)).status_code == 200
                probes.append(time.perf_counter() - t0)
        window = time.monotonic() - t_burst
        return {"burst": list(await burst), "single": sheds, "probes": probes, "window": [window]}


def _small_queue(model_repo: Path) -> Settings:
    """Room for two requests behind the running batch; one batch at a time."""
    return Settings(
        model_repository=model_repo,
        max_queue_images=QUEUE,
        max_batch_size=IMAGES,
        inference_threads=1,
        retry_after_s=2,
    )


def test_overload_sheds_fast_keeps_health_and_recovers(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with LiveServer(_small_queue(model_repo)) as server:
        model = loaded_model(server)
        batches = slow_down(monkeypatch, model, BATCH_S)
        assert model.batcher.queued_images == 0  # the burst below is all the queue holds
        out = asyncio.run(overload(server.url, model))

        results = out["burst"] + out["single"]
        ok = [r for _, r, _ in results if r.status_code == 200]
        shed = [r for _, r, _ in results if r.status_code == 503]
        assert len(ok) + len(shed) == len(results), {r.status_code for _, r, _ in results}
        for rid, r, _ in results:  # one answer per request, carrying its id
            assert r.headers["x-request-id"] == rid
        for r in ok:
            assert len(r.json()["outputs"][0]["data"]) == IMAGES
        for r in shed:
            assert r.headers["retry-after"] == "2"
            assert "queue full" in r.json()["error"] and "retry after 2 s" in r.json()["fix"]
        assert len(ok) >= 1 + QUEUE // IMAGES  # one batch running, a full queue behind it
        # Every accepted image ran exactly once; shed ones never reached the model.
        assert sum(batches) == IMAGES * len(ok)

        # While the queue was full, requests were refused at once, not after a batch (2 s), and
        # health answered as fast.
        single_s = np.array([t for *_, t in out["single"]])
        assert all(r.status_code == 503 for _, r, _ in out["single"])
        assert out["window"][0] < BATCH_S  # ...all of them inside one batch's run time
        print(
            f"\noverload: burst {BURST} x {IMAGES} images, queue {QUEUE} images, {BATCH_S} s "
            f"batches: {len(ok)} served; single requests while full: shed p50 "
            f"{np.median(single_s) * 1000:.0f} ms, max {single_s.max() * 1000:.0f} ms; "
            f"health max {max(out['probes']) * 1000:.0f} ms"
        )
        assert single_s.max() < BATCH_S / 4 and max(out["probes"]) < BATCH_S / 4

        text = httpx.get(f"{server.url}/metrics").text
        shed_count = metric(text, "notsure_shed_requests_total", model=RCE, reason="queue_full")
        assert shed_count == len(shed)

        # Load gone: everything is served again, and nothing is left queued.
        monkeypatch.undo()  # the model at full speed again
        for i in range(4):
            body, headers = v2_binary(pixels(IMAGES, seed=i))
            r = httpx.post(f"{server.url}/v2/models/{RCE}/infer", content=body, headers=headers)
            assert r.status_code == 200
        assert model.batcher.queued_images == 0
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200


def test_a_full_queue_refuses_before_the_body_arrives(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the queue full, a request is refused from its headers alone: the client that
    announced a megabyte and sent none of it gets its 503 at once."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    with LiveServer(_small_queue(model_repo)) as server:
        model = loaded_model(server)
        slow_down(monkeypatch, model, BATCH_S)
        assert model.batcher.max_queue_images == QUEUE  # the settings reached the batcher

        def post(i: int) -> int:
            body, headers = v2_binary(pixels(IMAGES, seed=i))
            url = f"{server.url}/v2/models/{RCE}/infer"
            return httpx.post(url, content=body, headers=headers, timeout=30).status_code

        with ThreadPoolExecutor(3) as pool:
            burst = [pool.submit(post, i) for i in range(3)]  # one runs, two fill the queue
            deadline = time.monotonic() + 10
            while model.batcher.queued_images < QUEUE and time.monotonic() < deadline:
                time.sleep(0.01)
            assert model.batcher.queued_images == QUEUE
            for path in (f"/v2/models/{RCE}/infer", f"/v1/models/{RCE}/predict"):
                with socket.create_connection(("127.0.0.1", server.port), timeout=BATCH_S / 4) as s:
                    s.sendall(
                        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        f"Content-Length: 1000000\r\n\r\n".encode()
                    )
                    head = s.recv(4096)  # times out (the test fails) if the server waits
                assert head.startswith(b"HTTP/1.1 503"), head[:80]
                assert b"retry-after: 2" in head.lower()
            assert sorted(f.result() for f in burst) == [200, 200, 200]
        text = httpx.get(f"{server.url}/metrics").text
        assert metric(text, "notsure_shed_requests_total", model=RCE, reason="queue_full") == 2
