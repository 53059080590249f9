"""What the batcher runs next: `plan`, a pure function of the queue, and the count of requests
on their way (`ArrivalTracker`) that tells it whether waiting for more can fill a batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    take: int  # how many queued requests to run now (0: none)
    wait_s: float | None = None  # when take == 0: re-plan after this long (None: on arrival)


def plan(
    sizes: Sequence[int],
    oldest_wait_s: float,
    *,
    max_batch: int,
    max_delay_s: float,
    arriving: int,
) -> Plan:
    """Decide which queued requests to run now, for a free execution slot.

    Args:
        sizes: images per queued request, oldest first.
        oldest_wait_s: how long the oldest request has waited.
        max_batch: images per batch at most (a larger single request is a batch of its own).
        max_delay_s: longest a request may wait for others to fill the batch.
        arriving: requests being parsed right now that will be queued soon.
    """
    if not sizes:
        return Plan(0, None)
    take, images = 0, 0
    for n in sizes:
        if take and images + n > max_batch:
            return Plan(take)  # the next request would overflow: the batch is as full as it gets
        take, images = take + 1, images + n
    if images >= max_batch or oldest_wait_s >= max_delay_s or arriving == 0:
        return Plan(take)
    return Plan(0, max_delay_s - oldest_wait_s)


class ArrivalTracker:
    """Counts inference requests that the server has started to receive but not yet queued.

    An ASGI middleware increments it when a request arrives and the handler decrements it when
    the request is queued (or fails before), so the count spans the body read.
    """

    def __init__(self) -> None:
        self.count = 0
