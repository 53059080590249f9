"""Cumulative statistics of one model version since it loaded, as Triton's statistics extension
reports them (`service.v2extensions` renders them for HTTP and gRPC).

Two kinds of events feed them, where the work happens:

- per batch, the batcher (`ModelStats` is one of its observers): a batch that ran counts one
  execution, its images under their batch size, and, for each of its requests, the request's
  queue wait and the batch's three compute steps (Triton counts those per request too, so that
  ns / count is a request's average);
- per request, its `Call`: answered (success, its images) or not (fail), from its arrival.

Every update takes one lock for a few integer additions (well under a microsecond); all
updates happen on the event loop's thread, so the lock only guards against a reader elsewhere.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from service.batching import BatchRun

# The steps of inference_stats, in the protocol's order; cache_hit/cache_miss stay zero (notsure
# keeps no response cache) but are reported, as clients read them unconditionally.
STEPS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
BATCH_STEPS = ("compute_input", "compute_infer", "compute_output")


@dataclass(slots=True)
class Duration:
    """How many times a step happened and their total duration (Triton's StatisticDuration)."""

    count: int = 0
    ns: int = 0

    def add(self, count: int, ns: int) -> None:
        self.count += count
        self.ns += ns


@dataclass(slots=True)
class BatchSizeStats:
    """The executions of one batch size: each compute step counted once per execution."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


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
        self._last_inference_ms = 0
        self._inference_count = 0
        self._execution_count = 0
        self._success, self._fail, self._queue = Duration(), Duration(), Duration()
        self._input, self._infer, self._output = Duration(), Duration(), Duration()
        self._batches: dict[int, BatchSizeStats] = {}

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
            self._execution_count += 1
            self._queue.add(n, run.wait_ns)
            self._input.add(n, n * t_in)
            self._infer.add(n, n * t_infer)
            self._output.add(n, n * t_out)
            size = self._batches.get(run.images)
            if size is None:
                size = self._batches[run.images] = BatchSizeStats()
            size.compute_input.add(1, t_in)
            size.compute_infer.add(1, t_infer)
            size.compute_output.add(1, t_out)

    # -- requests (through their Call) -----------------------------------------------------------

    def succeeded(self, images: int, arrived_ns: int) -> None:
        """A request was answered: `images` decisions, from its arrival (perf_counter_ns)."""
        now = time.perf_counter_ns()
        with self._lock:
            self._inference_count += images
            self._success.add(1, now - (arrived_ns or now))
            self._last_inference_ms = time.time_ns() // 1_000_000

    def failed(self, arrived_ns: int) -> None:
        """A request for this version ended without an answer (refused, invalid, timed out,
        its batch failed or its client went away)."""
        now = time.perf_counter_ns()
        with self._lock:
            self._fail.add(1, now - (arrived_ns or now))
            self._last_inference_ms = time.time_ns() // 1_000_000

    def snapshot(self) -> Snapshot:
        with self._lock:
            steps = (self._success, self._fail, self._queue, self._input, self._infer, self._output)
            return Snapshot(
                last_inference_ms=self._last_inference_ms,
                inference_count=self._inference_count,
                execution_count=self._execution_count,
                steps={name: replace(d) for name, d in zip(STEPS, steps, strict=True)},
                batches={
                    size: BatchSizeStats(*(replace(getattr(b, s)) for s in BATCH_STEPS))
                    for size, b in sorted(self._batches.items())
                },
            )
