"""The step both APIs share: resolve T, queue the images, record the decisions."""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from service.api.deps import AppState
from service.errors import DeadlineExceeded, InvalidInput, ModelNotReady, Overloaded, ShuttingDown
from service.manifest import check_threshold
from service.repository import ModelVersion
from service.scoring import Scores, accept

ARRIVING_KEY = "notsure.arriving"
# notsure_rejected_total{reason}: requests refused before inference (the dashboard's
# "Rejections" panel and the 5xx alert point operators at it).
REJECTED = {Overloaded: "queue_full", DeadlineExceeded: "timeout", ShuttingDown: "shutting_down"}
VERSION_KEY = "notsure.version"


class Call(Protocol):
    """What these steps need of a request: a mutable scope for per-request notes (a Starlette
    Request's ASGI scope, or a plain dict for a gRPC call)."""

    @property
    def scope(self) -> MutableMapping[str, Any]: ...


@dataclass(frozen=True)
class Outcome:
    scores: Scores
    threshold: float

    @property
    def accepted(self) -> npt.NDArray[np.bool_]:
        return accept(self.scores.score, self.threshold)


def resolve(state: AppState, request: Call, name: str, version: int | None) -> ModelVersion:
    """The model version a request is for; noted on the request for the metrics labels."""
    mv = state.repository.get(name, version)
    request.scope[VERSION_KEY] = str(mv.version)
    return mv


def threshold_for(state: AppState, mv: ModelVersion, requested: float | None) -> float:
    if requested is None:
        return mv.threshold
    if not state.settings.allow_request_threshold:
        raise InvalidInput(
            "this server does not accept a per-request threshold",
            field="threshold",
            fix="omit it (the server applies its configured T)",
        )
    try:
        check_threshold(mv.score, requested)
    except ValueError as exc:
        raise InvalidInput(str(exc), field="threshold") from exc
    return requested


def mark_queued(request: Call, state: AppState) -> None:
    """The request's body is in: it no longer counts as arriving for the batcher."""
    if request.scope.pop(ARRIVING_KEY, False):
        state.arrivals.count -= 1


def _count_rejection(state: AppState, mv: ModelVersion, exc: Exception) -> None:
    state.metrics.rejected.labels(mv.name, str(mv.version), REJECTED[type(exc)]).inc()


def shed_early(state: AppState, mv: ModelVersion) -> None:
    """Refuse with 503 before the body is read when the queue cannot take one more image: a
    shed then costs neither the upload nor the parsing."""
    if mv.batcher is None:
        return
    try:
        mv.batcher.admit(1)
    except Overloaded as exc:
        _count_rejection(state, mv, exc)
        raise


async def infer(
    state: AppState,
    request: Call,
    mv: ModelVersion,
    x: npt.NDArray[np.float32],
    threshold: float,
    timeout_s: float | None = None,
) -> Outcome:
    """Run (B, C, H, W) images through the model's batcher and record the decisions; they
    wait in its queue at most `timeout_s` (the request timeout when None or longer)."""
    mark_queued(request, state)
    if mv.batcher is None:
        raise ModelNotReady(f"model {mv.name!r} version {mv.version} is not ready")
    labels = (mv.name, str(mv.version))
    try:
        limit = state.settings.request_timeout_s
        wait = limit if timeout_s is None else min(timeout_s, limit)
        scores = await mv.batcher.submit(x, wait)
    except (Overloaded, DeadlineExceeded, ShuttingDown) as exc:
        _count_rejection(state, mv, exc)
        raise
    outcome = Outcome(scores, threshold)
    n_acc = int(outcome.accepted.sum())
    m = state.metrics
    if n_acc:
        m.predictions.labels(*labels, "accepted").inc(n_acc)
    if len(scores) - n_acc:
        m.predictions.labels(*labels, "not_sure").inc(len(scores) - n_acc)
    hist = m.j_score.labels(*labels)
    for j in scores.j_score.tolist():
        hist.observe(j)
    named = m.score.labels(*labels, scores.score_name)
    for v in scores.score.tolist():
        named.observe(v)
    return outcome
