"""BentoML serving the same ONNX model with the same scoring, for the side-by-side benchmark.

Run by benchmarks.serving from BentoML's own environment, with the repository root on its module
path: MODEL_DIR=... PYTHONPATH=. bentoml serve bentoml_app:NotSure --working-dir benchmarks/others
--port 8002
"""

from __future__ import annotations

import os
from typing import Any

import bentoml

from benchmarks.others.common import Scorer


@bentoml.service(workers=1)
class NotSure:
    def __init__(self) -> None:
        self.scorer = Scorer(os.environ["MODEL_DIR"])

    @bentoml.api
    def predict(self, instances: list[Any]) -> dict[str, list[Any]]:
        return self.scorer(instances)
