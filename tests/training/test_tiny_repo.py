"""The tiny repository fixture is a real, well-trained model (other tests rely on it)."""

from __future__ import annotations

from pathlib import Path

from service.manifest import MANIFEST_FILE, MODEL_FILE, Manifest, sha256_file
from tests.conftest import TINY_MODELS


def test_tiny_models_learn_the_synthetic_set(model_repo: Path) -> None:
    for name in TINY_MODELS:
        m = Manifest.load(model_repo / name / "1" / MANIFEST_FILE)
        assert m.metrics["clean_test_accuracy"] >= 0.95, (name, m.metrics)
        assert m.sha256 == sha256_file(model_repo / name / "1" / MODEL_FILE)
        assert m.objective == name.split("-")[1]
