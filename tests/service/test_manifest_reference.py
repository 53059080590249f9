"""The held-out score reference kept in a manifest: quantiles and the refuse rate at any T."""

from __future__ import annotations

import numpy as np
import pytest

from service.manifest import ScoreReference


def test_refuse_rate_matches_the_share_below_t_on_uniform_scores() -> None:
    # 0.000, 0.001, ..., 0.999: the share below t is t itself (to the grid's 0.001).
    values = np.arange(1000) / 1000
    ref = ScoreReference.from_scores("j_score", values, threshold=0.05)
    assert ref.n == 1000
    assert ref.refuse_rate == pytest.approx(0.05)
    for t in (0.013, 0.05, 0.4, 0.9):
        assert ref.refuse_rate_at(t) == pytest.approx(t, abs=0.002)
    assert ref.refuse_rate_at(-1.0) == 0.0
    assert ref.refuse_rate_at(1.5) == 1.0


def test_ties_count_as_below_only_when_strictly_below() -> None:
    # 30% of the scores are exactly 0 (refused noise-like images), the rest 1.
    values = np.array([0.0] * 30 + [1.0] * 70)
    ref = ScoreReference.from_scores("j_score", values, threshold=0.5)
    assert ref.refuse_rate == pytest.approx(0.3)
    assert ref.refuse_rate_at(0.0) == 0.0  # nothing is below 0
    # The zeros only, to the kept quantiles' resolution (one step of 0.005).
    assert ref.refuse_rate_at(1.0) == pytest.approx(0.3, abs=0.0051)


def test_unsorted_quantiles_are_rejected() -> None:
    with pytest.raises(ValueError, match="non-decreasing"):
        ScoreReference(score="confidence", n=3, quantiles=[0.2, 0.1], refuse_rate=0.0)
