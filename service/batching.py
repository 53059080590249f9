"""Dynamic batching: requests for one model version are queued and run together.

The decision of what to run next is `service.batch_plan.plan`, a pure function. The `Batcher`
around it owns an asyncio queue and runs batches in a thread pool (onnxruntime releases the
GIL), so the event loop keeps accepting requests while a batch runs.

Unlike a fixed-delay batcher, it only waits for more requests when some are known to be on the
way (parsed but not yet queued), so a request on an idle server runs at once. A batch that has
the machine to itself, a *lone batch*, may also run on every core (`run_lone`) while holding
every slot, since nothing else would use the cores; under load, batches run in parallel on one
slot's share each.
"Idle" means quiet for a while (`QUIET_S`), not merely that the queue happens to be empty at
this instant: under load the queue empties between batches all the time, and each lone batch
then leaves onnxruntime's pool threads spinning on the cores the next batches need. On a quiet
server a small batch (`inline_max_images`) may run on the event loop itself: a millisecond of
inference costs less there than the hand-off to a worker thread and back (about 0.2 ms of
Python per request), and there is nothing else for the loop to do meanwhile.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np
import numpy.typing as npt

from service.batch_plan import ArrivalTracker, plan
from service.batch_timing import RUNNING_STAMPS, BatchObserver, BatchRun, Stamps, execute
from service.errors import DeadlineExceeded, InferenceFailed, Overloaded, ServeError, ShuttingDown

log = logging.getLogger(__name__)
R = TypeVar("R")
F32 = npt.NDArray[np.float32]

# A batch is a lone batch only when no two requests have been in the server at once for this long.
# Sequential requests (one client waiting for each answer) leave gaps of a millisecond or so
# and never overlap; under concurrent load they overlap every few milliseconds.
QUIET_S = 0.05
# What the service runs on the event loop when quiet: batches of at most this many images
# (about 1 ms for the bundled ResNet-32; larger ones would hold up everything else the loop does).
INLINE_MAX_IMAGES = 2


@dataclass
class _Pending(Generic[R]):
    x: F32  # (n, C, H, W)
    future: asyncio.Future[R]
    enqueued: float
    deadline: float
    stamps: Stamps | None = None
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = int(self.x.shape[0])


RunFn = Callable[[F32, list[int]], list[R]]


def _in_context(ctx: contextvars.Context, run: RunFn[R]) -> RunFn[R]:
    def run_in_context(x: F32, sizes: list[int]) -> list[R]:
        return ctx.run(run, x, sizes)

    return run_in_context


class Batcher(Generic[R]):
    """Queues requests of one model version and runs them in batches of up to max_batch images.

    `run(x, sizes)` gets the concatenated images and the per-request counts and must return one
    result per request; any exception (or a wrong count) fails every request of that batch.
    `run_lone`, when given, runs a lone batch: one that starts with every slot free on a quiet
    server (nothing else queued, arriving or running for `QUIET_S`); it holds every slot until it
    ends.
    On a quiet server a batch of up to `inline_max_images` (default 0: none) runs on the event
    loop's thread.
    """

    def __init__(
        self,
        run: RunFn[R],
        executor: Executor,
        *,
        max_batch: int,
        max_delay_s: float,
        max_queue_images: int,
        slots: int = 1,
        retry_after_s: int = 1,
        observers: Sequence[BatchObserver] = (),
        arrivals: ArrivalTracker | None = None,
        run_lone: RunFn[R] | None = None,
        inline_max_images: int = 0,
    ) -> None:
        self._run, self._run_lone, self._executor = run, run_lone, executor
        self.inline_max_images = inline_max_images
        self.max_batch, self.max_delay_s = max_batch, max_delay_s
        self.max_queue_images, self.retry_after_s = max_queue_images, retry_after_s
        self._free_slots = self._slots = slots
        self._observers = tuple(observers)
        self._queue: deque[_Pending[R]] = deque()
        self._queued_images = 0
        self._arrivals = arrivals or ArrivalTracker()
        self._running: set[asyncio.Future[tuple[list[R], int, int]]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._refusal: ServeError | None = None  # what submit raises once closed
        # Requests admitted for this batcher whose answer has not gone yet (`Call.hold`): a
        # version that is unloaded or replaced waits for them (`drain`).
        self.holders = 0
        self._busy_at = -QUIET_S  # when two requests were last in the server at once

    # -- request side ---------------------------------------------------------------------------

    @property
    def queued_images(self) -> int:
        return self._queued_images

    def admit(self, n: int) -> None:
        """Raise Overloaded when n more images would not fit in the queue."""
        if self._queued_images + n > self.max_queue_images:
            raise Overloaded(
                f"queue full ({self._queued_images} images waiting, limit {self.max_queue_images})",
                retry_after_s=self.retry_after_s,
            )

    async def submit(self, x: F32, timeout_s: float, stamps: Stamps | None = None) -> R:
        """Queue (n, C, H, W) images and wait for their result; `stamps`, when given, receive
        the times of its way through the batcher."""
        if self._refusal is not None:
            raise self._refusal
        n = int(x.shape[0])
        self.admit(n)
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        item: _Pending[R] = _Pending(x, loop.create_future(), now, now + timeout_s, stamps)
        if stamps is not None:
            stamps.queued = time.perf_counter_ns()
        self._queue.append(item)
        self._queued_images += n
        if len(self._queue) > 1 or self._running or self._arrivals.count:
            self._busy_at = now
        self._dispatch()
        try:
            return await item.future
        finally:
            if not item.future.done():  # the caller was cancelled (client went away)
                item.future.cancel()

    # -- dispatch side --------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Start as many batches as there are free slots and ready requests."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = time.monotonic()
        while self._queue and self._free_slots > 0:
            self._drop_dead(now)
            if not self._queue:
                break
            decision = plan(
                [p.size for p in self._queue],
                now - self._queue[0].enqueued,
                max_batch=self.max_batch,
                max_delay_s=self.max_delay_s,
                arriving=self._arrivals.count,
            )
            if decision.take == 0:
                if decision.wait_s is not None:
                    loop = asyncio.get_running_loop()
                    self._timer = loop.call_later(decision.wait_s, self._dispatch)
                return
            self._start([self._queue.popleft() for _ in range(decision.take)], now)

    def _drop_dead(self, now: float) -> None:
        """Fail queued requests past their deadline and forget cancelled ones."""
        if all(not p.future.done() and now <= p.deadline for p in self._queue):
            return  # the usual case: nothing to drop, no new queue
        keep: deque[_Pending[R]] = deque()
        for p in self._queue:
            if p.future.done():
                self._queued_images -= p.size
            elif now > p.deadline:
                self._queued_images -= p.size
                p.future.set_exception(
                    DeadlineExceeded(
                        f"waited {now - p.enqueued:.2f} s in the queue, past the request timeout",
                        fix="retry later or raise the timeout",
                    )
                )
            else:
                keep.append(p)
        self._queue = keep

    def _start(self, items: list[_Pending[R]], now: float) -> None:
        started = time.perf_counter_ns()
        if len(items) > 1 or self._queue or self._arrivals.count:
            self._busy_at = now
        quiet = self._free_slots == self._slots and now - self._busy_at >= QUIET_S
        lone = quiet and self._run_lone is not None
        held = self._slots if lone else 1
        self._free_slots -= held
        sizes = [p.size for p in items]
        self._queued_images -= sum(sizes)
        x = items[0].x if len(items) == 1 else np.concatenate([p.x for p in items])
        images = int(x.shape[0])
        waits = [now - p.enqueued for p in items]
        for observer in self._observers:
            observer.on_dispatch(images, waits, self._queued_images)
        loop = asyncio.get_running_loop()
        run = self._run_lone if lone and self._run_lone is not None else self._run
        stamps = [p.stamps for p in items if p.stamps is not None]
        if stamps:  # traced requests: the run function stamps them through the context
            for st in stamps:
                st.started = started
            ctx = contextvars.copy_context()
            ctx.run(RUNNING_STAMPS.set, stamps)
            run = _in_context(ctx, run)
        fut: asyncio.Future[tuple[list[R], int, int]]
        if quiet and images <= self.inline_max_images:
            fut = loop.create_future()
            try:
                fut.set_result(execute(run, x, sizes))
            except Exception as exc:  # reported by _finish, as from a worker thread
                fut.set_exception(exc)
        else:
            fut = loop.run_in_executor(self._executor, execute, run, x, sizes)
        self._running.add(fut)
        # What the observers learn of the batch when it ends, besides its times.
        batch = BatchRun(images, len(items), int(sum(waits) * 1e9), started, 0, 0, 0)
        fut.add_done_callback(lambda f: self._finish(f, items, held, batch))

    def _finish(
        self,
        fut: asyncio.Future[tuple[list[R], int, int]],
        items: list[_Pending[R]],
        held: int,
        batch: BatchRun,
    ) -> None:
        self._running.discard(fut)
        self._free_slots += held
        done = time.perf_counter_ns()
        for p in items:
            if p.stamps is not None:
                p.stamps.done = done
        exc = fut.exception()
        results, ran, inferred = (None, done, done) if exc else fut.result()
        if results is not None and len(results) != len(items):
            exc = InferenceFailed(
                f"batch returned {len(results)} results for {len(items)} requests"
            )
        batch.ran, batch.inferred, batch.finished = ran, inferred, done
        for observer in self._observers:
            observer.on_complete(batch, exc is not None)
        if exc is not None and not isinstance(exc, ServeError):
            # Clients only see a generic InferenceFailed; the cause must reach the log.
            log.error("batch of %d requests failed", len(items), exc_info=exc)
        for i, p in enumerate(items):
            if p.future.done():
                continue
            if exc is not None:
                err = (
                    exc
                    if isinstance(exc, ServeError)
                    else InferenceFailed(
                        "inference failed for this batch; the server keeps serving"
                    )
                )
                p.future.set_exception(err)
            else:
                p.future.set_result(results[i])  # type: ignore[index]
        self._dispatch()

    async def close(self, timeout_s: float = 30.0) -> None:
        """Refuse new requests, then wait until every queued and running batch has finished."""
        self._refusal = ShuttingDown("the server is shutting down", fix="retry on another replica")
        await self._settle(time.monotonic() + timeout_s, holders=False)

    async def drain(self, refusal: ServeError, timeout_s: float) -> None:
        """Wait until every request that holds this batcher (admitted, queued or running) has
        its answer, then refuse new ones with `refusal` (past `timeout_s`, the stragglers get
        it too): for a model version that no new request reaches (unloaded, or replaced)."""
        deadline = time.monotonic() + timeout_s
        await self._settle(deadline, holders=True)
        self._refusal = refusal
        await self._settle(deadline, holders=False)

    async def _settle(self, deadline: float, *, holders: bool) -> None:
        while (
            self._queue or self._running or (holders and self.holders)
        ) and time.monotonic() < deadline:
            self._dispatch()
            await asyncio.sleep(0.01)
