"""What the comparison servers share: load the model like notsure does, score a pixel batch."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.environ.get("NOTSURE_ROOT", str(Path(__file__).resolve().parents[2])))
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
        thresholding test."""
        a = np.asarray(pixels)
        x = a.astype(np.float32) / 255 if a.dtype.kind in "iu" else a.astype(np.float32)
        x = x.reshape(-1, *self.manifest.input_shape)
        return score_logits(self.sess.run(None, {"input": x})[0], self.kernel)

    def accepted(self, s: Scores) -> Any:
        """(B,) which images are answered at the manifest's T."""
        return accept(s.score, self.manifest.threshold)

    def __call__(self, instances: Any) -> dict[str, list[Any]]:
        """Integer pixels 0-255 or floats in [0, 1] -> labels, J-scores and decisions."""
        s = self.scores(instances)
        return {"label": s.label.tolist(), "j_score": s.j_score.tolist(),
                "accepted": self.accepted(s).tolist()}  # fmt: skip
