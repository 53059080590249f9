"""What normal looks like for each served model, and how far recent answers are from it.

Each model version's manifest keeps the held-out clean scores its T was chosen on
(`score_references`) and the share of them T refuses (p0, from n0 images). The monitor keeps
the last `monitor_window` answered images' scores of each version and exports, refreshed every
`monitor_interval_s` by a task of the server's event loop:

- notsure_calibrated_refuse_rate / notsure_calibration_images{model, version}: p0 at the T in
  force (the manifest's refuse rate, or the reference read at an overridden T) and n0;
- notsure_window_images / notsure_window_not_sure{model, version}: N and k, the images in the
  window and those whose served score is below the T in force. A rule tests k against N p0
  (`service.drift.refuse_excess_z`; deploy/prometheus/alerts.yml). With several workers each
  keeps its own window and /metrics adds them up;
- notsure_score_drift_psi{model, version, score}: PSI of the window against the reference, for
  every score the model computes anyway (J-score, confidence, energy; K-density when served).
  With several workers, the largest worker's.

It also observes the per-score histograms and hands NOT SURE answers to the refused-input
records (`service.records`), so that the request path calls one function here.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from prometheus_client import Gauge, Histogram

from service.call import Call
from service.config import Settings
from service.drift import ReferenceBins, psi
from service.metrics import Metrics, observe_many
from service.records import RecordWriter, refused_records
from service.scoring import ScoreName, accept

if TYPE_CHECKING:
    from service.repository import Repository
    from service.runner import LoadedModel
    from service.scoring import Outcome

log = logging.getLogger(__name__)
F64 = npt.NDArray[np.float64]
# Histograms observed for every answer: what every model computes anyway.
ALWAYS: tuple[ScoreName, ...] = ("j_score", "confidence", "energy")
# PSI is exported once the window holds this many images (fewer: too noisy to read).
MIN_DRIFT_IMAGES = 100


class Window:
    """The last `size` values, in a ring."""

    def __init__(self, size: int) -> None:
        self.values = np.zeros(size, np.float64)
        self.count = 0  # values seen in all
        self._at = 0

    def add(self, v: F64) -> None:
        size = len(self.values)
        self.count += len(v)
        v = v[-size:]  # of more values than the window holds, the last ones
        end = self._at + len(v)
        if end <= size:
            self.values[self._at : end] = v
        else:
            first = size - self._at
            self.values[self._at :] = v[:first]
            self.values[: end - size] = v[first:]
        self._at = end % size

    def recent(self) -> F64:
        """The values in the window (oldest first once it is full)."""
        if self.count < len(self.values):
            return self.values[: self.count]
        return np.roll(self.values, -self._at)


@dataclass(eq=False)
class Watch:
    """One model version's windows and gauges."""

    threshold: float  # T in force, of the served score
    served: ScoreName
    windows: dict[ScoreName, Window]
    bins: dict[ScoreName, ReferenceBins]
    hists: dict[ScoreName, Histogram]
    n_images: Gauge
    n_refused: Gauge
    thresholds: tuple[ScoreName, ...]  # the scores whose T is exported
    psi: dict[ScoreName, Gauge] = field(default_factory=dict)


