"""When each step of a batch happened: the batch's record (`BatchRun`) that metrics and statistics
read, the per-request `Stamps` that tracing reads, and `note_inferred`, by which a run function
marks the moment the model returned (before scoring)."""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import numpy.typing as npt

R = TypeVar("R")
F32 = npt.NDArray[np.float32]


@dataclass(slots=True)
class BatchRun:
    """One batch the batcher ran: its size, and when (time.perf_counter_ns) each step began;
    the last three are filled in when it ends (all `finished` when it failed)."""

    images: int
    requests: int
    wait_ns: int  # the requests' time in the queue, added up
    started: int  # taken from the queue; its inputs are then joined and handed to a thread
    ran: int  # the run function began
    inferred: int  # the model returned (`note_inferred`; the run's end when it never says)
    finished: int  # the results were back on the event loop


class BatchObserver(Protocol):
    """Receives batching events (the service turns them into Prometheus metrics and the
    statistics of `service.stats`)."""

    def on_dispatch(self, batch_images: int, waits_s: Sequence[float], queued: int) -> None: ...
    def on_complete(self, run: BatchRun, failed: bool) -> None: ...


@dataclass(slots=True)
class Stamps:
    """When (time.perf_counter_ns) a request passed each step of the batcher: queued, its batch
    started, onnxruntime returned (`note_inferred`) and the batch's results were ready. Only
    requests that ask for them (tracing) carry them."""

    queued: int = 0
    started: int = 0
    inferred: int = 0
    done: int = 0


# The stamps of the batch a run function is running, for `note_inferred`.
RUNNING_STAMPS: contextvars.ContextVar[list[Stamps]] = contextvars.ContextVar(
    "notsure_batch_stamps"
)
# When the model of the batch running on this thread returned (0: not yet), for `execute`.
_THREAD = threading.local()


def note_inferred() -> None:
    """Called by a run function when the model has run (before scoring): marks the batch's
    time (and its traced requests' stamps)."""
    now = _THREAD.inferred = time.perf_counter_ns()
    stamps = RUNNING_STAMPS.get(None)
    if stamps:
        for s in stamps:
            s.inferred = now


def execute(
    run: Callable[[F32, list[int]], list[R]], x: F32, sizes: list[int]
) -> tuple[list[R], int, int]:
    """Run one batch on this thread: its results, when the run began and when its model
    returned (perf_counter_ns)."""
    _THREAD.inferred = 0
    ran = time.perf_counter_ns()
    results = run(x, sizes)
    return results, ran, _THREAD.inferred or time.perf_counter_ns()
