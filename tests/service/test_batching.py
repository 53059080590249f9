"""Dynamic batching: the pure planner and the asyncio batcher around it."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.batch_plan import ArrivalTracker, Plan, plan
from service.batching import QUIET_S, Batcher, RunFn
from service.errors import (
    DeadlineExceeded,
    InferenceFailed,
    ModelNotReady,
    Overloaded,
    ShuttingDown,
)


def test_plan_empty_queue_waits_for_arrivals() -> None:
    assert plan([], 0.0, max_batch=8, max_delay_s=0.01, arriving=0) == Plan(0, None)


def test_plan_lone_request_runs_at_once_when_nobody_is_coming() -> None:
    assert plan([1], 0.0, max_batch=8, max_delay_s=1.0, arriving=0) == Plan(1)


def test_plan_waits_for_requests_on_the_way() -> None:
    p = plan([1, 1], 0.002, max_batch=8, max_delay_s=0.005, arriving=3)
    assert p.take == 0 and p.wait_s == pytest.approx(0.003)


def test_plan_runs_when_the_oldest_waited_long_enough() -> None:
    assert plan([1, 1], 0.006, max_batch=8, max_delay_s=0.005, arriving=3) == Plan(2)


def test_plan_full_batch_runs_without_waiting() -> None:
    assert plan([4, 4, 4], 0.0, max_batch=8, max_delay_s=1.0, arriving=5) == Plan(2)
    assert plan([8], 0.0, max_batch=8, max_delay_s=1.0, arriving=5) == Plan(1)


def test_plan_oversized_request_is_a_batch_of_its_own() -> None:
    assert plan([100, 1], 0.0, max_batch=8, max_delay_s=1.0, arriving=0) == Plan(1)


def _echo(x: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """Returns each request's own rows: any mix-up between requests shows."""
    bounds = np.cumsum([0, *sizes])
    return [x[a:b, 0, 0, 0].copy() for a, b in itertools.pairwise(bounds)]


def _images(value: float, n: int = 1) -> np.ndarray:
    return np.full((n, 1, 2, 2), value, np.float32)


@pytest.fixture
def executor() -> ThreadPoolExecutor:
    ex = ThreadPoolExecutor(2)
    yield ex
    ex.shutdown()


async def test_lone_request_does_not_wait_the_queue_delay(executor: ThreadPoolExecutor) -> None:
    b = Batcher(_echo, executor, max_batch=64, max_delay_s=2.0, max_queue_images=100)
    t0 = time.perf_counter()
    out = await b.submit(_images(7.0), timeout_s=5)
    assert time.perf_counter() - t0 < 1.0  # far below the 2 s delay
    assert out.tolist() == [7.0]


