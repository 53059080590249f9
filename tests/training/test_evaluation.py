"""The ROC-AUC's standard error from aggregates (Hanley & McNeil) against the spread of the
AUC over many independent samples of the same two score distributions: close at a moderate
AUC, on the wide (conservative) side for well-separated normal scores."""

from __future__ import annotations

import numpy as np
import pytest

from training.evaluation import auc_se, roc_auc


@pytest.mark.parametrize(
    ("shift", "n_pos", "n_neg", "low", "high"),
    [(1.0, 300, 200, 0.85, 1.15), (2.5, 150, 400, 1.0, 1.5)],
)
def test_auc_standard_error_against_the_spread_over_samples(
    shift: float, n_pos: int, n_neg: int, low: float, high: float
) -> None:
    rng = np.random.default_rng(0)
    aucs = [roc_auc(rng.normal(shift, 1, n_pos), rng.normal(0, 1, n_neg)) for _ in range(400)]
    spread = float(np.std(aucs))
    se = auc_se(float(np.mean(aucs)), n_pos, n_neg)
    assert low * spread <= se <= high * spread


def test_auc_standard_error_by_hand() -> None:
    # AUC 0.9, 10 + 10 samples: Q1 = 0.9/1.1, Q2 = 1.62/1.9 (Hanley & McNeil, Eq. 2).
    q1, q2 = 0.9 / 1.1, 1.62 / 1.9
    var = (0.9 * 0.1 + 9 * (q1 - 0.81) + 9 * (q2 - 0.81)) / 100
    assert auc_se(0.9, 10, 10) == pytest.approx(var**0.5)
    assert auc_se(1.0, 50, 50) == 0.0
