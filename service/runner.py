"""Running a loaded model version: its sessions score batches, its batcher queues requests.

`service.repository` finds, verifies and loads a version; what it hands over is a `LoadedModel`,
complete from the start (sessions, threshold and batcher), so nothing that serves is ever
half-built.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from service.batch_plan import ArrivalTracker
from service.batch_timing import note_inferred
from service.batching import INLINE_MAX_IMAGES, Batcher
from service.certify import CertifyGraph, with_certificate
from service.config import Settings
from service.errors import InferenceFailed
from service.kdensity import KernelSet
from service.manifest import Manifest
from service.metrics import BatchMetrics, Metrics
from service.runtime import OnnxModel
from service.scoring import Kernel, ScoreName, Scores, score_logits
from service.stats import ModelStats


@dataclass(frozen=True, eq=False)
class Scorer:
    """One onnxruntime session of a model version and how its logits become scores."""

    onnx: OnnxModel
    kernel: Kernel
    score: ScoreName  # the score T applies to
    kernel_set: KernelSet | None  # K-density's training features, when the model has one
    certifier: CertifyGraph | None = None  # the bound graph, when the model has one

    def __call__(self, x: np.ndarray, sizes: list[int]) -> list[Scores]:
        """Run one batch (B, C, H, W) (in a worker thread) and split the scores per request."""
        model = self.onnx
        logits, feats = model.run_with_features(x) if self.kernel_set else (model.run(x), None)
        note_inferred()  # for tracing: what follows is scoring
        if logits.shape[0] != x.shape[0] or (feats is not None and feats.shape[0] != x.shape[0]):
            raise InferenceFailed(f"model returned {logits.shape[0]} rows for {x.shape[0]} images")
        scores = score_logits(logits, self.kernel, self.score, feats, self.kernel_set)
        scores = with_certificate(scores, x, self.certifier)
        bounds = [0, *itertools.accumulate(sizes)]
        return [scores.rows(a, b) for a, b in itertools.pairwise(bounds)]

    def warm_up(self, input_shape: tuple[int, int, int], batch_sizes: Iterable[int]) -> None:
        """Run zeros at each batch size once: first runs allocate and plan."""
        for n in sorted(set(batch_sizes)):
            x = np.zeros((n, *input_shape), np.float32)
            # The same call serving makes: with a kernel set, logits and features together
            # (a run that fetches other outputs is planned and allocated anew).
            if self.kernel_set is not None:
                self.onnx.run_with_features(x)
            else:
                self.onnx.run(x)
            if self.certifier is not None:
                self.certifier.certify(x, np.zeros(n, np.int64))


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A version that loaded and serves: its verified manifest, the T in force, its sessions
    and the batcher that queues its requests."""

    name: str
    version: int
    manifest: Manifest
    threshold: float  # T in force unless a request brings its own (`service.thresholds`)
    scorer: Scorer
    # The same graph on every core, for a lone batch (None: not worth it on this host).
    lone_scorer: Scorer | None
    batcher: Batcher[Scores]
    stats: ModelStats  # since it loaded (Triton's statistics extension)

    @property
    def score(self) -> ScoreName:
        """The score T applies to."""
        return self.manifest.score

    @property
    def kernel_set(self) -> KernelSet | None:
        return self.scorer.kernel_set

    @property
    def certifier(self) -> CertifyGraph | None:
        """The bound graph that certifies each answer, when the model has one."""
        return self.scorer.certifier

    @property
    def provider(self) -> str:
        """The onnxruntime execution provider its batches run on."""
        return self.scorer.onnx.provider


def max_batch_size(settings: Settings, name: str, manifest: Manifest) -> int:
    """The largest batch the settings allow, never beyond a fixed-batch graph's batch."""
    size = settings.batching_for(name).max_batch_size
    return size if manifest.batch_size is None else min(size, manifest.batch_size)


def start_serving(
    name: str,
    version: int,
    manifest: Manifest,
    threshold: float,
    scorer: Scorer,
    lone_scorer: Scorer | None,
    *,
    settings: Settings,
    metrics: Metrics,
    executor: Executor,
    arrivals: ArrivalTracker,
) -> LoadedModel:
    """The loaded version with its batcher: batches as the settings size them, run in the
    executor on `scorer`, or on `lone_scorer` (when given) for a lone batch."""
    cfg = settings.batching_for(name)
    stats = ModelStats()
    batcher = Batcher(
        scorer,
        executor,
        max_batch=max_batch_size(settings, name, manifest) if settings.batching else 1,
        max_delay_s=cfg.max_queue_delay_ms / 1000.0 if settings.batching else 0.0,
        max_queue_images=settings.max_queue_images,
        slots=settings.inference_threads,
        retry_after_s=settings.retry_after_s,
        observers=(BatchMetrics(metrics, name, str(version)), stats),
        arrivals=arrivals,
        run_lone=lone_scorer,
        inline_max_images=INLINE_MAX_IMAGES,
    )
    return LoadedModel(name, version, manifest, threshold, scorer, lone_scorer, batcher, stats)
