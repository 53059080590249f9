"""The steps every transport shares: admit a request (find its model, shed early, mark it
arriving), queue its images, decide."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from service.batch_timing import Stamps
from service.call import Call
from service.errors import DeadlineExceeded, Overloaded, ShuttingDown
from service.runner import LoadedModel
from service.scoring import Outcome, decide
from service.state import AppState

# notsure_shed_requests_total{reason}: requests shed before inference (the dashboard's
# "Shed requests" panel and the 5xx alert point operators at it).
SHED = {Overloaded: "queue_full", DeadlineExceeded: "timeout", ShuttingDown: "shutting_down"}
# The highest version number a request may name, on every protocol.
VERSION_MAX = 1_000_000


def resolve(state: AppState, call: Call, name: str, version: int | None) -> LoadedModel:
    """The ready model version a request is for; noted on the call for the metrics."""
    if name in state.repository.versions:
        call.enter(name, state.metrics.inflight_of(name, ""))
    model = state.repository.get(name, version)
    call.version = str(model.version)
    return model


def _count_shed(state: AppState, model: LoadedModel, exc: Exception) -> None:
    state.metrics.shed_of(model.name, str(model.version), SHED[type(exc)]).inc()


def _shed_early(state: AppState, model: LoadedModel) -> None:
    """Refuse with 503 before the body is read when the queue cannot take one more image: a
    shed then costs neither the upload nor the parsing."""
    try:
        model.batcher.admit(1)
    except Overloaded as exc:
        _count_shed(state, model, exc)
        raise


def admit(state: AppState, call: Call, name: str, version: int | None) -> LoadedModel:
    """Admission, the first step of every inference request whatever its protocol: the model
    version it is for (`resolve`), refused early when its queue is full, and the call marked as
    arriving (the batcher waits for it) until its images are queued by `infer`, and holding the
    version (its unload waits) until the call closes."""
    model = resolve(state, call, name, version)
    call.admitted(model.stats)  # from here on the request counts as a success or a failure
    _shed_early(state, model)
    call.arrive(state.arrivals)
    call.hold(model.batcher)  # an unload or reload of the version waits for this call
    return model


async def infer(
    state: AppState,
    call: Call,
    model: LoadedModel,
    x: npt.NDArray[np.float32],
    threshold: float,
    timeout_s: float | None = None,
) -> Outcome:
    """Run (B, C, H, W) images through the model's batcher and record the decisions; they
    wait in its queue at most `timeout_s` (the request timeout when None or longer)."""
    call.queued()
    labels = (model.name, str(model.version))
    try:
        limit = state.settings.request_timeout_s
        wait = limit if timeout_s is None else min(timeout_s, limit)
        stamps = Stamps() if state.tracing is not None else None
        scores = await model.batcher.submit(x, wait, stamps)
    except (Overloaded, DeadlineExceeded, ShuttingDown) as exc:
        _count_shed(state, model, exc)
        raise
    outcome = Outcome(scores, threshold, decide(scores, threshold))
    call.answered(len(scores))
    n_acc = int(outcome.accepted.sum())
    m = state.metrics
    if n_acc:
        m.predictions_of(*labels, "accepted").inc(n_acc)
    if len(scores) - n_acc:
        m.predictions_of(*labels, "not_sure").inc(len(scores) - n_acc)
    if scores.certified is not None:
        n_cert = int(scores.certified.sum())
        if n_cert:
            m.certificates_of(*labels, "true").inc(n_cert)
        if len(scores) - n_cert:
            m.certificates_of(*labels, "false").inc(len(scores) - n_cert)
    state.monitor.observe(model, call, x, outcome)
    if stamps is not None and state.tracing is not None:
        state.tracing.record(call, model, stamps, len(scores), len(scores) - n_acc)
    state.recent.record(model.name, scores.score, outcome.accepted)
    return outcome
