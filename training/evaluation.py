"""How well a score separates clean from adversarial samples, and how results are tabulated.

One home for what the attack report and the paper reproductions both need: ROC-AUC, the kernel
fit of Eq. (5), the threshold at a clean refuse rate, and markdown table cells. The scores
themselves come from `service.scoring`. Normal samples are the positive class throughout.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from service.scoring import (
    Kernel,
    kernel_mu,
    kernel_sigma,
    non_me_from_log_probs,
    threshold_for_refuse_rate,
)

F64 = npt.NDArray[np.float64]
Z95 = 1.959964  # the two-sided 95% point of the standard normal distribution


def fit_kernel(train_logits: npt.NDArray[np.floating], eta: float = 1.0) -> Kernel:
    """Eq. (5) parameters: mu = log(L-1), sigma from the non-ME of training samples (B, L)."""
    mu = kernel_mu(train_logits.shape[1])
    return Kernel(mu=mu, sigma=kernel_sigma(non_me_from_log_probs(train_logits), mu), eta=eta)


def roc_auc(normal: npt.ArrayLike, adversarial: npt.ArrayLike) -> float:
    """P(score of a random normal sample > that of a random adversarial one), ties count 1/2;
    NaN when either set is empty.

    The Mann-Whitney form of the ROC-AUC with normal samples as positives (sklearn agrees).
    """
    c, a = np.asarray(normal, np.float64), np.asarray(adversarial, np.float64)
    if c.size == 0 or a.size == 0:
        return float("nan")
    from sklearn.metrics import roc_auc_score

    y = np.concatenate([np.ones(c.size), np.zeros(a.size)])
    return float(roc_auc_score(y, np.concatenate([c, a])))


def auc_se(auc: float, n_pos: int, n_neg: int) -> float:
    """Standard error of a ROC-AUC from its value and the two sample sizes (Hanley & McNeil
    1982, Eq. 2): for results kept as aggregates, where the per-sample scores a bootstrap would
    resample are not kept. For well-separated normal scores it errs wide (about 1.3x the spread
    at AUC 0.96), so intervals built on it are conservative."""
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)
    return math.sqrt(max(var, 0.0) / (n_pos * n_neg))


def refuse_at_clean_rate(clean: F64, adversarial: F64, clean_refuse: float) -> tuple[float, float]:
    """(T, share of adversarial samples refused) at the T that refuses `clean_refuse` of clean."""
    t = threshold_for_refuse_rate(clean, clean_refuse)
    return t, float((adversarial < t).mean()) if adversarial.size else float("nan")


def pct(x: float | None, digits: int = 2) -> str:
    """0.9881 -> '98.81%'; None or NaN (no samples) -> 'n/a'."""
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.{digits}f}%"


def num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
