"""Who scores the validator's images: the running service (a `training.clients` client) or,
offline, the same ONNX graph in-process through `service.runtime` and `service.scoring`; both
return the same `Decisions`, so the two can be compared."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np

from service.manifest import MODEL_FILE, Manifest
from service.repository import read_kernel_set
from service.runtime import OnnxModel
from service.scoring import decide, score_logits
from training.clients import F32, Decisions
from training.progress import progress_bar

log = logging.getLogger(__name__)


class Scorer(Protocol):
    def infer(self, x: np.ndarray) -> Decisions: ...


def score_all(scorer: Scorer, x: np.ndarray, batch: int, description: str) -> Decisions:
    """Decisions for every image of x (N, C, H, W), sent in batches of `batch`, with a bar."""
    parts: list[Decisions] = []
    with progress_bar(description, total=len(x)) as bar:
        for i in range(0, len(x), batch):
            part = scorer.infer(np.ascontiguousarray(x[i : i + batch], dtype=np.float32))
            if len(part.label) != len(x[i : i + batch]):
                raise RuntimeError(f"asked for {len(x[i : i + batch])} decisions, got "
                                   f"{len(part.label)}")  # fmt: skip
            parts.append(part)
            bar.advance(len(part.label))
    return Decisions.concat(parts)


class OfflineScorer:
    """The service's computation, in-process: the ONNX graph, then `service.scoring`."""

    def __init__(self, model_dir: Path, manifest: Manifest, threads: int = 0) -> None:
        self.model = OnnxModel(model_dir / MODEL_FILE, device="cpu", intra_op_threads=threads)
        self.manifest = manifest
        self.kernel_set = read_kernel_set(manifest, model_dir)

    def infer(self, x: F32) -> Decisions:
        m = self.manifest
        z, f = self.model.run_with_features(np.ascontiguousarray(x, np.float32))
        s = score_logits(z, m.kernel.to_kernel(), m.score, f, self.kernel_set)
        # Cast to what the service sends (FP32), so both paths give the same record.
        return Decisions(
            label=decide(s, m.threshold),
            j_score=s.j_score.astype(np.float32),
            confidence=s.confidence.astype(np.float32),
            non_me=s.non_me.astype(np.float32),
            probabilities=s.probabilities.astype(np.float32),
            threshold=self.manifest.threshold,
        )
