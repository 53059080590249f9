"""The threshold guarantees, checked by simulation: many calibration draws from a distribution
whose true refuse rate and selective risk are known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from training.guarantees import (
    NoThreshold,
    binomial_upper,
    clean_refuse_rank,
    clean_refuse_threshold,
    clean_refuse_thresholds,
    selective_risk_search,
    selective_risk_threshold,
)

DRAWS = 4000


def allowed(level: float, draws: int = DRAWS) -> float:
    """The most violations a promise of `level` may show in `draws` draws: the 99.9% quantile
    of Binomial(draws, level), so a correct rule fails this test once in a thousand runs."""
    return float(stats.binom.ppf(0.999, draws, level)) / draws


@pytest.mark.parametrize(("n", "target", "confidence"), [(500, 0.05, 0.95), (200, 0.1, 0.9)])
def test_clean_refuse_rate_bound_holds_over_draws(n: int, target: float, confidence: float) -> None:
    rng = np.random.default_rng(0)
    # Clean scores ~ Uniform(0, 1): the true refuse rate of T is T itself.
    t = clean_refuse_thresholds(rng.random((DRAWS, n)), target, confidence)
    violated = float((t > target).mean())
    assert violated <= allowed(1.0 - confidence)
    # Not vacuous: the bound is near tight (an exact bound violates close to 1 - confidence).
    assert violated >= 0.25 * (1.0 - confidence)


def test_plain_quantile_breaks_the_promise_the_bound_keeps() -> None:
    # The empirical 5% quantile refuses more than 5% of clean images about half the time.
    rng = np.random.default_rng(1)
    s = np.sort(rng.random((DRAWS, 500)), axis=1)
    plain = s[:, math.floor(0.05 * 500)]
    assert (plain > 0.05).mean() > 0.3


def test_clean_refuse_rank_by_hand() -> None:
    # n = 100, A = 0.05, 95%: P(Bin(100, .05) <= 1) = 0.0371 <= 0.05 < P(<= 2) = 0.1183, so k = 2.
    assert clean_refuse_rank(100, 0.05, 0.95) == 2
    p1 = sum(math.comb(100, j) * 0.05**j * 0.95 ** (100 - j) for j in range(2))
    assert p1 == pytest.approx(0.0371, abs=1e-4)
    assert clean_refuse_threshold(np.arange(100, 0, -1) / 100, 0.05, 0.95) == 0.02


def test_clean_refuse_too_few_images_says_how_many() -> None:
    with pytest.raises(NoThreshold, match="at least 59"):
        clean_refuse_threshold(np.linspace(0, 1, 50), 0.05, 0.95)


def test_binomial_upper_matches_the_binomial_tail() -> None:
    b = float(binomial_upper(3, 100, 0.05))
    # The defining property: P(Bin(100, b) <= 3) = 0.05.
    assert stats.binom.cdf(3, 100, b) == pytest.approx(0.05, abs=1e-9)
    assert float(binomial_upper(0, 10, 0.05)) == pytest.approx(1 - 0.05 ** (1 / 10))
    assert float(binomial_upper(10, 10, 0.05)) == 1.0


def test_selective_risk_guarantee_holds_over_draws() -> None:
    # Score k ~ U(0, 1); the prediction is wrong with probability (1 - k) / 2, so the true
    # selective risk of "accept k >= t" is the mean of (1 - k) / 2 over [t, 1] = (1 - t) / 4.
    rng = np.random.default_rng(2)
    draws, n, target, confidence = 1000, 5000, 0.1, 0.9
    k = rng.random((draws, n))
    wrong = rng.random((draws, n)) < (1.0 - k) / 2.0
    t, bound = selective_risk_search(k, wrong, target, confidence)
    assert np.isfinite(t).all()
    true_risk = (1.0 - t) / 4.0
    assert (true_risk > target).mean() <= allowed(1.0 - confidence, draws)
    # The certified bound is itself a valid bound, below the target.
    assert (bound < target).all()
    assert (true_risk > bound).mean() <= allowed(1.0 - confidence, draws)
    # Useful: the best T for the target is 0.6 (coverage 40%); SGR keeps most of it.
    assert np.median(1.0 - t) > 0.25


def test_selective_risk_threshold_reports_its_calibration_figures() -> None:
    rng = np.random.default_rng(3)
    k = rng.random(2000)
    correct = rng.random(2000) >= (1.0 - k) / 2.0
    r = selective_risk_threshold(k, correct, 0.1, 0.95)
    acc = k >= r.threshold
    assert r.coverage == pytest.approx(acc.mean())
    assert r.risk == pytest.approx((~correct[acc]).mean())
    assert r.risk <= r.bound < 0.1


def test_selective_risk_unreachable_target_is_an_error() -> None:
    k = np.linspace(0, 1, 100)
    with pytest.raises(NoThreshold, match="selective risk below"):
        selective_risk_threshold(k, np.zeros(100, bool), 0.05, 0.95)