class Monitor:
    """Per model version: score histograms, windows of recent scores, calibrated gauges."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self._watches: dict[tuple[str, int], Watch] = {}
        self.records: RecordWriter | None = refused_records(settings, metrics)
        self._task: asyncio.Task[None] | None = None
        per_version, r = ["model", "version"], metrics.registry
        self.p0 = Gauge(
            "notsure_calibrated_refuse_rate",
            "Share of the held-out clean images refused at the T in force (p0).",
            per_version, registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.n0 = Gauge(
            "notsure_calibration_images",
            "Held-out clean images p0 was measured on (n0).",
            per_version, registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.window_images = Gauge(
            "notsure_window_images",
            "Images in the window of recent answers (at most monitor_window per worker).",
            per_version, registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.window_refused = Gauge(
            "notsure_window_not_sure",
            "Images of the window whose served score is below the T in force.",
            per_version, registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.drift = Gauge(
            "notsure_score_drift_psi",
            "Population stability index of the window's scores against the held-out clean "
            "scores (10 bins of equal reference mass; < 0.1: no shift, > 0.25: a large one).",
            [*per_version, "score"], registry=r, multiprocess_mode="livemax",
        )  # fmt: skip

    # -- start-up -----------------------------------------------------------------------------

    def start(self, repository: Repository) -> None:
        """Gauges for every ready version; the refresh task and the record writer start."""
        for found in repository.all():
            if found.loaded is not None and found.ready:
                self._watch(found.loaded)
        if self.records is not None:
            self.records.start()
        if self.settings.monitor_window:
            self._task = asyncio.get_running_loop().create_task(self._refresh_forever())

    def _watch(self, lm: LoadedModel) -> Watch:
        labels = (lm.name, str(lm.version))
        man = lm.manifest
        thresholds = {**man.score_thresholds, lm.score: lm.threshold}
        for score, t in thresholds.items():
            self.metrics.threshold.labels(*labels, score).set(t)
        ref = man.reference
        if ref is not None:
            p0 = (
                ref.refuse_rate
                if lm.threshold == man.threshold
                else ref.refuse_rate_at(lm.threshold)
            )
            self.p0.labels(*labels).set(p0)
            self.n0.labels(*labels).set(ref.n)
        scores = (*ALWAYS, lm.score) if lm.score not in ALWAYS else ALWAYS
        size = self.settings.monitor_window
        watch = Watch(
            threshold=lm.threshold,
            served=lm.score,
            windows={s: Window(size) for s in scores} if size else {},
            bins={
                s: ReferenceBins.of(man.score_references[s])
                for s in scores
                if s in man.score_references
            },
            hists={s: self.metrics.scores[s].labels(*labels) for s in scores},
            n_images=self.window_images.labels(*labels),
            n_refused=self.window_refused.labels(*labels),
            thresholds=tuple(thresholds),
        )
        self._watches[(lm.name, lm.version)] = watch
        return watch

    # -- model control ------------------------------------------------------------------------

    def watch(self, lm: LoadedModel) -> None:
        """A version that started serving, or whose new files replaced the old ones: gauges at
        its T in force (the old version's series dropped first)."""
        old = self._watches.get((lm.name, lm.version))
        if old is not None:
            self.forget(lm.name, lm.version, old)
        self._watch(lm)

    def forget(self, name: str, version: int, watch: Watch | None = None) -> None:
        """Drop a version's gauges and window (it was unloaded)."""
        watch = watch or self._watches.get((name, version))
        if watch is None:
            return
        del self._watches[(name, version)]
        labels = (name, str(version))
        for score in watch.thresholds:
            self.metrics.threshold.remove(*labels, score)
        for gauge in (self.p0, self.n0, self.window_images, self.window_refused):
            gauge.remove(*labels)
        for score in watch.psi:
            self.drift.remove(*labels, score)

    # -- the request path ---------------------------------------------------------------------

    def observe(
        self, lm: LoadedModel, call: Call, x: npt.NDArray[np.float32], outcome: Outcome
    ) -> None:
        """One request's answers: histograms, windows, and NOT SURE records."""
        watch = self._watches.get((lm.name, lm.version)) or self._watch(lm)
        s = outcome.scores
        for name, hist in watch.hists.items():
            values = s.named(name)
            observe_many(hist, values)
            window = watch.windows.get(name)
            if window is not None:
                window.add(values)
        if self.records is not None:
            refused = np.flatnonzero(~outcome.accepted)
            if len(refused):
                self.records.offer(lm, call.request_id, x, outcome, refused)

    # -- the refresh --------------------------------------------------------------------------

    def refresh(self) -> None:
        """Set the window gauges from the windows as they are now."""
        for (name, version), watch in self._watches.items():
            served = watch.windows.get(watch.served)
            if served is None:
                continue
            recent = served.recent()
            watch.n_images.set(len(recent))
            watch.n_refused.set(int(np.count_nonzero(~accept(recent, watch.threshold))))
            if len(recent) < MIN_DRIFT_IMAGES:
                continue
            for score, bins in watch.bins.items():
                gauge = watch.psi.get(score)
                if gauge is None:
                    gauge = watch.psi[score] = self.drift.labels(name, str(version), score)
                gauge.set(psi(bins, watch.windows[score].recent()))

    async def _refresh_forever(self) -> None:
        while True:
            try:
                self.refresh()
            except Exception:  # a monitoring bug must not stop serving
                log.exception("monitor refresh failed")
            await asyncio.sleep(self.settings.monitor_interval_s)

    async def close(self) -> None:
        """Stop the refresh task; write what the record queue still holds."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.refresh()
        if self.records is not None:
            await asyncio.to_thread(self.records.close)
