"""LitServe serving the same ONNX model with the same scoring, for the side-by-side benchmark.

Run by benchmarks/serving.py: MODEL_DIR=models/<name>/1 PORT=8001 python litserve_app.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import litserve as ls
import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from service.manifest import Manifest
from service.scoring import score_logits


class NotSureAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        d = Path(os.environ["MODEL_DIR"])
        self.manifest = Manifest.load(d / "manifest.json")
        self.kernel = self.manifest.kernel.to_kernel()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.sess = ort.InferenceSession(
            str(d / "model.onnx"), opts, providers=["CPUExecutionProvider"]
        )

    def decode_request(self, request: dict) -> np.ndarray:
        x = np.asarray(request["instances"], dtype=np.float32) / 255.0
        return x.reshape(-1, *self.manifest.input_shape)

    def predict(self, x: np.ndarray) -> dict:
        logits = self.sess.run(None, {"input": x})[0]
        s = score_logits(logits, self.kernel, self.manifest.threshold)
        return {
            "label": s.label.tolist(),
            "j_score": s.j_score.tolist(),
            "accepted": s.accepted.tolist(),
        }

    def encode_response(self, output: dict) -> dict:
        return output


if __name__ == "__main__":
    server = ls.LitServer(NotSureAPI(), accelerator="cpu")
    server.run(port=int(os.environ["PORT"]), generate_client_file=False)
