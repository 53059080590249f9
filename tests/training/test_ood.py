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
