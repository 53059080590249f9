"""Refused-input records: a sampled, bounded store of NOT SURE answers for someone to label.

Off unless `record_rate` > 0. Each sampled NOT SURE image becomes two files in `record_dir`:
`<stem>.png`, the image as the model saw it (after decoding and resizing, pixels rounded to 8
bits), and `<stem>.json`, what the client was told: request id, model, version, every score,
the score T applied to, T and the predicted label. Stems start with the time in nanoseconds, so
names sort oldest first. Inputs may be private: the folder holds what users sent.

The request path only offers records to a bounded queue (`record_queue`); a writer thread
encodes and writes them, so neither the event loop nor the batcher ever waits on the disk.
When the queue is full the record is dropped and counted (notsure_records_dropped_total).
When the folder holds more than `record_max_bytes` (split evenly between workers) the oldest
records are deleted first.
"""

from __future__ import annotations

import io
import json
import logging
import os
import queue
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from PIL import Image
from prometheus_client import Counter, Gauge

from service.config import Settings
from service.metrics import Metrics

if TYPE_CHECKING:
    from service.runner import LoadedModel
    from service.scoring import Outcome

log = logging.getLogger(__name__)
SCHEMA = 1


@dataclass(frozen=True, slots=True)
class Record:
    """One NOT SURE image and what the client was told about it."""

    meta: dict[str, Any]
    image: npt.NDArray[np.float32]  # (C, H, W) in the model's pixel range


def _meta(
    lm: LoadedModel, request_id: str, outcome: Outcome, i: int, when_ns: int
) -> dict[str, Any]:
    s = outcome.scores
    scores = {
        "j_score": float(s.j_score[i]),
        "confidence": float(s.confidence[i]),
        "non_me": float(s.non_me[i]),
        "energy": float(s.energy[i]),
    }
    kd = s.__dict__.get("k_density")  # only when it was computed for this answer
    if kd is not None:
        scores["k_density"] = float(kd[i])
    return {
        "schema": SCHEMA,
        "time_ns": when_ns,
        "request_id": request_id,
        "index": i,
        "model": lm.name,
        "version": lm.version,
        "score_name": s.score_name,
        "score": float(s.score[i]),
        "threshold": outcome.threshold,
        "label": int(s.label[i]),
        "scores": scores,
        "pixel_range": list(lm.manifest.pixel_range),
    }


def to_png(image: npt.NDArray[np.float32], pixel_range: tuple[float, float]) -> bytes:
    """(C, H, W) pixels in `pixel_range` as an 8-bit PNG (grey for C = 1, RGB for C = 3)."""
    lo, hi = pixel_range
    u8 = np.clip(np.rint((image - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)
    pic = Image.fromarray(u8[0]) if u8.shape[0] == 1 else Image.fromarray(u8.transpose(1, 2, 0))
    buf = io.BytesIO()
    pic.save(buf, format="PNG")
    return buf.getvalue()


class RecordCounts:
    """The records' metrics; registered whether records are on or not, so that dashboards and
    rules find them."""

    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.written = Counter("notsure_records_written", "NOT SURE records written to disk.",
                               registry=r)  # fmt: skip
        self.dropped = Counter(
            "notsure_records_dropped",
            "Sampled NOT SURE records not written, by reason (queue_full, write_failed).",
            ["reason"], registry=r,
        )  # fmt: skip
        self.rotated = Counter("notsure_records_rotated",
                               "Records deleted, oldest first, to stay within the disk cap.",
                               registry=r)  # fmt: skip
        self.size = Gauge("notsure_records_bytes", "Bytes of the records this worker keeps.",
                          registry=r, multiprocess_mode="livesum")  # fmt: skip
        for reason in ("queue_full", "write_failed"):
            self.dropped.labels(reason)


class RecordWriter:
    """The queue the request path offers records to, and the thread that writes them."""

    def __init__(self, folder: Path, rate: float, max_bytes: int, queue_size: int,
                 counts: RecordCounts) -> None:  # fmt: skip
        self.folder, self.rate, self.max_bytes = folder, rate, max_bytes
        self._queue: queue.Queue[Record | None] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="not-sure-records", daemon=True)
        self._files: deque[tuple[str, int]] = deque()  # (stem, bytes of its two files)
        self._bytes = 0
        self._seq = 0
        self.counts = counts
        self._queue_full = counts.dropped.labels("queue_full")
        self._write_failed = counts.dropped.labels("write_failed")

    # -- the request path (event loop) ----------------------------------------------------------

    def offer(self, lm: LoadedModel, request_id: str, x: npt.NDArray[np.float32],
              outcome: Outcome, refused: npt.NDArray[np.intp]) -> None:  # fmt: skip
        """Sample the refused images of one request and queue them; never blocks."""
        now = time.time_ns()
        for i in refused.tolist():
            if self.rate < 1.0 and random.random() >= self.rate:
                continue
            record = Record(_meta(lm, request_id, outcome, i, now), np.array(x[i]))
            try:
                self._queue.put_nowait(record)
            except queue.Full:
                self._queue_full.inc()

    # -- the writer thread ----------------------------------------------------------------------

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._scan()
        self._thread.start()

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, then stop the thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout_s)

    def _scan(self) -> None:
        """Records already in the folder (an earlier run, other workers) count towards the cap."""
        for meta in sorted(self.folder.glob("*.json")):
            png = meta.with_suffix(".png")
            size = meta.stat().st_size + (png.stat().st_size if png.exists() else 0)
            self._files.append((meta.stem, size))
            self._bytes += size
        self._rotate()

    def _run(self) -> None:
        while True:
            record = self._queue.get()
            if record is None:
                return
            try:
                self._write(record)
            except OSError:
                log.exception("could not write a NOT SURE record to %s", self.folder)
                self._write_failed.inc()

    def _write(self, record: Record) -> None:
        m = record.meta
        self._seq += 1
        stem = f"{m['time_ns']:020d}-{os.getpid()}-{self._seq:08d}"
        png = to_png(record.image, tuple(m["pixel_range"]))
        meta = json.dumps({**m, "image": f"{stem}.png"}, indent=1).encode()
        # Room first (the oldest records go), so the folder never holds more than the cap, not
        # even while a record is being written.
        self._rotate(len(png) + len(meta))
        # PNG first, JSON last, each through a temporary name: a record is listed (by its
        # JSON) only once both files are whole.
        for suffix, data in ((".png", png), (".json", meta)):
            tmp = self.folder / f".{stem}{suffix}.tmp"
            tmp.write_bytes(data)
            tmp.replace(self.folder / f"{stem}{suffix}")
        self._files.append((stem, len(png) + len(meta)))
        self._bytes += len(png) + len(meta)
        self.counts.written.inc()
        self.counts.size.set(self._bytes)

    def _rotate(self, incoming: int = 0) -> None:
        """Delete the oldest records until `incoming` more bytes fit under the cap."""
        while self._bytes + incoming > self.max_bytes and self._files:
            stem, size = self._files.popleft()
            for suffix in (".json", ".png"):  # the JSON first: the record stops being listed
                (self.folder / f"{stem}{suffix}").unlink(missing_ok=True)
            self._bytes -= size
            self.counts.rotated.inc()
        self.counts.size.set(self._bytes)


def refused_records(settings: Settings, metrics: Metrics) -> RecordWriter | None:
    """The record writer the settings ask for; None when records are off (rate 0)."""
    counts = RecordCounts(metrics)
    if settings.record_rate <= 0:
        return None
    return RecordWriter(settings.record_dir, settings.record_rate,
                        settings.record_max_bytes // settings.workers, settings.record_queue,
                        counts)  # fmt: skip
