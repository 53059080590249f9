"""The most recent decisions of each model, for the page's live panel: a bounded ring per model.

Each answered image leaves (time, score, accepted) in its model's ring; the oldest entries are
overwritten once `capacity` images have been answered. The rings live in one server process:
with several workers (`NOTSURE_WORKERS`) each answers from the images it served itself (the
Prometheus counters at /metrics add up all of them).

Recording costs three array assignments per request (no per-image Python loop, and no lock:
every request is recorded on the event loop's thread).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

CAPACITY = 4096  # images kept per model: at 100 images/s, the last 40 s
BINS = 20  # score histogram bins


class _Ring:
    """One model's last `capacity` (time, score, accepted), oldest overwritten first."""

    def __init__(self, capacity: int) -> None:
        self.t = np.zeros(capacity, np.float64)  # time.monotonic() of the answer, s
        self.score = np.zeros(capacity, np.float64)
        self.accepted = np.zeros(capacity, np.bool_)
        self.size = 0  # entries filled (<= capacity)
        self.head = 0  # where the next entry goes

    def add(
        self, now: float, scores: npt.NDArray[np.floating], accepted: npt.NDArray[np.bool_]
    ) -> None:
        cap, n = len(self.t), len(scores)
        if n > cap:  # a batch larger than the ring: only its last `cap` images stay
            scores, accepted, n = scores[-cap:], accepted[-cap:], cap
        at: slice | npt.NDArray[np.intp] = slice(self.head, self.head + n)
        if self.head + n > cap:  # the slots wrap round the end (rarely: a slice is cheaper)
            at = (self.head + np.arange(n)) % cap
        self.t[at] = now
        self.score[at] = scores
        self.accepted[at] = accepted
        self.head = (self.head + n) % cap
        self.size = min(self.size + n, cap)


@dataclass(frozen=True)
class Window:
    """What one model answered in the last `seconds`: counts per second and a score histogram."""

    seconds: int
    accepted: list[int]  # answers per second, oldest second first (len == seconds)
    not_sure: list[int]
    edges: list[float]  # histogram bin edges (BINS + 1), on the score's scale
    hist_accepted: list[int]  # scores per bin among accepted answers
    hist_not_sure: list[int]
    kept: int  # images in the ring (older ones were overwritten)


class RecentDecisions:
    """The rings of every model this process serves, keyed by model name."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._rings: dict[str, _Ring] = {}

    def record(
        self,
        model: str,
        scores: npt.NDArray[np.floating],
        accepted: npt.NDArray[np.bool_],
        now: float | None = None,
    ) -> None:
        """Note one request's (B,) scores and decisions."""
        ring = self._rings.get(model)
        if ring is None:
            ring = self._rings[model] = _Ring(self.capacity)
        ring.add(time.monotonic() if now is None else now, scores, accepted)

    def window(
        self, model: str, seconds: int, score_range: tuple[float, float], now: float | None = None
    ) -> Window:
        """The last `seconds` of `model` (whole seconds ending at `now`); the histogram covers
        `score_range`, widened to the recent scores that fall outside it."""
        now = time.monotonic() if now is None else now
        ring = self._rings.get(model)
        if ring is None:
            t = score = np.zeros(0)
            acc = np.zeros(0, np.bool_)
        else:
            t, score, acc = ring.t[: ring.size], ring.score[: ring.size], ring.accepted[: ring.size]
        age = now - t
        recent = (age >= 0) & (age < seconds)
        t, score, acc = t[recent], score[recent], acc[recent]
        # Second k (0 = the oldest) holds ages in (seconds - k - 1, seconds - k].
        slot = np.clip(seconds - 1 - np.floor(now - t).astype(np.int64), 0, seconds - 1)
        per_acc = np.bincount(slot[acc], minlength=seconds)
        per_ns = np.bincount(slot[~acc], minlength=seconds)
        lo, hi = score_range
        finite = score[np.isfinite(score)]
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
        if not hi > lo:
            hi = lo + 1.0
        edges = np.linspace(lo, hi, BINS + 1)
        h_acc, _ = np.histogram(score[acc], bins=edges)
        h_ns, _ = np.histogram(score[~acc], bins=edges)
        return Window(
            seconds=seconds,
            accepted=per_acc.tolist(),
            not_sure=per_ns.tolist(),
            edges=[float(e) if math.isfinite(e) else 0.0 for e in edges],
            hist_accepted=h_acc.tolist(),
            hist_not_sure=h_ns.tolist(),
            kept=0 if ring is None else ring.size,
        )
