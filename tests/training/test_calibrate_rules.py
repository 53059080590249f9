"""`notsure calibrate`: the score it fits T for, and the guarantee rules the manifest records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from typer.testing import CliRunner

from notsure.cli import app
from service.manifest import MANIFEST_FILE, MODEL_FILE, Manifest
from service.runtime import OnnxModel
from service.scoring import score_logits
from training import data as data_mod


def calibrate(model_dir: Path, *args: str) -> Manifest:
    r = CliRunner().invoke(app, ["calibrate", str(model_dir), *args])
    assert r.exit_code == 0, r.output
    return Manifest.load(model_dir / MANIFEST_FILE)


def val_scores(model_dir: Path, m: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """The held-out split's scores and correctness, recomputed outside calibrate."""
    val = data_mod.run_splits("synthetic", Path("data"), 0, 0, True).val
    s = score_logits(
        OnnxModel(model_dir / MODEL_FILE, device="cpu").run(val.x.numpy()),
        m.kernel.to_kernel(), m.score,
    )  # fmt: skip
    return s.score, s.label == val.y.numpy()


def test_clean_refuse_with_confidence_records_the_guarantee(writable_repo: Path) -> None:
    d = writable_repo / "tiny-rce" / "1"
    m = calibrate(d, "--target-clean-refuse", "0.1", "--confidence", "0.9")
    g = m.guarantee
    assert g is not None and (g.rule, g.target, g.confidence, g.n) == (
        "clean_refuse",
        0.1,
        0.9,
        128,
    )
    scores, _ = val_scores(d, m)
    # The k-th smallest score, k the largest with P(Bin(128, 0.1) <= k - 1) <= 0.1.
    k = max(k for k in range(1, 129) if stats.binom.cdf(k - 1, 128, 0.1) <= 0.1)
    assert m.threshold == pytest.approx(np.sort(scores)[k - 1])
    assert "exact binomial" in m.threshold_rule


def test_target_risk_uses_sgr(writable_repo: Path) -> None:
    d = writable_repo / "tiny-ce" / "1"
    m = calibrate(d, "--target-risk", "0.2", "--confidence", "0.9")
    g = m.guarantee
    assert g is not None and g.rule == "selective_risk" and g.n == 128 and g.bound is not None
    scores, correct = val_scores(d, m)
    acc = scores >= m.threshold
    assert acc.any() and (~correct[acc]).mean() <= g.bound < 0.2


@pytest.mark.parametrize("score", ["energy", "k_density"])
def test_other_scores_get_their_own_threshold(writable_repo: Path, score: str) -> None:
    d = writable_repo / "tiny-ce" / "1"
    m = calibrate(d, "--score", score, "--target-clean-refuse", "0.1")
    assert m.score == score and m.threshold == m.score_thresholds[score]
    assert m.guarantee is None and m.k_density is not None
    if score == "energy":
        scores, _ = val_scores(d, m)
        assert (scores < m.threshold).mean() == pytest.approx(0.1, abs=1 / 128)


def test_unknown_score_and_both_targets_are_refused(writable_repo: Path) -> None:
    d = str(writable_repo / "tiny-ce" / "1")
    r = CliRunner().invoke(app, ["calibrate", d, "--score", "entropy"])
    assert r.exit_code != 0 and "j_score" in r.output
    r = CliRunner().invoke(app, ["calibrate", d, "--target-risk", "0.1",
                                 "--target-clean-refuse", "0.05"])  # fmt: skip
    assert r.exit_code != 0 and "not both" in r.output
