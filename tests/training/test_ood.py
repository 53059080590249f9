"""`notsure validate ood` against a live server on the tiny models, checked offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import LiveServer
from tests.service.test_api import offline
from training import data as data_mod
from training.ood import OodConfig, roc_metrics, run, shifted


def test_roc_metrics_by_hand() -> None:
    # Pairs (ID > OOD): 0.9 beats both, 0.8 both, 0.7 only 0.1 -> AUROC 5/6. Accepting 95% of
    # ID means accepting all three (T = 0.7), which lets 0.75 in: FPR 1/2.
    auroc, fpr = roc_metrics([0.9, 0.8, 0.7], [0.75, 0.1])
    assert auroc == pytest.approx(5 / 6) and fpr == pytest.approx(0.5)


def test_shifts_are_what_they_say() -> None:
    x = data_mod.synthetic(4, seed=1).x.numpy()
    rng = np.random.default_rng(0)
    assert np.array_equal(shifted("inverted", x, rng), 1.0 - x)
    assert np.array_equal(shifted("rotated", x, rng)[:, :, :, 0], x[:, :, 0, ::-1])
    blurred = shifted("blur", x, rng)
    assert blurred.shape == x.shape and blurred.std() < x.std()
    noise = shifted("noise", x, rng)
    assert noise.shape == x.shape and noise.min() >= 0.0 and noise.max() <= 1.0
    blank = shifted("blank", x, rng)  # one grey level per image: 0, 1/3, 2/3, 1
    assert blank.shape == x.shape and blank.dtype == np.float32
    for i, level in enumerate([0.0, 1 / 3, 2 / 3, 1.0]):
        np.testing.assert_allclose(blank[i], np.full(x.shape[1:], level), atol=1e-7)


def mann_whitney(a: np.ndarray, b: np.ndarray) -> float:
    """P(score of ID > score of OOD), ties counting one half: AUROC by its definition."""
    return float(((a[:, None] > b[None, :]) + 0.5 * (a[:, None] == b[None, :])).mean())


def test_live_report_matches_offline_scores(
    live_server: LiveServer, model_repo: Path, tmp_path: Path
) -> None:
    cfg = OodConfig(models=("tiny-rce", "tiny-ce"), shifts=("noise", "inverted"),
                    url=live_server.url, models_dir=model_repo, n=64, batch_size=24,
                    out_dir=tmp_path)  # fmt: skip
    report = run(cfg)
    assert json.loads((tmp_path / "ood.json").read_text()) == report
    assert (tmp_path / "ood.png").stat().st_size > 10_000
    assert "| noise | 64 |" in (tmp_path / "tables.md").read_text()
    x_id = data_mod.synthetic(64, seed=2).x.numpy()
    rng = np.random.default_rng(0)
    sets = {k: shifted(k, x_id, rng) for k in ("noise", "inverted")}
    for m in report["models"]:
        manifest, want_id = offline(model_repo, m["model"], x_id)
        assert m["served_score"] == manifest.score
        assert set(m["thresholds"]) == {"j_score", "confidence", "energy", "k_density"}
        for r in m["rows"]:
            _, want = offline(model_repo, m["model"], sets[r["set"]])
            a, b = want_id.named(r["score"]), want.named(r["score"])
            assert r["auroc"] == pytest.approx(mann_whitney(a, b), abs=0.02)  # float32 wire
            t = m["thresholds"][r["score"]]
            assert r["refuse_rate"] == pytest.approx(float((b < t).mean()), abs=2 / 64)


def test_cli_end_to_end(live_server: LiveServer, model_repo: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from notsure.cli import app

    args = ["validate", "ood", "--model", "tiny-rce", "--shift", "noise,blur", "--n", "32",
            "--url", live_server.url, "--models-dir", str(model_repo),
            "--out", str(tmp_path)]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "tiny-rce" in r.output and "blur" in r.output and "AUROC" in r.output
    rows = json.loads((tmp_path / "ood.json").read_text())["models"][0]["rows"]
    assert {r["set"] for r in rows} == {"noise", "blur"} and {r["n"] for r in rows} == {32}
    bad = CliRunner().invoke(app, ["validate", "ood", "--shift", "sideways"])
    assert bad.exit_code != 0 and "noise" in bad.output


def test_imported_model_with_folders_of_images(tmp_path: Path) -> None:
    """An imported model has no data set of its own: ID images from --id-data (an .npz), OOD
    images from a folder; the ID refuse rate is confidence < T on the hand-computed scores."""
    from PIL import Image
    from typer.testing import CliRunner

    from notsure.cli import app
    from service.config import Settings
    from tests.training.graphs import linear_classifier, softmax
    from training.importer import ImportConfig, import_model

    w = linear_classifier(tmp_path / "m.onnx", ("b", 1, 8, 8), 4)
    g = np.random.default_rng(0)
    x_id = g.random((200, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "id.npz", x=x_id)
    (tmp_path / "ood").mkdir()
    for i in range(10):  # blank frames, one grey level each
        Image.fromarray(np.full((8, 8), 25 * i, np.uint8)).save(tmp_path / "ood" / f"{i}.png")
    repo = tmp_path / "models"
    m = import_model(ImportConfig(model=tmp_path / "m.onnx", name="own", data=tmp_path / "id.npz",
                                  repository=repo)).manifest  # fmt: skip
    with LiveServer(Settings(model_repository=repo)) as server:
        args = ["validate", "ood", "--model", "own", "--id-data", str(tmp_path / "id.npz"),
                "--ood", str(tmp_path / "ood"), "--shift", "noise", "--url", server.url,
                "--models-dir", str(repo), "--out", str(tmp_path / "report")]  # fmt: skip
        r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "report" / "ood.json").read_text())["models"][0]
    conf = softmax(x_id.reshape(200, 64) @ w).max(axis=1)
    want = float((conf < m.threshold).mean())
    assert report["in_distribution"]["refuse_rate"]["confidence"] == pytest.approx(want, abs=0.01)
    rows = {(r["set"], r["score"]): r for r in report["rows"]}
    assert rows[(str(tmp_path / "ood"), "confidence")]["n"] == 10
    assert rows[("noise", "confidence")]["n"] == 200
