"""Slow and idle clients against a real `notsure serve`: connections that send nothing, trickle
their headers a byte at a time or stall in the body are answered 408 and closed within the
configured timeout, while normal requests keep their latency; a client that is merely slow but
within the limits is served; connections beyond the cap are refused at once. The same probe
against plain uvicorn shows what the limits fix: there, every slow connection stays open."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

from benchmarks.soak import ServeProcess
from service.config import Settings
from service.main import create_app
from tests.conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.integration]

HEADER_TIMEOUT_S, BODY_TIMEOUT_S = 2.0, 2.0
SLACK_S = 1.0  # timer granularity plus a busy 2-core machine
PREDICT = "/v1/models/tiny-rce/predict"
ONE_IMAGE = (
    b'{"instances": [' + b"[" + b",".join([b"[" + b",".join([b"0.5"] * 28) + b"]"] * 28) + b"]]}"
)
HEAD = (
    f"POST {PREDICT} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
    f"content-length: {len(ONE_IMAGE)}\r\n\r\n"
).encode()


@dataclass
class Probe:
    mode: str  # idle | trickle_head | stall_body | slow_ok
    closed_after_s: float | None = None  # when the server closed it (None: still open)
    answer: bytes = b""

    @property
    def status(self) -> int | None:
        return int(self.answer.split(b" ", 2)[1]) if self.answer.startswith(b"HTTP/1.1 ") else None


async def run_probe(port: int, mode: str, watch_s: float, gap_s: float = 0.5) -> Probe:
    """One connection misbehaving in `mode` for at most watch_s seconds."""
    probe = Probe(mode)
    t0 = time.monotonic()  # before connecting: the server's timer starts once it accepts
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if mode == "stall_body":  # whole head, 10 bytes of body, then nothing
        writer.write(HEAD + ONE_IMAGE[:10])
    chunks: list[bytes] = []
    if mode == "trickle_head":
        chunks = [HEAD[i : i + 1] for i in range(len(HEAD))]
    elif mode == "slow_ok":  # the head in 3 parts, then the body in 3 parts: each gap < timeouts
        third = len(ONE_IMAGE) // 3
        chunks = [HEAD[:20], HEAD[20:40], HEAD[40:], ONE_IMAGE[:third],
                  ONE_IMAGE[third : 2 * third], ONE_IMAGE[2 * third :]]  # fmt: skip
    try:
        while time.monotonic() - t0 < watch_s:
            if chunks:
                writer.write(chunks.pop(0))
            try:
                data = await asyncio.wait_for(reader.read(65536), timeout=gap_s)
            except TimeoutError:
                continue
            if not data:
                probe.closed_after_s = time.monotonic() - t0
                break
            probe.answer += data
            if mode == "slow_ok" and b"\r\n\r\n" in probe.answer:
                break
    except ConnectionError:
        probe.closed_after_s = time.monotonic() - t0
    writer.close()
    return probe


def latencies_ms(url: str, n: int) -> list[float]:
    """n sequential one-image predictions on one keep-alive connection."""
    out = []
    with httpx.Client(base_url=url, timeout=10) as client:
        for _ in range(n):
            t0 = time.perf_counter()
            r = client.post(
                PREDICT, content=ONE_IMAGE, headers={"content-type": "application/json"}
            )
            out.append((time.perf_counter() - t0) * 1000)
            assert r.status_code == 200, r.text
    return out


async def probe_while_serving(
    port: int, url: str, counts: dict[str, int], watch_s: float
) -> tuple[list[Probe], list[float]]:
    """Open the slow connections, then time normal requests while they are held."""
    tasks = [asyncio.create_task(run_probe(port, mode, watch_s))
             for mode, n in counts.items() for _ in range(n)]  # fmt: skip
    await asyncio.sleep(0.3)  # every slow connection is open before the timing starts
    during = await asyncio.to_thread(latencies_ms, url, 60)
    return list(await asyncio.gather(*tasks)), during


@pytest.fixture
def guarded(serve: Callable[..., ServeProcess]) -> ServeProcess:
    return serve(header_timeout_s=str(HEADER_TIMEOUT_S), body_timeout_s=str(BODY_TIMEOUT_S),
                 max_connections="400")  # fmt: skip


def test_slow_and_idle_connections_are_closed_while_normal_requests_are_answered(
    guarded: ServeProcess,
) -> None:
    latencies_ms(guarded.url, 20)  # warm-up
    before = statistics.median(latencies_ms(guarded.url, 60))
    counts = {"idle": 100, "trickle_head": 100, "stall_body": 50, "slow_ok": 5}
    watch_s = HEADER_TIMEOUT_S + 4
    probes, during = asyncio.run(probe_while_serving(guarded.port, guarded.url, counts, watch_s))
    p50 = statistics.median(during)
    print(f"\np50 one-image predict: {before:.1f} ms alone, {p50:.1f} ms beside "
          f"{sum(counts.values())} slow connections")  # fmt: skip
    for p in probes:
        if p.mode == "slow_ok":
            assert p.status == 200, p  # slow but within both limits: served
            continue
        limit = HEADER_TIMEOUT_S if p.mode != "stall_body" else BODY_TIMEOUT_S
        assert p.closed_after_s is not None, f"{p.mode} connection still open after {watch_s} s"
        # The event loop's timers (libuv's) count whole milliseconds: a close 17 us before
        # the timeout, measured from before the connect, was seen on CI.
        assert limit - 0.02 <= p.closed_after_s <= limit + SLACK_S, p
        assert p.status == 408, p
    # Normal requests were all answered (200, checked as they ran) beside the slow connections.
    # Their latency is printed above, not asserted: a timed unit test on this shared 2-core
    # machine failed on noise (2.9 -> 8.3 ms in one idle run, 4.7 -> 4.2 ms in another);
    # docs/deployment.md reports the measured figures.


def test_connections_beyond_the_cap_are_refused_at_once(serve: Callable[..., ServeProcess]) -> None:
    cap = 30
    server = serve(max_connections=str(cap), header_timeout_s=str(HEADER_TIMEOUT_S))

    async def scenario() -> tuple[list[Probe], Probe]:
        held = [asyncio.create_task(run_probe(server.port, "idle", 1.0)) for _ in range(cap)]
        await asyncio.sleep(0.3)
        extra = await run_probe(server.port, "idle", 1.0)
        return list(await asyncio.gather(*held)), extra

    held, extra = asyncio.run(scenario())
    assert extra.status == 503 and extra.closed_after_s is not None and extra.closed_after_s < 0.5
    assert all(p.closed_after_s is None for p in held), held  # the first `cap` stay open
    # Once those are gone, connections are accepted again.
    assert httpx.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 200


@pytest.fixture
def plain_uvicorn(model_repo: Path) -> Iterator[int]:
    """The same app on uvicorn's own httptools protocol, without the limits."""
    port = free_port()
    settings = Settings(model_repository=model_repo, host="127.0.0.1", port=port, device="cpu")
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           http="httptools", log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(timeout=30)


def test_the_probe_catches_a_server_without_the_limits(plain_uvicorn: int) -> None:
    counts = {"idle": 20, "trickle_head": 20, "stall_body": 20}
    url = f"http://127.0.0.1:{plain_uvicorn}"
    probes, _ = asyncio.run(probe_while_serving(plain_uvicorn, url, counts, HEADER_TIMEOUT_S + 2))
    assert all(p.closed_after_s is None for p in probes)
