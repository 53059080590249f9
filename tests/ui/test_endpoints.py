"""The page's files and the JSON it reads (calibration, recent decisions), in-process on the tiny
real models; the page itself is tested in a browser (test_page.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.routes.ui import UI_DIR, assets
from service.config import Settings
from service.main import create_app
from service.manifest import MANIFEST_FILE, Manifest, ScoreReference
from service.recent import BINS, RecentDecisions
from training.data import synthetic

RCE = "tiny-rce"


@pytest.fixture
def client(model_repo: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(model_repository=model_repo))) as c:
        yield c


def pixels(n: int, seed: int = 5) -> list[object]:
    return synthetic(n, seed=seed).x.numpy()[:, 0].tolist()  # n images of (28, 28)


# --- the page's files ------------------------------------------------------------------------


def test_the_page_and_its_files_are_served_with_a_same_origin_policy(client: TestClient) -> None:
    page = client.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert 'data-testid="threshold-slider"' in page.text
    js = client.get("/ui/app.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert client.get("/ui/style.css").headers["content-type"].startswith("text/css")


@pytest.mark.parametrize("path", ["/ui/nothing.js", "/ui/../main.py", "/ui/%2e%2e/main.py",
                                  "/ui/gallery/export.py", "/ui/..%2fmain.py"])  # fmt: skip
def test_only_the_page_files_are_served(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 404


def test_the_page_files_are_package_data() -> None:
    """An installed wheel (and the Docker image, which installs one) carries every file served."""
    import fnmatch
    import tomllib

    globs = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = globs["package-data"]["service"]
    served = [f"ui/{rel}" for rel in assets()]
    assert "ui/index.html" in served and "ui/gallery/index.json" in served
    for rel in served:
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), f"{rel} is not package data"


def test_openapi_documents_the_json_endpoints_not_the_page(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "/v1/models/{name}/calibration" in paths and "/v1/models/{name}/recent" in paths
    assert not [p for p in paths if p.startswith("/ui")]


def test_the_page_needs_no_key_but_its_api_calls_do(model_repo: Path) -> None:
    settings = Settings(model_repository=model_repo, api_keys=["k1"])
    with TestClient(create_app(settings)) as c:
        assert c.get("/ui").status_code == 200
        assert c.get(f"/v1/models/{RCE}/calibration").status_code == 401
        assert c.get(f"/v1/models/{RCE}/recent").status_code == 401
        auth = {"Authorization": "Bearer k1"}
        assert c.get(f"/v1/models/{RCE}/calibration", headers=auth).status_code == 200


def test_the_gallery_index_names_files_that_are_shipped() -> None:
    index = json.loads((UI_DIR / "gallery" / "index.json").read_text())
    assert index["examples"]
    for e in index["examples"]:
        assert (UI_DIR / "gallery" / e["file"]).is_file()
        assert Path(e["source"]).is_file(), "each example names the audit results it comes from"
        assert 0 < e["linf"] <= e["eps"] + 0.5 / 255 + 1e-6  # eps, then rounded to 8 bits


# --- calibration -----------------------------------------------------------------------------


@pytest.fixture
def known_reference(writable_repo: Path) -> tuple[Path, float]:
    """tiny-rce with hand-made held-out quantiles: 0, .1, .5, .5, .9, 1 (five equal-mass
    intervals) and an exact refuse rate of 0.123 at its T."""
    path = writable_repo / RCE / "1" / MANIFEST_FILE
    m = Manifest.load(path)
    ref = ScoreReference(score=m.score, n=500, quantiles=[0.0, 0.1, 0.5, 0.5, 0.9, 1.0],
                         refuse_rate=0.123)  # fmt: skip
    m.model_copy(update={"score_references": {m.score: ref}}).save(path)
    return writable_repo, m.threshold


@pytest.mark.parametrize(
    ("t", "expected"),
    [
        (0.0, 0.0),  # at or below the lowest kept score: nothing refused
        (0.05, 0.1),  # half-way through the first fifth
        (0.3, 0.3),  # half-way from 0.1 to 0.5: 1.5 fifths
        (0.5, 0.4),  # the tie at 0.5 is not below 0.5: two fifths
        (0.7, 0.7),  # half-way from 0.5 to 0.9: 3.5 fifths
        (1.0, 1.0),
    ],
)
def test_calibration_gives_the_clean_refuse_rate_of_any_threshold(
    known_reference: tuple[Path, float], t: float, expected: float
) -> None:
    repo, _ = known_reference
    with TestClient(create_app(Settings(model_repository=repo))) as c:
        body = c.get(f"/v1/models/{RCE}/calibration", params={"threshold": t}).json()
    assert body["at"] == t
    assert body["refuse_rate"] == pytest.approx(expected, abs=1e-12)
    assert body["quantiles"] == [0.0, 0.1, 0.5, 0.5, 0.9, 1.0] and body["n"] == 500


def test_calibration_at_the_served_threshold_is_the_exact_held_out_rate(
    known_reference: tuple[Path, float],
) -> None:
    repo, t = known_reference
    with TestClient(create_app(Settings(model_repository=repo))) as c:
        body = c.get(f"/v1/models/{RCE}/calibration").json()
    assert body["threshold"] == t and body["at"] == t
    assert body["refuse_rate"] == 0.123  # the manifest's own count, not an interpolation
    assert body["score"] == "j_score" and body["unit_range"] is True


def test_calibration_refuses_a_threshold_outside_the_score_range(client: TestClient) -> None:
    r = client.get(f"/v1/models/{RCE}/calibration", params={"threshold": 1.5})
    assert r.status_code == 422 and r.json()["field"] == "threshold"
    assert client.get("/v1/models/nope/calibration").status_code == 404


def test_calibration_of_a_manifest_without_held_out_scores(writable_repo: Path) -> None:
    path = writable_repo / RCE / "1" / MANIFEST_FILE
    Manifest.load(path).model_copy(update={"score_references": {}}).save(path)
    with TestClient(create_app(Settings(model_repository=writable_repo))) as c:
        body = c.get(f"/v1/models/{RCE}/calibration").json()
    assert body["quantiles"] is None and body["refuse_rate"] is None


def test_bundled_manifests_calibration_matches_their_held_out_rate() -> None:
    """The bundled models: the rate at the served T is the manifest's, as calibrated (~5%)."""
    for path in sorted(Path("models").glob("*/*/" + MANIFEST_FILE)):
        m = Manifest.load(path)
        assert m.reference is not None, f"{path} keeps no held-out scores"
        assert 0.03 < m.reference.refuse_rate < 0.07


