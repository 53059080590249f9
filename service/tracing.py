"""OpenTelemetry spans of the service's own steps, for HTTP and gRPC alike (`tracing` setting).

Each answered inference request gets a span `notsure.infer` with four children, timed from
the request's `Call` and the batcher's `Stamps`:

- `decode`: from the request's arrival to its images being ready as one (B, C, H, W) array
  (body read, parsing, PNG/JPEG decoding, checks);
- `queue wait`: in the batching queue, until its batch started;
- `inference`: the batch's onnxruntime run (shared by every request in the batch);
- `scoring`: the thresholding test's scores, the decision at T and the monitor's bookkeeping.

The parent is the caller's trace context: the W3C `traceparent`/`tracestate` HTTP headers or
gRPC metadata, through the globally configured propagator (or, when another instrumentation
already opened a span for the request, that span). Off by default; when on, the API is
imported here and spans go to whatever tracer provider the process configured (the
opentelemetry-sdk with an exporter); without one they are no-ops. The service imports nothing
of OpenTelemetry while tracing is off.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from service.batch_timing import Stamps
from service.call import Call

if TYPE_CHECKING:
    from service.runner import LoadedModel

# The W3C trace context fields the default propagator reads.
TRACE_HEADERS = ("traceparent", "tracestate", "baggage")


def http_carrier(headers: Mapping[bytes, bytes]) -> dict[str, str]:
    """The trace context headers of an ASGI request (lower-case names)."""
    out = {}
    for name in TRACE_HEADERS:
        value = headers.get(name.encode())
        if value is not None:
            out[name] = value.decode("latin-1")
    return out


def grpc_carrier(metadata: Iterable[tuple[str, Any]] | None) -> dict[str, str]:
    """The trace context of a gRPC call's invocation metadata."""
    out = {}
    for key, value in metadata or ():
        k = key.lower()
        if k in TRACE_HEADERS:
            out[k] = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return out


class Tracing:
    """Turns a traced request's timeline into spans."""

    def __init__(self) -> None:
        from opentelemetry import propagate, trace

        self._trace, self._propagate = trace, propagate
        self._tracer = trace.get_tracer("notsure")
        # perf_counter_ns (monotonic, what the steps are stamped with) to epoch nanoseconds.
        self._epoch = time.time_ns() - time.perf_counter_ns()

    def record(self, call: Call, lm: LoadedModel, stamps: Stamps, images: int, refused: int
               ) -> None:  # fmt: skip
        """The request's spans, ending now."""
        trace = self._trace
        end = time.perf_counter_ns()
        current = trace.get_current_span()
        if current.get_span_context().is_valid:
            parent = trace.set_span_in_context(current)
        else:
            parent = self._propagate.extract(call.carrier or {})
        arrived = call.arrived_ns or stamps.queued
        inferred = stamps.inferred or stamps.done
        at = self._epoch
        root = self._tracer.start_span(
            "notsure.infer",
            context=parent,
            start_time=arrived + at,
            attributes={
                "notsure.model": lm.name,
                "notsure.version": lm.version,
                "notsure.request_id": call.request_id,
                "notsure.images": images,
                "notsure.not_sure": refused,
            },
        )
        inside = trace.set_span_in_context(root)
        for name, a, b in (("decode", arrived, stamps.queued),
                           ("queue wait", stamps.queued, stamps.started),
                           ("inference", stamps.started, inferred),
                           ("scoring", inferred, end)):  # fmt: skip
            self._tracer.start_span(name, context=inside, start_time=a + at).end(end_time=b + at)
        root.end(end_time=end + at)
