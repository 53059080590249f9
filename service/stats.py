"""Cumulative statistics of one model version since it loaded, as Triton's statistics extension
reports them (`service.v2extensions` renders them for HTTP and gRPC).

Two kinds of events feed them, where the work happens:

- per batch, the batcher (`ModelStats` is one of its observers): a batch that ran counts one
  execution, its images under their batch size, and, for each of its requests, the request's
  queue wait and the batch's three compute steps (Triton counts those per request too, so that
  ns / count is a request's average);
- per request, its `Call`: answered (success, its images) or not (fail), from its arrival.

Every update takes one lock for a few integer additions (about a microsecond a batch and half
of one a request); all updates happen on the event loop's thread, so the lock only guards
against a reader elsewhere.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from service.batch_timing import BatchRun

# The steps of inference_stats, in the protocol's order; cache_hit/cache_miss stay zero (notsure
# keeps no response cache) but are reported, as clients read them unconditionally.
STEPS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
BATCH_STEPS = ("compute_input", "compute_infer", "compute_output")


@dataclass(frozen=True)
class Duration:
    """How many times a step happened and their total duration (Triton's StatisticDuration)."""

    count: int = 0
    ns: int = 0


@dataclass(frozen=True)
class BatchSizeStats:
    """The executions of one batch size: each compute step counted once per execution."""

    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration


@dataclass(frozen=True)
class Snapshot:
    """A copy of a version's statistics at one instant."""

    last_inference_ms: int  # wall clock, ms since the epoch; 0 before the first request
    inference_count: int  # images of answered requests
    execution_count: int  # batches run to completion
    steps: dict[str, Duration]  # by STEPS
    batches: dict[int, BatchSizeStats]  # by batch size (images), ascending


class ModelStats:
    """The cumulative statistics of one loaded model version."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ns = 0  # perf_counter_ns when the last request ended (0: none yet)
        self._images = 0
        self._executions = 0
        # Flat counters, cheaper to add to than objects: count, ns of each of STEPS in turn...
        self._steps = [0] * (2 * len(STEPS))
        # ... and by batch size (images), count, ns of each of BATCH_STEPS in turn.
        self._batches: dict[int, list[int]] = {}

    # -- the batcher's observer ------------------------------------------------------------------

    def on_dispatch(self, batch_images: int, waits_s: Sequence[float], queued: int) -> None:
        pass  # queue waits are counted with the batch's outcome, in on_complete

    def on_complete(self, run: BatchRun, failed: bool) -> None:
        """A batch finished: a failed one counts nowhere here (its requests count as failed)."""
        if failed:
            return
        n = run.requests
        # compute_input: joining the requests' images and handing them to an inference thread;
        # compute_infer: the model's run; compute_output: scores from its output, split per
        # request and back on the event loop.
        t_in, t_infer = run.ran - run.started, run.inferred - run.ran
        t_out = run.finished - run.inferred
        with self._lock:
            self._executions += 1
            s = self._steps  # queue, compute_input, compute_infer, compute_output: 4..11
            s[4] += n
            s[5] += run.wait_ns
            s[6] += n
            s[7] += n * t_in
            s[8] += n
            s[9] += n * t_infer
            s[10] += n
            s[11] += n * t_out
            b = self._batches.get(run.images)
            if b is None:
                b = self._batches[run.images] = [0] * (2 * len(BATCH_STEPS))
            b[0] += 1
            b[1] += t_in
            b[2] += 1
            b[3] += t_infer
            b[4] += 1
            b[5] += t_out

    # -- requests (through their Call) -----------------------------------------------------------

    def succeeded(self, images: int, arrived_ns: int) -> None:
        """A request was answered: `images` decisions, from its arrival (perf_counter_ns)."""
        now = time.perf_counter_ns()
        with self._lock:
            self._images += images
            self._steps[0] += 1
            self._steps[1] += now - (arrived_ns or now)
            self._last_ns = now

    def failed(self, arrived_ns: int) -> None:
        """A request for this version ended without an answer (refused, invalid, timed out,
        its batch failed or its client went away)."""
        now = time.perf_counter_ns()
        with self._lock:
            self._steps[2] += 1
            self._steps[3] += now - (arrived_ns or now)
            self._last_ns = now

    def snapshot(self) -> Snapshot:
        with self._lock:
            steps, last_ns = list(self._steps), self._last_ns
            images, executions = self._images, self._executions
            batches = {size: list(b) for size, b in sorted(self._batches.items())}
        # The wall clock of the last request: now, less how long ago it was.
        ago_ns = time.perf_counter_ns() - last_ns
        return Snapshot(
            last_inference_ms=(time.time_ns() - ago_ns) // 1_000_000 if last_ns else 0,
            inference_count=images,
            execution_count=executions,
            steps={name: Duration(*steps[2 * i : 2 * i + 2]) for i, name in enumerate(STEPS)},
            batches={
                size: BatchSizeStats(*(Duration(*b[2 * i : 2 * i + 2]) for i in range(3)))
                for size, b in batches.items()
            },
        )
