"""Thresholds with a statistical guarantee over the draw of the n held-out calibration images.

Both rules treat the n held-out images as an i.i.d. sample of the images the model will see, and
promise something about *new* images with probability >= `confidence` over that sample.

- `clean_refuse_threshold`: the refuse rate on clean images is <= A. T is the k-th smallest
  held-out score, with k as large as the exact binomial (Clopper-Pearson) bound allows: the true
  refuse rate of T = s_(k) is F(s_(k)) ~ Beta(k, n - k + 1) for a continuous score, so
  P(rate > A) = P(Binomial(n, A) <= k - 1), and k is the largest with that <= 1 - confidence.
  Equivalently: T refuses k - 1 of the n held-out images, and the one-sided Clopper-Pearson upper
  bound of the refuse rate for k - 1 refusals in n is <= A. Exact for any n, distribution-free;
  ties in the scores only make it more conservative.
- `selective_risk_threshold`: the error rate among accepted images is <= R, the SGR algorithm of
  Geifman & El-Yaniv (2017, "Selective classification for deep neural networks"): a binary
  search over ceil(log2 n) candidate thresholds, each with the binomial (Clopper-Pearson) upper
  bound of its selective risk at level (1 - confidence) / ceil(log2 n) (Bonferroni), keeping the
  lowest threshold (most coverage) whose bound is below R.

Everything is vectorised over a leading axis of independent calibration sets, so that the
simulation tests can check the promises on thousands of draws in milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import stats

F64 = npt.NDArray[np.float64]


class NoThreshold(ValueError):
    """No threshold keeps the promise with this many calibration images."""


def clean_refuse_rank(n: int, target: float, confidence: float) -> int:
    """The largest k in 0..n with P(Binomial(n, target) <= k - 1) <= 1 - confidence.

    T = the k-th smallest held-out score then refuses at most `target` of clean images with
    probability >= confidence; k = 0 means no score qualifies (T must refuse nothing).
    """
    _check(target, confidence)
    # cdf(k - 1) is increasing in k; count the k >= 1 whose cdf(k - 1) stays under the level.
    cdf = stats.binom.cdf(np.arange(n), n, target)  # cdf[k - 1] for k = 1..n
    return int(np.searchsorted(cdf, 1.0 - confidence, side="right"))


def clean_refuse_threshold(scores: npt.ArrayLike, target: float, confidence: float) -> float:
    """T for one calibration set of clean scores (1-D); raises NoThreshold when n is too small."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    k = clean_refuse_rank(s.size, target, confidence)
    if k == 0:
        need = math.ceil(math.log(1.0 - confidence) / math.log(1.0 - target))
        raise NoThreshold(
            f"{s.size} calibration images cannot bound the refuse rate at {target:.2%} with "
            f"{confidence:.0%} confidence; use at least {need}, a larger target or a lower "
            "confidence"
        )
    return float(s[k - 1])


def clean_refuse_thresholds(scores: F64, target: float, confidence: float) -> F64:
    """`clean_refuse_threshold` for each row of (draws, n) scores at once."""
    k = clean_refuse_rank(scores.shape[1], target, confidence)
    if k == 0:
        raise NoThreshold(f"n = {scores.shape[1]} is too small for this target and confidence")
    return np.asarray(np.sort(scores, axis=1)[:, k - 1])


def binomial_upper(errors: npt.ArrayLike, n: npt.ArrayLike, delta: float) -> F64:
    """One-sided Clopper-Pearson upper bound on a rate from `errors` in `n` trials, level delta.

    The b with P(Binomial(n, b) <= errors) = delta (Geifman & El-Yaniv's B*); 1 when errors = n
    or n = 0.
    """
    e = np.asarray(errors, dtype=np.float64)
    m = np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        b = stats.beta.ppf(1.0 - delta, e + 1.0, m - e)
    return np.asarray(np.where((e >= m) | (m <= 0), 1.0, b), dtype=np.float64)


@dataclass(frozen=True)
class SelectiveRisk:
    """SGR's answer for one calibration set: T, the certified risk bound, and what T does on
    the calibration set itself."""

    threshold: float
    bound: float
    coverage: float
    risk: float


def selective_risk_search(
    scores: F64, errors: npt.NDArray[np.bool_], target: float, confidence: float
) -> tuple[F64, F64]:
    """SGR on each row of (draws, n) scores and error indicators.

    Returns (T, bound) per row; T = +inf (accept nothing) and bound = nan where no candidate's
    bound was below the target.
    """
    _check(target, confidence)
    draws, n = scores.shape
    order = np.argsort(-scores, axis=1, kind="stable")  # descending: accepted = a prefix
    s_desc = np.take_along_axis(scores, order, axis=1)
    err_desc = np.take_along_axis(errors.astype(np.int64), order, axis=1)
    cum_err = np.cumsum(err_desc, axis=1)  # errors among the top m, at index m - 1
    steps = max(1, math.ceil(math.log2(n)))
    delta = (1.0 - confidence) / steps  # Bonferroni over the candidates tested
    rows = np.arange(draws)
    # Binary search on m, the number of images accepted: T = the m-th largest score.
    lo, hi = np.zeros(draws, np.int64), np.full(draws, n, np.int64)
    best_t, best_b = np.full(draws, np.inf), np.full(draws, np.nan)
    best_m = np.zeros(draws, np.int64)
    for _ in range(steps):
        m = np.maximum((lo + hi + 1) // 2, 1)
        t = s_desc[rows, m - 1]
        # Accepted = every score >= t (ties included), as `service.scoring.accept` decides.
        m_acc = (scores >= t[:, None]).sum(axis=1)
        b = binomial_upper(cum_err[rows, m_acc - 1], m_acc, delta)
        ok = b < target
        better = ok & (m_acc > best_m)
        best_t, best_b, best_m = (
            np.where(better, t, best_t),
            np.where(better, b, best_b),
            np.where(better, m_acc, best_m),
        )
        lo, hi = np.where(ok, m, lo), np.where(ok, hi, m - 1)
    return best_t, best_b


def selective_risk_threshold(
    scores: npt.ArrayLike, correct: npt.ArrayLike, target: float, confidence: float
) -> SelectiveRisk:
    """SGR for one calibration set: scores (n,) and whether each prediction was right (n,)."""
    s = np.asarray(scores, dtype=np.float64)[None, :]
    err = ~np.asarray(correct, dtype=bool)[None, :]
    t, b = selective_risk_search(s, err, target, confidence)
    if not np.isfinite(t[0]):
        raise NoThreshold(
            f"no threshold certifies a selective risk below {target:.2%} with {confidence:.0%} "
            f"confidence on {s.shape[1]} calibration images; allow a larger risk, a lower "
            "confidence, or calibrate on more images"
        )
    acc = s[0] >= t[0]
    return SelectiveRisk(
        threshold=float(t[0]),
        bound=float(b[0]),
        coverage=float(acc.mean()),
        risk=float(err[0][acc].mean()),
    )


def _check(target: float, confidence: float) -> None:
    if not 0.0 < target < 1.0:
        raise ValueError(f"the target must be in (0, 1), got {target}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"the confidence must be in (0, 1), got {confidence}")
