"""How far recent scores are from the held-out clean scores a model was calibrated on.

Both statistics are pure numpy functions of a window of recent scores and the manifest's
`ScoreReference` (201 quantiles of the held-out scores), tested against hand-computed values.

- PSI (population stability index) over `DRIFT_BINS` bins of equal reference mass:
  PSI = sum_i (a_i - e_i) ln(a_i / e_i), a the window's share of each bin, e the reference's.
  With N window images and no shift, N * PSI is about chi-square with bins - 1 degrees of
  freedom, so PSI ~ (bins - 1) / N (0.009 for 10 bins and N = 1000); the usual reading is
  < 0.1 no shift, 0.1-0.25 some, > 0.25 a large one.
- The refuse-rate excess z: see `refuse_excess_z`; the alert rule computes the same expression
  in PromQL from the exported counts (so that several workers' windows add up), and tests
  check the two against each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from service.manifest import ScoreReference

F64 = npt.NDArray[np.float64]
DRIFT_BINS = 10
# A bin the window does not reach counts as half an image: ln(a / e) stays finite.
EMPTY_BIN_IMAGES = 0.5


@dataclass(frozen=True)
class ReferenceBins:
    """Bins of about equal reference mass: an image with score s falls in bin
    searchsorted(edges, s, 'right'); `expected` is each bin's share of the held-out scores."""

    edges: F64  # (K - 1,) increasing inner edges
    expected: F64  # (K,) shares, sum 1

    @classmethod
    def of(cls, ref: ScoreReference, bins: int = DRIFT_BINS) -> ReferenceBins:
        """Deciles (for 10 bins) of the reference; repeated quantiles (a score that many clean
        images share, e.g. a confidence of exactly 1.0) merge their bins."""
        q = np.asarray(ref.quantiles, dtype=np.float64)
        inner = q[np.linspace(0, len(q) - 1, bins + 1).round().astype(int)[1:-1]]
        edges = np.unique(inner)
        # Share of reference scores below each edge: the same reading of the quantiles as the
        # refuse rate at a threshold (bins are [edge_i, edge_i+1), as accept() is score >= T).
        below = np.asarray([ref.refuse_rate_at(float(e)) for e in edges], dtype=np.float64)
        cdf = np.concatenate([[0.0], below, [1.0]])
        expected = np.diff(cdf)
        return cls(edges=edges, expected=expected)

    def shares(self, scores: F64) -> F64:
        """(K,) the share of `scores` in each bin."""
        idx = np.searchsorted(self.edges, scores, side="right")
        counts = np.bincount(idx, minlength=len(self.expected)).astype(np.float64)
        return counts / max(len(scores), 1)


def psi(bins: ReferenceBins, scores: F64) -> float:
    """Population stability index of `scores` against the reference bins."""
    n = len(scores)
    if n == 0:
        return math.nan
    floor = EMPTY_BIN_IMAGES / n
    a = np.maximum(bins.shares(scores), floor)
    e = np.maximum(bins.expected, floor)
    return float(np.sum((a - e) * np.log(a / e)))


def refuse_excess_z(refused: int, answered: int, p0: float, n0: int) -> float:
    """How many standard errors the window's refuse rate k/N lies above the calibrated p0.

    p0 was itself measured on n0 held-out images, so it is uncertain too: under "same rate"
    the difference k/N - p0 has variance p0 (1 - p0) (1/N + 1/n0) (the two-proportion test's,
    with the pooled rate replaced by p0), hence
        z = (k - N p0) / sqrt(N p0 (1 - p0) (1 + N / n0)).
    With N p0 >= 10 the normal approximation is good; one-sided, z > 4 happens by chance with
    probability 3e-5.
    """
    if answered == 0 or not 0.0 < p0 < 1.0:
        return math.nan
    var = answered * p0 * (1.0 - p0) * (1.0 + answered / n0)
    return (refused - answered * p0) / math.sqrt(var)
