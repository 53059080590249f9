"""Prometheus metrics. One registry per app, so tests and several apps in a process don't clash.

Refuse rate of a model = rate(notsure_predictions_total{decision="not_sure"}) /
rate(notsure_predictions_total). What the refuse rate and the scores should look like (the
calibration) and how far recent answers are from it: `service.monitor`.
"""

from __future__ import annotations

import platform
from bisect import bisect_left
from collections.abc import Sequence
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import numpy.typing as npt
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from service.batch_timing import BatchRun
from service.procmetrics import WorkerProcessCollector
from service.scoring import ScoreName
from service.version import service_version

M = TypeVar("M", Counter, Gauge, Histogram)
SCORE_HELP: dict[ScoreName, str] = {
    "j_score": "J-score (confidence x kernel non-ME)",
    "confidence": "Confidence (max softmax probability)",
    "energy": "Energy (logsumexp of the logits)",
    "k_density": "K-density of the final hidden vector",
}


def _ort_version() -> str:
    from onnxruntime import __version__

    return str(__version__)


LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
J_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # 0.05 ... 1.0
# Each score has its own histogram, with buckets where its values fall (the bundled models'
# held-out quantiles, manifest score_references): one set of bounds cannot resolve both a
# confidence, whose clean values crowd into [0.97, 1] (CE T = 0.976-0.989), and an energy.
SCORE_BUCKETS: dict[ScoreName, tuple[float, ...]] = {
    # [0, 1]; clean RCE J-scores spread over it (T = 0.41-0.67).
    "j_score": J_BUCKETS,
    # [1/L, 1]; fine steps near 1, where clean images and the CE thresholds are.
    "confidence": (
        0.2,
        0.3,
        0.4,
        0.5,
        0.6,
        0.7,
        0.8,
        0.9,
        0.95,
        0.97,
        0.98,
        0.99,
        0.995,
        0.998,
        0.999,
        0.9995,
        0.9999,
        1.0,
    ),
    # logsumexp of the logits: any real number; 2-21 on the bundled models' held-out images.
    "energy": (
        0.0,
        1.0,
        2.0,
        2.5,
        3.0,
        3.5,
        4.0,
        5.0,
        6.0,
        7.0,
        8.0,
        10.0,
        12.0,
        14.0,
        16.0,
        18.0,
        20.0,
        25.0,
        30.0,
        50.0,
        100.0,
    ),
    # [0, 1], often tiny (median 1e-4 on one bundled model): log-spaced at the low end.
    "k_density": (
        1e-5,
        1e-4,
        3e-4,
        1e-3,
        3e-3,
        0.01,
        0.03,
        0.05,
        0.1,
        0.2,
        0.3,
        0.4,
        0.5,
        0.6,
        0.7,
        0.8,
        0.9,
        1.0,
    ),
}
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """All of the service's metrics, registered in `self.registry`."""

    def __init__(
        self, registry: CollectorRegistry | None = None, multiprocess_dir: Path | None = None
    ) -> None:
        """`multiprocess_dir`: the folder where every worker of a multi-process server keeps
        its values (prometheus_client's multiprocess mode); /metrics then adds them up."""
        r = self.registry = registry or CollectorRegistry()
        self.multiprocess_dir = multiprocess_dir
        per_version = ["model", "version"]
        # protocol: http or grpc. endpoint: the HTTP route template or the gRPC method
        # (/inference.GRPCInferenceService/ModelInfer). code: the HTTP status, for gRPC the
        # status the same answer gets over HTTP, so one 5xx rate (dashboard, alerts) covers both.
        self.requests = Counter(
            "notsure_requests",
            "Requests by protocol, route or method, and status code.",
            ["model", "version", "endpoint", "code", "protocol"],
            registry=r,
        )
        self.predictions = Counter(
            "notsure_predictions",
            "Images answered, by decision (accepted or not_sure).",
            [*per_version, "decision"],
            registry=r,
        )
        self.certificates = Counter(
            "notsure_certificates",
            "Images answered by a model with a bound graph, by whether the predicted label was "
            "certified on the ball of the manifest's certify_eps (true or false).",
            [*per_version, "certified"],
            registry=r,
        )
        # One histogram per score (notsure_j_score, notsure_confidence, notsure_energy,
        # notsure_k_density), each with its own buckets; K-density only where it is served.
        self.scores = {
            name: Histogram(
                f"notsure_{name}",
                f"{SCORE_HELP[name]} of each answered image.",
                per_version,
                buckets=buckets,
                registry=r,
            )
            for name, buckets in SCORE_BUCKETS.items()
        }
        self.request_latency = Histogram(
            "notsure_request_duration_seconds",
            "Time from request received to response ready.",
            ["model", "version", "endpoint", "protocol"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "notsure_queue_wait_seconds",
            "Time an image waited in the batching queue.",
            per_version,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_time = Histogram(
            "notsure_inference_duration_seconds",
            "onnxruntime run time of one batch.",
            per_version,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "notsure_batch_size",
            "Images per executed batch.",
            per_version,
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        # multiprocess_mode: how the workers' values add up (ignored with one process).
        self.inflight = Gauge(
            "notsure_inflight_requests", "Requests being handled right now.", per_version,
            registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.queue_depth = Gauge(
            "notsure_queue_images", "Images waiting in the batching queue.", per_version,
            registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        # Load shedding (not the domain's NOT SURE, which is an answer): requests turned away
        # before inference because the queue was full, their deadline passed or the server was
        # draining.
        self.shed = Counter(
            "notsure_shed_requests",
            "Requests shed before inference, by reason (queue_full, timeout, shutting_down).",
            [*per_version, "reason"],
            registry=r,
        )
        self.batch_failures = Counter(
            "notsure_batch_failures", "Batches whose inference raised.", per_version, registry=r
        )
        self.model_ready = Gauge(
            "notsure_model_ready",
            "1 when the model version loaded and serves, else 0.",
            per_version,
            registry=r,
            multiprocess_mode="livemin",  # 1 when it serves in every worker
        )
        self.model_info = Gauge(
            "notsure_model_info",
            "Static facts about a loaded model version (value is 1); score: the served score.",
            [*per_version, "provider", "objective", "architecture", "score"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.threshold = Gauge(
            "notsure_threshold",
            "T of each score of a model version: the served score's is the T in force (accepted "
            "iff score >= T), the others' are the manifest's.",
            [*per_version, "score"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.build_info = Gauge(
            "notsure_build_info",
            "The running service (value is 1): its version and those of Python and onnxruntime.",
            ["version", "python", "onnxruntime"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.build_info.labels(service_version(), platform.python_version(), _ort_version()).set(1)
        if multiprocess_dir is None:
            # process_* (CPU, memory, file descriptors) and python_info of this process; with
            # several workers, exposition() adds every worker's.
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        # The series every request touches, by label values.
        self.requests_of = Children(self.requests)
        self.latency_of = Children(self.request_latency)
        self.predictions_of = Children(self.predictions)
        self.certificates_of = Children(self.certificates)
        self.inflight_of = Children(self.inflight)
        self.shed_of = Children(self.shed)

    def exposition(self) -> bytes:
        """The text /metrics answers: this process's metrics, or every worker's added up."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=str(self.multiprocess_dir))  # type: ignore[no-untyped-call]
        # prometheus_client keeps no process metrics in multiprocess mode: read every live
        # worker's from /proc, each series labelled with its pid.
        merged.register(WorkerProcessCollector(self.multiprocess_dir))
        PlatformCollector(registry=merged)
        return generate_latest(merged)


class Children(Generic[M]):
    """A metric's labelled series, each looked up once: `labels()` validates the values and
    takes the metric's lock, microseconds a call, several calls a request."""

    def __init__(self, metric: M) -> None:
        self._metric: M = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *labels: str) -> M:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._metric.labels(*labels)
        return child


FEW_OBSERVATIONS = 8


def observe_one(hist: Histogram, value: float) -> None:
    """`hist.observe(value)` on a labelled series, with the bucket found by bisection: observe()
    scans the bounds one by one (29 of them for the score histogram) and checks its arguments
    each time, about 3 us a call, six calls a request."""
    hist._sum.inc(value)  # a NaN makes the sum NaN and lands in no bucket, as with observe()
    if value == value:
        hist._buckets[bisect_left(hist._upper_bounds, value)].inc(1)


def observe_many(hist: Histogram, values: npt.NDArray[np.floating] | Sequence[float]) -> None:
    """`hist.observe(v)` for each value (one labelled series), one increment per bucket
    instead of one lock round per value: 64 images cost 64 x 2 observes otherwise. A few
    values go one by one: there the numpy calls would cost more (30 us for one)."""
    if len(values) <= FEW_OBSERVATIONS:
        for x in values.tolist() if isinstance(values, np.ndarray) else values:
            observe_one(hist, float(x))
        return
    v = np.asarray(values, dtype=np.float64)
    hist._sum.inc(float(v.sum()))  # a NaN makes the sum NaN, as with observe()
    # observe() counts a value in the first bucket whose upper bound is >= it, a NaN in none.
    bounds = np.asarray(hist._upper_bounds, dtype=np.float64)
    v = v[~np.isnan(v)]
    counts = np.bincount(np.searchsorted(bounds, v, side="left"), minlength=len(bounds))
    for i in np.flatnonzero(counts).tolist():
        hist._buckets[i].inc(int(counts[i]))


class BatchMetrics:
    """The batcher's observer for one model version: queue wait, batch size, inference time."""

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        self._wait = metrics.queue_wait.labels(model, version)
        self._size = metrics.batch_size.labels(model, version)
        self._infer = metrics.inference_time.labels(model, version)
        self._depth = metrics.queue_depth.labels(model, version)
        self._failures = metrics.batch_failures.labels(model, version)

    def on_dispatch(self, batch_images: int, waits_s: Sequence[float], queued: int) -> None:
        observe_many(self._wait, waits_s)
        observe_one(self._size, batch_images)
        self._depth.set(queued)

    def on_complete(self, run: BatchRun, failed: bool) -> None:
        observe_one(self._infer, (run.finished - run.started) / 1e9)
        if failed:
            self._failures.inc()
