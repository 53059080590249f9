"""`notsure validate ood` end to end against a live server (a bundled-style model and an imported
one with folders of images), and a bad option named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import LiveServer


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