# --- probabilities ---------------------------------------------------------------------------


def test_predictions_carry_probabilities_only_when_asked(client: TestClient) -> None:
    x = pixels(3)
    plain = client.post(f"/v1/models/{RCE}/predict", json={"instances": x}).json()
    assert all("probabilities" not in p for p in plain["predictions"])
    body = {"instances": x, "probabilities": True}
    asked = client.post(f"/v1/models/{RCE}/predict", json=body).json()
    for p, q in zip(plain["predictions"], asked["predictions"], strict=True):
        probs = np.asarray(q["probabilities"])
        assert probs.shape == (10,) and probs.sum() == pytest.approx(1.0, abs=1e-6)
        assert probs.max() == pytest.approx(p["confidence"], rel=1e-6)
        assert {k: v for k, v in q.items() if k != "probabilities"} == p


# --- recent decisions ------------------------------------------------------------------------


def test_recent_counts_every_answer_of_this_process(client: TestClient) -> None:
    answers = []
    for seed in range(3):
        r = client.post(f"/v1/models/{RCE}/predict", json={"instances": pixels(4, seed)})
        answers += r.json()["predictions"]
    body = client.get(f"/v1/models/{RCE}/recent", params={"seconds": 30}).json()
    accepted = sum(p["decision"] == "accepted" for p in answers)
    assert sum(body["accepted_per_s"]) == accepted
    assert sum(body["not_sure_per_s"]) == len(answers) - accepted
    assert len(body["accepted_per_s"]) == 30 and body["kept"] == 12
    edges = np.asarray(body["edges"])
    assert len(edges) == BINS + 1 and edges[0] == 0.0 and edges[-1] == 1.0
    scores = np.asarray([p["score"] for p in answers])
    acc = np.asarray([p["decision"] == "accepted" for p in answers])
    assert body["hist_accepted"] == np.histogram(scores[acc], edges)[0].tolist()
    assert body["hist_not_sure"] == np.histogram(scores[~acc], edges)[0].tolist()
    other = client.get("/v1/models/tiny-ce/recent").json()
    assert sum(other["accepted_per_s"]) + sum(other["not_sure_per_s"]) == 0


def test_the_ring_keeps_the_newest_images_and_bins_them_by_second() -> None:
    ring = RecentDecisions(capacity=4)
    ring.record("m", np.array([0.12, 0.22, 0.32]), np.array([True, False, True]), now=100.0)
    ring.record("m", np.array([0.42, 0.52]), np.array([False, False]), now=102.5)
    # 5 answered, 4 kept: the first (0.12, accepted) was overwritten.
    w = ring.window("m", 5, (0.0, 1.0), now=103.0)
    assert w.kept == 4
    # Ages 3.0 (the 0.22 and 0.32 at t=100) and 0.5 (t=102.5): seconds 1 and 4 of 0..4.
    assert w.accepted == [0, 1, 0, 0, 0] and w.not_sure == [0, 1, 0, 0, 2]
    assert np.nonzero(w.hist_accepted)[0].tolist() == [6]  # 0.32 in [0.30, 0.35)
    assert np.nonzero(w.hist_not_sure)[0].tolist() == [4, 8, 10]  # 0.22, 0.42, 0.52
    # A batch larger than the ring keeps its last images.
    ring.record("m", np.arange(6) / 10 + 0.01, np.ones(6, bool), now=104.0)
    w = ring.window("m", 1, (0.0, 1.0), now=104.0)
    assert w.accepted == [4] and w.edges[0] == 0.0
    assert np.nonzero(w.hist_accepted)[0].tolist() == [4, 6, 8, 10]  # 0.21, 0.31, 0.41, 0.51
    # Older than the window: not counted.
    assert sum(ring.window("m", 1, (0.0, 1.0), now=200.0).accepted) == 0
