"""BentoML serving the same ONNX model with the same scoring, for the side-by-side benchmark.

Run by benchmarks/serving.py: MODEL_DIR=... bentoml serve bentoml_app:NotSure --port 8002
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.environ.get("NOTSURE_ROOT", str(Path(__file__).resolve().parents[2])))
from service.manifest import Manifest
from service.scoring import score_logits


@bentoml.service(workers=1)
class NotSure:
    def __init__(self) -> None:
        d = Path(os.environ["MODEL_DIR"])
        self.manifest = Manifest.load(d / "manifest.json")
        self.kernel = self.manifest.kernel.to_kernel()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.sess = ort.InferenceSession(
            str(d / "model.onnx"), opts, providers=["CPUExecutionProvider"]
        )

    @bentoml.api
    def predict(self, instances: list[Any]) -> dict[str, Any]:
        x = np.asarray(instances, dtype=np.float32).reshape(-1, *self.manifest.input_shape) / 255
        s = score_logits(self.sess.run(None, {"input": x})[0], self.kernel, self.manifest.threshold)
        return {
            "label": s.label.tolist(),
            "j_score": s.j_score.tolist(),
            "accepted": s.accepted.tolist(),
        }
