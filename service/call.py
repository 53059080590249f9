"""One request's notes while it is served: a typed record with one owner.

The transport that receives a request (the HTTP middleware, the gRPC servicer) creates its
`Call`, hands it to the inference steps, and closes it when the answer has gone: closing gives
back whatever the call still holds (its place among the arriving requests, its in-flight count,
its model version's statistics when it was never answered, the model version it holds),
whichever way the request ended.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import Gauge

from service.batch_plan import ArrivalTracker
from service.batching import Batcher
from service.stats import ModelStats


@dataclass(slots=True, eq=False)
class Call:
    request_id: str = ""
    model: str = ""  # a model of the repository that the request names ("" for none)
    version: str = ""  # the version that answered it ("" until resolved)
    arrived_ns: int = 0  # time.perf_counter_ns() when the transport received it
    carrier: dict[str, str] | None = None  # the caller's trace context, when tracing
    # Held until the body is in and the images are queued: the batcher waits for such calls.
    _arriving: ArrivalTracker | None = None
    _inflight: Gauge | None = None
    # The statistics of the version an inference request was admitted to, until it is answered.
    _stats: ModelStats | None = None
    # The batcher of the version that admitted it: unloading that version waits for the call.
    _holding: Batcher[Any] | None = None

    def arrive(self, arrivals: ArrivalTracker) -> None:
        """The request's body is on its way: count it until `queued`."""
        if self._arriving is None:
            arrivals.count += 1
            self._arriving = arrivals

    def queued(self) -> None:
        """Its images are queued (or it failed before): it no longer counts as arriving."""
        if self._arriving is not None:
            self._arriving.count -= 1
            self._arriving = None

    def enter(self, model: str, inflight: Gauge) -> None:
        """The request is for this known model: count it in flight until `close`."""
        if self._inflight is None:
            self.model = model
            inflight.inc()
            self._inflight = inflight

    def admitted(self, stats: ModelStats) -> None:
        """An inference request for the version these statistics belong to: it counts there
        as failed when it closes without `answered`."""
        self._stats = stats

    def answered(self, images: int) -> None:
        """The request's `images` decisions are made: a success in its version's statistics."""
        if self._stats is not None:
            self._stats.succeeded(images, self.arrived_ns)
            self._stats = None

    def hold(self, batcher: Batcher[Any]) -> None:
        """The request was admitted for this batcher's model version: hold it until `close`."""
        if self._holding is None:
            batcher.holders += 1
            self._holding = batcher

    def close(self) -> None:
        """The answer has gone: give back everything the call still holds."""
        self.queued()
        if self._stats is not None:
            self._stats.failed(self.arrived_ns)
            self._stats = None
        if self._holding is not None:
            self._holding.holders -= 1
            self._holding = None
        if self._inflight is not None:
            self._inflight.dec()
            self._inflight = None
