"""The drift and refuse-rate statistics against hand-computed values and a simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.drift import ReferenceBins, psi, refuse_excess_z
from service.manifest import ScoreReference
from service.monitor import Window


def uniform_reference() -> ScoreReference:
    """Held-out scores spread evenly over [0, 1]: deciles at 0.1, 0.2, ..., 0.9."""
    return ScoreReference(score="j_score", n=5000, quantiles=np.linspace(0, 1, 201).tolist(),
                          refuse_rate=0.05)  # fmt: skip


def test_bins_are_the_reference_deciles() -> None:
    bins = ReferenceBins.of(uniform_reference())
    np.testing.assert_allclose(bins.edges, np.arange(1, 10) / 10)
    np.testing.assert_allclose(bins.expected, [0.1] * 10)


def test_psi_by_hand() -> None:
    bins = ReferenceBins.of(uniform_reference())
    # The window matches the reference: one image in the middle of each decile, 20 times.
    assert psi(bins, np.tile(np.arange(10) / 10 + 0.05, 20)) == pytest.approx(0.0, abs=1e-12)
    # 200 images all in the lowest decile: a = 1 there, an empty bin counts half an image
    # (0.5 / 200 = 0.0025) in the other nine.
    a, e, empty = 1.0, 0.1, 0.5 / 200
    want = (a - e) * math.log(a / e) + 9 * (empty - e) * math.log(empty / e)
    assert psi(bins, np.full(200, 0.05)) == pytest.approx(want, rel=1e-12)
    # Half in the lowest decile, half spread evenly: by hand, bin by bin.
    x = np.concatenate([np.full(100, 0.01), np.arange(100) / 100 + 0.005])
    shares = [0.5 + 0.05] + [0.05] * 9
    want = sum((s - 0.1) * math.log(s / 0.1) for s in shares)
    assert psi(bins, x) == pytest.approx(want, rel=1e-12)
    assert math.isnan(psi(bins, np.zeros(0)))


def test_repeated_quantiles_merge_their_bins() -> None:
    """A confidence of exactly 1.0 on 40% of the clean images: the top deciles are one bin."""
    q = np.concatenate([np.linspace(0.9, 0.99, 121), np.ones(80)])
    ref = ScoreReference(score="confidence", n=5000, quantiles=q.tolist(), refuse_rate=0.05)
    bins = ReferenceBins.of(ref)
    assert bins.edges[-1] == 1.0 and len(bins.edges) == 7  # 0.1 ... 0.6, then 1.0
    assert bins.expected.sum() == pytest.approx(1.0)
    # The images at exactly 1.0: quantile 121 of 0-200 is the first 1.0, so 121 / 200 of the
    # reference lies below it, read as refuse_rate_at(1.0) reads it.
    assert bins.expected[-1] == pytest.approx(1 - 121 / 200, abs=1e-12)
    assert psi(bins, np.ones(500)) == pytest.approx(
        (1 - bins.expected[-1]) * math.log(1 / bins.expected[-1])
        + sum((0.001 - e) * math.log(0.001 / e) for e in bins.expected[:-1]),
        rel=1e-9,
    )


def test_refuse_excess_z_by_hand() -> None:
    # 133 of 1000 against p0 = 5% measured on 5000 images: 83 / sqrt(1000 * 0.05 * 0.95 * 1.2).
    assert refuse_excess_z(133, 1000, 0.05, 5000) == pytest.approx(83 / math.sqrt(57.0))
    assert refuse_excess_z(50, 1000, 0.05, 5000) == 0.0
    assert math.isnan(refuse_excess_z(0, 0, 0.05, 5000))
    assert math.isnan(refuse_excess_z(3, 10, 0.0, 5000))


def test_z_counts_the_calibrations_own_error() -> None:
    """Simulated calibrations (n0 = 2000 held-out images) and windows (N = 1000) of the same
    clean stream: z has standard deviation 1 with the N / n0 term; without it, sqrt(1.5)."""
    rng = np.random.default_rng(0)
    p, n0, n = 0.05, 2000, 1000
    p0 = rng.binomial(n0, p, 20000) / n0
    k = rng.binomial(n, p, 20000)
    z = np.array([refuse_excess_z(int(a), n, float(b), n0) for a, b in zip(k, p0, strict=True)])
    assert abs(z.mean()) < 0.05
    assert z.std() == pytest.approx(1.0, abs=0.04)
    naive = (k - n * p0) / np.sqrt(n * p0 * (1 - p0))
    assert naive.std() == pytest.approx(math.sqrt(1.5), abs=0.06)


def test_window_keeps_the_last_values() -> None:
    w = Window(5)
    w.add(np.arange(3, dtype=np.float64))
    np.testing.assert_array_equal(w.recent(), [0, 1, 2])
    w.add(np.arange(3, 7, dtype=np.float64))  # wraps around
    np.testing.assert_array_equal(w.recent(), [2, 3, 4, 5, 6])
    w.add(np.arange(10, 22, dtype=np.float64))  # more than the window at once
    np.testing.assert_array_equal(w.recent(), [17, 18, 19, 20, 21])
    assert w.count == 19
