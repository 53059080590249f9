"""The monitor's gauges on the bundled RCE model, against the scores a real client received and
the manifest's calibration."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.config import Settings
from service.drift import ReferenceBins, psi
from service.main import create_app
from service.manifest import MANIFEST_FILE, Manifest

ROOT = Path(__file__).resolve().parents[2]
MODEL = "mnist-resnet32-rce"
MANIFEST = Manifest.load(ROOT / "models" / MODEL / "1" / MANIFEST_FILE)


def settings(**kw: object) -> Settings:
    return Settings(model_repository=ROOT / "models", models=[MODEL], device="cpu",
                    grpc_enabled=False, **kw)  # type: ignore[arg-type]  # fmt: skip


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}  # fmt: skip


def scored(score: str) -> tuple[tuple[str, str], ...]:
    return (("model", MODEL), ("score", score), ("version", "1"))


def v2_infer(c: TestClient, x: np.ndarray) -> dict[str, np.ndarray]:
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}]}  # fmt: skip
    r = c.post(f"/v2/models/{MODEL}/infer", json=body)
    assert r.status_code == 200, r.text
    return {o["name"]: np.asarray(o["data"]) for o in r.json()["outputs"]}


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(create_app(settings(monitor_window=150))) as c:
        yield c


def test_window_gauges_match_what_the_client_saw(client: TestClient) -> None:
    rng = np.random.default_rng(0)
    # Noise the model refuses, then a few blank frames it answers ("1": J 0.86, above T).
    x = np.concatenate([rng.random((160, 1, 28, 28)), np.zeros((20, 1, 28, 28))])
    seen: dict[str, list[float]] = {"j_score": [], "confidence": [], "energy": [], "label": []}
    for i in range(0, len(x), 30):
        out = v2_infer(client, x[i : i + 30].astype(np.float32))
        for k in seen:
            seen[k].extend(out[k].tolist())
    client.app.state.notsure.monitor.refresh()  # type: ignore[attr-defined]
    got = samples(client.get("/metrics").text)
    version_labels = (("model", MODEL), ("version", "1"))
    # The window holds the last 150 of the 180 images.
    last = {k: np.asarray(v[-150:]) for k, v in seen.items()}
    assert got[("notsure_window_images", version_labels)] == 150
    refused = int((last["label"] == -1).sum())
    assert 0 < refused < 150
    assert got[("notsure_window_not_sure", version_labels)] == refused
    ref = MANIFEST.reference
    assert ref is not None
    assert got[("notsure_calibrated_refuse_rate", version_labels)] == ref.refuse_rate
    assert got[("notsure_calibration_images", version_labels)] == ref.n == 5000
    assert got[("notsure_threshold", scored("j_score"))] == MANIFEST.threshold
    for score in ("j_score", "confidence", "energy"):
        bins = ReferenceBins.of(MANIFEST.score_references[score])  # type: ignore[index]
        want = psi(bins, last[score])
        assert got[("notsure_score_drift_psi", scored(score))] == pytest.approx(want, rel=1e-6)
        assert want > 1.0  # noise is nothing like digits
        assert got[(f"notsure_{score}_count", version_labels)] == 180


def test_an_overridden_threshold_reads_p0_from_the_reference() -> None:
    with TestClient(create_app(settings(thresholds={MODEL: 0.6}))) as c:
        got = samples(c.get("/metrics").text)
    version_labels = (("model", MODEL), ("version", "1"))
    ref = MANIFEST.reference
    assert ref is not None
    assert got[("notsure_threshold", scored("j_score"))] == 0.6
    assert got[("notsure_calibrated_refuse_rate", version_labels)] == pytest.approx(
        ref.refuse_rate_at(0.6)
    )
    assert ref.refuse_rate_at(0.6) > ref.refuse_rate
    # The other scores' T are the manifest's.
    for score, t in MANIFEST.score_thresholds.items():
        if score != "j_score":
            assert got[("notsure_threshold", scored(score))] == t


def test_build_and_process_metrics(client: TestClient) -> None:
    got = samples(client.get("/metrics").text)
    (build,) = [k for k in got if k[0] == "notsure_build_info"]
    assert {k for k, _ in build[1]} == {"version", "python", "onnxruntime"}
    assert got[("process_resident_memory_bytes", ())] > 10e6
    assert any(k[0] == "python_info" for k in got)
