"""The steps every transport shares: find the model, shed early, queue the images, decide."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from service.call import Call
from service.errors import DeadlineExceeded, Overloaded, ShuttingDown
from service.metrics import observe_many
from service.repository import LoadedModel
from service.scoring import NOT_SURE, Scores, decide
from service.state import AppState

# notsure_rejected_total{reason}: requests refused before inference (the dashboard's
# "Rejections" panel and the 5xx alert point operators at it).
REJECTED = {Overloaded: "queue_full", DeadlineExceeded: "timeout", ShuttingDown: "shutting_down"}


@dataclass(frozen=True)
class Outcome:
    """A request's scores, the T applied to them and the decision: label or NOT_SURE (-1)."""

    scores: Scores
    threshold: float
    labels: npt.NDArray[np.int64]

    @property
    def accepted(self) -> npt.NDArray[np.bool_]:
        accepted: npt.NDArray[np.bool_] = self.labels != NOT_SURE
        return accepted


def resolve(state: AppState, call: Call, name: str, version: int | None) -> LoadedModel:
    """The ready model version a request is for; noted on the call for the metrics."""
    if name in state.repository.versions:
        call.enter(name, state.metrics.inflight_of(name, ""))
    model = state.repository.get(name, version)
    call.version = str(model.version)
    return model


def _count_rejection(state: AppState, model: LoadedModel, exc: Exception) -> None:
    state.metrics.rejected_of(model.name, str(model.version), REJECTED[type(exc)]).inc()


def shed_early(state: AppState, model: LoadedModel) -> None:
    """Refuse with 503 before the body is read when the queue cannot take one more image: a
    shed then costs neither the upload nor the parsing."""
    try:
        model.batcher.admit(1)
    except Overloaded as exc:
        _count_rejection(state, model, exc)
        raise


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
        scores = await model.batcher.submit(x, wait)
    except (Overloaded, DeadlineExceeded, ShuttingDown) as exc:
        _count_rejection(state, model, exc)
        raise
    outcome = Outcome(scores, threshold, decide(scores, threshold))
    n_acc = int(outcome.accepted.sum())
    m = state.metrics
    if n_acc:
        m.predictions_of(*labels, "accepted").inc(n_acc)
    if len(scores) - n_acc:
        m.predictions_of(*labels, "not_sure").inc(len(scores) - n_acc)
    observe_many(m.j_score_of(*labels), scores.j_score)
    observe_many(m.score_of(*labels, scores.score_name), scores.score)
    state.recent.record(model.name, scores.score, outcome.accepted)
    return outcome
