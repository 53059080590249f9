"""A model is served on the score its manifest names: decisions, responses and metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.config import Settings
from service.main import create_app
from service.manifest import MANIFEST_FILE, Manifest
from tests.service.test_api import images, offline

MODELS = sorted((Path(__file__).parents[2] / "models").glob("*/*/manifest.json"))


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.parent.parent.name)
def test_manifest_without_score_gets_the_objectives_default(path: Path) -> None:
    old = json.loads(path.read_text())
    for key in ("score", "score_thresholds", "guarantee", "k_density"):
        old.pop(key, None)
    if old["objective"] == "ce":  # a manifest of before: T on J, in [0, 1]
        old["threshold"] = 0.5
    m = Manifest.model_validate(old)
    assert m.score == ("j_score" if m.objective == "rce" else "confidence")


def test_bundled_models_name_their_default_score() -> None:
    scores = {p.parent.parent.name: Manifest.load(p).score for p in MODELS}
    assert scores.get("mnist-resnet32-rce") == "j_score"
    assert scores.get("mnist-resnet32-ce") == "confidence"


def rescore(repo: Path, name: str, score: str, threshold: float) -> None:
    path = repo / name / "1" / MANIFEST_FILE
    m = json.loads(path.read_text())
    m.update(score=score, threshold=threshold)
    path.write_text(json.dumps(m))


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


@pytest.mark.parametrize("score", ["energy", "k_density", "j_score"])
def test_served_on_the_named_score(writable_repo: Path, score: str) -> None:
    x = images(8, seed=11)
    _, base = offline(writable_repo, "tiny-ce", x)
    values = base.named(score)  # type: ignore[arg-type]
    t = float(np.median(values))  # half accepted, half refused
    rescore(writable_repo, "tiny-ce", score, t)
    with TestClient(create_app(Settings(model_repository=writable_repo))) as c:
        body = c.post("/v1/models/tiny-ce/predict", json={"instances": x[:, 0].tolist()}).json()
        metrics = metric_samples(c.get("/metrics").text)
    preds = body["predictions"]
    assert body["threshold"] == pytest.approx(t)
    assert [p["score_name"] for p in preds] == [score] * 8
    np.testing.assert_allclose([p["score"] for p in preds], values, rtol=1e-4, atol=1e-12)
    assert [p["decision"] == "accepted" for p in preds] == (values >= t).tolist()
    labels = (("model", "tiny-ce"), ("version", "1"))
    assert metrics[(f"notsure_{score}_count", labels)] == 8  # each score its own histogram
    t_gauge = (("model", "tiny-ce"), ("score", score), ("version", "1"))
    assert metrics[("notsure_threshold", t_gauge)] == pytest.approx(t)
    info = [k for k in metrics if k[0] == "notsure_model_info" and ("model", "tiny-ce") in k[1]]
    assert info and ("score", score) in info[0][1]


def test_request_threshold_range_follows_the_score(writable_repo: Path) -> None:
    rescore(writable_repo, "tiny-ce", "energy", 3.0)
    x = images(2)[:, 0].tolist()
    settings = Settings(model_repository=writable_repo, allow_request_threshold=True)
    with TestClient(create_app(settings)) as c:
        energy = c.post("/v1/models/tiny-ce/predict", json={"instances": x, "threshold": 40.0})
        assert energy.status_code == 200
        assert {p["decision"] for p in energy.json()["predictions"]} == {"not_sure"}
        bad = c.post("/v1/models/tiny-rce/predict", json={"instances": x, "threshold": 1.5})
    assert bad.status_code == 422 and bad.json()["field"] == "threshold"
    assert "[0, 1]" in bad.json()["error"]


def test_tampered_kernel_set_keeps_the_model_out(writable_repo: Path) -> None:
    ks = writable_repo / "tiny-ce" / "1" / "kernel_set.npy"
    ks.write_bytes(ks.read_bytes()[:-4] + b"\0\0\0\0")
    with TestClient(create_app(Settings(model_repository=writable_repo))) as c:
        models = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
    assert not models["tiny-ce"]["ready"] and "kernel_set.npy" in models["tiny-ce"]["error"]
    assert models["tiny-rce"]["ready"]


def test_configured_threshold_outside_the_scores_range_keeps_the_model_out(
    model_repo: Path,
) -> None:
    settings = Settings(model_repository=model_repo, thresholds={"tiny-rce": 1.5})
    with TestClient(create_app(settings)) as c:
        models = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
    assert not models["tiny-rce"]["ready"]
    assert "j_score must be in [0, 1], got 1.5" in models["tiny-rce"]["error"]
    assert models["tiny-ce"]["ready"]
