"""What the comparison servers share: load the model like notsure does, score a pixel batch.

The servers import it as `benchmarks.others.common`: from the repository root, which their
interpreter finds on its module path (`python -m`'s current folder, or PYTHONPATH for the
servers that run from their own virtual environments).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.manifest import Manifest
from service.scoring import Scores, accept, score_logits


class Scorer:
    """One onnxruntime session: one intra-op thread, like a notsure inference slot, unless
    SCORER_THREADS says otherwise (0: onnxruntime's default, one per core)."""

    def __init__(self, model_dir: str) -> None:
        d = Path(model_dir)
        self.manifest = Manifest.load(d / "manifest.json")
        self.kernel = self.manifest.kernel.to_kernel()
        opts = ort.SessionOptions()
        # SCORER_THREADS=0: onnxruntime's own default (one thread per core).
        opts.intra_op_num_threads = int(os.environ.get("SCORER_THREADS", "1"))
        self.sess = ort.InferenceSession(
            str(d / "model.onnx"), opts, providers=["CPUExecutionProvider"]
        )

    def scores(self, pixels: Any) -> Scores:
        """Integer pixels 0-255 or floats in [0, 1], any shape holding whole images -> the
        thresholding test, on the score the manifest serves the model on."""
        a = np.asarray(pixels)
        x = a.astype(np.float32) / 255 if a.dtype.kind in "iu" else a.astype(np.float32)
        x = x.reshape(-1, *self.manifest.input_shape)
        logits = self.sess.run(None, {"input": x})[0]
        return score_logits(logits, self.kernel, self.manifest.score)

    def accepted(self, s: Scores) -> Any:
        """(B,) which images are answered: their served score >= the manifest's T."""
        return accept(s.score, self.manifest.threshold)

    def __call__(self, instances: Any) -> dict[str, list[Any]]:
        """Integer pixels 0-255 or floats in [0, 1] -> labels, J-scores and decisions."""
        s = self.scores(instances)
        return {"label": s.label.tolist(), "j_score": s.j_score.tolist(),
                "accepted": self.accepted(s).tolist()}  # fmt: skip