async def test_concurrent_requests_share_batches_and_get_their_own_rows(
    executor: ThreadPoolExecutor,
) -> None:
    sizes_seen: list[list[int]] = []
    gate = threading.Event()

    def run(x: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
        gate.wait(5)  # hold the first batch so that the rest queue up behind it
        sizes_seen.append(sizes)
        return _echo(x, sizes)

    b = Batcher(run, executor, max_batch=16, max_delay_s=0.0, max_queue_images=100, slots=1)
    tasks = [asyncio.create_task(b.submit(_images(float(i), 2), timeout_s=5)) for i in range(9)]
    await asyncio.sleep(0.05)
    gate.set()
    results = await asyncio.gather(*tasks)
    assert [r.tolist() for r in results] == [[float(i)] * 2 for i in range(9)]
    assert sizes_seen[0] == [2]  # the first ran at once, a batch of its own
    assert sizes_seen[1] == [2] * 8  # the 8 that queued meanwhile ran as one batch of 16


async def test_failed_batch_fails_each_request_and_the_batcher_recovers(
    executor: ThreadPoolExecutor,
) -> None:
    calls = {"n": 0}

    def flaky(x: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("onnxruntime exploded")
        return _echo(x, sizes)

    b = Batcher(flaky, executor, max_batch=8, max_delay_s=0.0, max_queue_images=100)
    with pytest.raises(InferenceFailed):
        await b.submit(_images(1.0), timeout_s=5)
    assert (await b.submit(_images(2.0), timeout_s=5)).tolist() == [2.0]


async def test_wrong_result_count_fails_every_request(executor: ThreadPoolExecutor) -> None:
    b = Batcher(lambda x, sizes: [], executor, max_batch=8, max_delay_s=0.0, max_queue_images=100)
    with pytest.raises(InferenceFailed, match="0 results for 1 requests"):
        await b.submit(_images(1.0), timeout_s=5)


async def test_full_queue_sheds_with_overloaded(executor: ThreadPoolExecutor) -> None:
    gate = threading.Event()

    def slow(x: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
        gate.wait(5)
        return _echo(x, sizes)

    b = Batcher(
        slow, executor, max_batch=4, max_delay_s=0.0, max_queue_images=4, slots=1, retry_after_s=3
    )
    running = asyncio.create_task(b.submit(_images(0.0, 4), timeout_s=5))
    await asyncio.sleep(0.02)
    queued = asyncio.create_task(b.submit(_images(1.0, 4), timeout_s=5))
    await asyncio.sleep(0.02)
    with pytest.raises(Overloaded) as err:
        await b.submit(_images(2.0), timeout_s=5)
    assert err.value.headers() == {"Retry-After": "3"}
    gate.set()
    assert len(await running) == 4 and len(await queued) == 4


async def test_request_past_its_deadline_gets_deadline_exceeded(
    executor: ThreadPoolExecutor,
) -> None:
    gate = threading.Event()

    def slow(x: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
        gate.wait(5)
        return _echo(x, sizes)

    b = Batcher(slow, executor, max_batch=1, max_delay_s=0.0, max_queue_images=10, slots=1)
    first = asyncio.create_task(b.submit(_images(0.0), timeout_s=5))
    await asyncio.sleep(0.02)
    late = asyncio.create_task(b.submit(_images(1.0), timeout_s=0.05))
    await asyncio.sleep(0.1)
    gate.set()
    await first
    with pytest.raises(DeadlineExceeded):
        await late


async def test_waits_for_arrivals_then_batches(executor: ThreadPoolExecutor) -> None:
    seen: list[list[int]] = []

    def run(x: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
        seen.append(sizes)
        return _echo(x, sizes)

    arrivals = ArrivalTracker()
    arrivals.count = 1  # a request is being received
    b = Batcher(run, executor, max_batch=8, max_delay_s=0.2, max_queue_images=10, arrivals=arrivals)
    first = asyncio.create_task(b.submit(_images(1.0), timeout_s=5))
    await asyncio.sleep(0.02)
    arrivals.count = 0
    second = asyncio.create_task(b.submit(_images(2.0), timeout_s=5))
    assert (await first).tolist() == [1.0] and (await second).tolist() == [2.0]
    assert seen == [[1, 1]]


async def test_close_drains_then_refuses(executor: ThreadPoolExecutor) -> None:
    gate = threading.Event()

    def slow(x: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
        gate.wait(5)
        return _echo(x, sizes)

    b = Batcher(slow, executor, max_batch=8, max_delay_s=0.0, max_queue_images=10)
    pending = asyncio.create_task(b.submit(_images(3.0), timeout_s=5))
    await asyncio.sleep(0.02)  # now running, held by the gate
    closing = asyncio.create_task(b.close())
    await asyncio.sleep(0.02)
    with pytest.raises(ShuttingDown):
        await b.submit(_images(1.0), timeout_s=5)
    assert not closing.done()  # close waits for the running batch
    gate.set()
    await closing
    assert (await pending).tolist() == [3.0]


async def test_drain_waits_for_admitted_requests_then_refuses_with_its_error(
    executor: ThreadPoolExecutor,
) -> None:
    """A version being unloaded: a request admitted for it (a holder) but not yet queued, its
    body still arriving, is answered; only then does the batcher refuse, with the given error."""
    b = Batcher(_echo, executor, max_batch=8, max_delay_s=0.0, max_queue_images=10)
    b.holders += 1  # admitted (`Call.hold`), nothing queued yet
    gone = ModelNotReady("model 'm' version 1 was unloaded")
    draining = asyncio.create_task(b.drain(gone, timeout_s=5))
    await asyncio.sleep(0.05)
    assert not draining.done()  # an empty queue is not enough: a holder is on its way
    assert (await b.submit(_images(2.0), timeout_s=5)).tolist() == [2.0]
    b.holders -= 1  # its answer has gone (`Call.close`)
    await asyncio.wait_for(draining, 5)
    with pytest.raises(ModelNotReady, match="was unloaded"):
        await b.submit(_images(1.0), timeout_s=5)


async def test_drain_gives_up_on_holders_after_its_timeout(executor: ThreadPoolExecutor) -> None:
    b = Batcher(_echo, executor, max_batch=8, max_delay_s=0.0, max_queue_images=10)
    b.holders += 1  # a request that never comes back
    start = time.monotonic()
    await b.drain(ModelNotReady("gone"), timeout_s=0.2)
    assert 0.2 <= time.monotonic() - start < 2.0
    with pytest.raises(ModelNotReady):
        await b.submit(_images(1.0), timeout_s=5)


async def test_lone_batch_takes_every_core_and_slot(executor: ThreadPoolExecutor) -> None:
    """An idle server runs the batch on the every-core session; while it runs, nothing else
    starts (the cores are taken), and what queued meanwhile runs as one batch after it,
    narrow: the server was busy a moment ago."""
    calls: list[tuple[str, list[int]]] = []
    gate = threading.Event()

    def narrow(x: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
        calls.append(("narrow", sizes))
        return _echo(x, sizes)

    def lone(x: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
        gate.wait(5)
        calls.append(("lone", sizes))
        return _echo(x, sizes)

    b = Batcher(
        narrow, executor, max_batch=8, max_delay_s=0.0, max_queue_images=100, slots=2,
        run_lone=lone,
    )  # fmt: skip
    first = asyncio.create_task(b.submit(_images(1.0), timeout_s=5))
    await asyncio.sleep(0.02)
    others = [asyncio.create_task(b.submit(_images(float(i)), timeout_s=5)) for i in (2, 3)]
    await asyncio.sleep(0.05)
    assert calls == []  # the two narrow slots stay free-but-held while the lone batch runs
    gate.set()
    assert (await first).tolist() == [1.0]
    assert [(await t).tolist() for t in others] == [[2.0], [3.0]]
    assert calls == [("lone", [1]), ("narrow", [1, 1])]


def _two_slots(
    narrow: RunFn[np.ndarray],
    lone: RunFn[np.ndarray],
    executor: ThreadPoolExecutor,
    arrivals: ArrivalTracker,
    max_batch: int,
) -> Batcher[np.ndarray]:
    """Two narrow slots, and `lone` for a lone batch."""
    return Batcher(
        narrow, executor, max_batch=max_batch, max_delay_s=0.0, max_queue_images=10, slots=2,
        arrivals=arrivals, run_lone=lone,
    )  # fmt: skip


def _recording(seen: list[str]) -> tuple[RunFn[np.ndarray], RunFn[np.ndarray]]:
    """A narrow and a lone run that note which of them ran each batch."""

    def narrow(x: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
        seen.append("narrow")
        return _echo(x, sizes)

    def lone(x: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
        seen.append("lone")
        return _echo(x, sizes)

    return narrow, lone


async def test_batch_runs_narrow_when_requests_are_arriving(executor: ThreadPoolExecutor) -> None:
    seen: list[str] = []
    narrow, lone = _recording(seen)
    arrivals = ArrivalTracker()
    b = _two_slots(narrow, lone, executor, arrivals, max_batch=8)
    await b.submit(_images(1.0), timeout_s=5)
    arrivals.count = 1  # another request is being received: the cores will be needed
    await b.submit(_images(2.0), timeout_s=5)
    assert seen == ["lone", "narrow"]


async def test_lone_batch_only_after_a_quiet_period(executor: ThreadPoolExecutor) -> None:
    """Once two requests overlapped, batches run narrow until nothing has overlapped for
    QUIET_S, even when the queue is empty at the moment a batch starts; sequential requests
    (each sent after the last answer) keep running as lone batches."""
    seen: list[str] = []
    narrow, lone = _recording(seen)
    arrivals = ArrivalTracker()
    b = _two_slots(narrow, lone, executor, arrivals, max_batch=1)
    for v in (1.0, 2.0):  # one after the other: never two at once
        await b.submit(_images(v), timeout_s=5)
    assert seen == ["lone", "lone"]
    # Two at once: the first cannot know that another follows; the second overlaps it.
    await asyncio.gather(*(b.submit(_images(v), timeout_s=5) for v in (3.0, 4.0)))
    await b.submit(_images(5.0), timeout_s=5)  # alone in the queue, but right after a burst
    assert seen[2:] == ["lone", "narrow", "narrow"]
    await asyncio.sleep(QUIET_S * 1.5)
    await b.submit(_images(6.0), timeout_s=5)
    assert seen[5:] == ["lone"]


async def test_small_batch_on_a_quiet_server_runs_on_the_event_loop(
    executor: ThreadPoolExecutor,
) -> None:
    """Up to inline_max_images on a quiet server: on the loop's own thread (the lone run when
    there is one); a larger batch, or any batch while requests overlap, in a worker thread."""
    seen: list[tuple[str, int, bool]] = []
    loop_thread = threading.get_ident()

    def record(kind: str) -> RunFn[np.ndarray]:
        def run(x: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
            seen.append((kind, int(x.shape[0]), threading.get_ident() == loop_thread))
            return _echo(x, sizes)

        return run

    b = Batcher(
        record("narrow"), executor, max_batch=8, max_delay_s=0.0, max_queue_images=100,
        slots=2, run_lone=record("lone"), inline_max_images=2,
    )  # fmt: skip
    assert (await b.submit(_images(1.0, 2), timeout_s=5)).tolist() == [1.0, 1.0]
    await b.submit(_images(3.0, 3), timeout_s=5)
    assert seen == [("lone", 2, True), ("lone", 3, False)]
    await asyncio.gather(*(b.submit(_images(v), timeout_s=5) for v in (4.0, 5.0)))
    await b.submit(_images(6.0), timeout_s=5)  # right after the overlap: not quiet
    assert [on_loop for _, _, on_loop in seen[3:]] == [False, False]


async def test_failed_inline_batch_fails_its_requests_and_frees_the_slots(
    executor: ThreadPoolExecutor,
) -> None:
    calls = itertools.count()

    def flaky(x: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
        if next(calls) == 0:
            raise RuntimeError("onnxruntime exploded")
        return _echo(x, sizes)

    b = Batcher(flaky, executor, max_batch=8, max_delay_s=0.0, max_queue_images=10,
                inline_max_images=1)  # fmt: skip
    with pytest.raises(InferenceFailed):
        await b.submit(_images(1.0), timeout_s=5)
    assert (await b.submit(_images(2.0), timeout_s=5)).tolist() == [2.0]


async def test_failed_lone_batch_gives_back_every_slot(executor: ThreadPoolExecutor) -> None:
    def lone(x: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
        raise RuntimeError("onnxruntime exploded")

    barrier = threading.Barrier(2, timeout=5)

    def narrow(x: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
        barrier.wait()  # returns only when two narrow batches run at the same time
        return _echo(x, sizes)

    arrivals = ArrivalTracker()
    b = _two_slots(narrow, lone, executor, arrivals, max_batch=1)
    with pytest.raises(InferenceFailed):
        await b.submit(_images(1.0), timeout_s=5)
    arrivals.count = 1  # busy from now on: batches run narrow, one slot each
    r = await asyncio.gather(*(b.submit(_images(v), timeout_s=5) for v in (2.0, 3.0)))
    assert [a.tolist() for a in r] == [[2.0], [3.0]]
