"""The thresholding test of Pang, Du & Zhu (RCE paper), in numpy, vectorised over a batch.

This is the only implementation of the formulas in the project: the service, calibration and the
attack tool all import it. Everything is computed in log space in float64 so that CE models,
whose non-maximal probabilities underflow float32, still get a finite non-ME.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

from service.kdensity import KernelSet, k_density

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Array = npt.NDArray[np.floating]

# The score a model's threshold T applies to; for every one, higher means "more like the
# training data" and an image is accepted iff score >= T (`accept`).
#   j_score:    confidence x kernel non-ME, Eq. (5): the RCE paper's thresholding test.
#   confidence: max softmax probability, the paper's baseline (and the usual one for CE).
#   energy:     logsumexp of the served logits, minus the free energy of Liu et al. 2020.
#   k_density:  kernel density of the final hidden vector (`service.kdensity`).
ScoreName = Literal["j_score", "confidence", "energy", "k_density"]
SCORE_NAMES: tuple[ScoreName, ...] = get_args(ScoreName)
# Scores that live in [0, 1]; energy is any real number.
UNIT_SCORES = frozenset({"j_score", "confidence", "k_density"})


def default_score(objective: str) -> ScoreName:
    """The score a model is thresholded on unless its manifest names another."""
    return "j_score" if objective == "rce" else "confidence"


# The label an image gets when it is refused: every API and client reads -1 as NOT SURE.
NOT_SURE = -1


def accept(score: Array, threshold: float) -> npt.NDArray[np.bool_]:
    """The thresholding test's rule: an image is answered iff its score >= T."""
    return np.asarray(score) >= threshold


@dataclass(frozen=True)
class Kernel:
    """Parameters of the kernel non-ME, Eq. (5)."""

    mu: float
    sigma: float
    eta: float = 1.0


@dataclass(frozen=True)
class Scores:
    """Per-sample results of the thresholding test for a batch of B samples."""

    label: I64  # (B,) argmax class, t_hat
    probabilities: F64  # (B, L)
    confidence: F64  # (B,) p[t_hat]
    non_me: F64  # (B,) Eq. (1)
    kernel_non_me: F64  # (B,) Eq. (5)
    j_score: F64  # (B,) confidence * kernel non-ME
    energy: F64  # (B,) logsumexp of the logits: minus the free energy (Liu et al. 2020)
    # (B, D) final hidden vectors and the kernel set, when the model has both: `k_density`
    # is computed from them when first read (most answers never show it).
    features: Array | None = None
    kernel_set: KernelSet | None = None
    score_name: ScoreName = "j_score"
    # (B,) whether each predicted label is certified on the ball of radius `certify_eps` around
    # its input (`service.certify`); None when the model has no bound graph. With
    # `certificate_required`, an uncertified answer is NOT SURE whatever its score (`decide`).
    certified: npt.NDArray[np.bool_] | None = None
    certify_eps: float | None = None
    certificate_required: bool = False

    @cached_property
    def k_density(self) -> F64 | None:
        """(B,) K-density against each image's predicted class, when the model has one."""
        if self.features is None or self.kernel_set is None:
            return None
        return k_density(self.features, self.label, self.kernel_set)

    @property
    def score(self) -> F64:
        """(B,) the values of the score the threshold applies to."""
        return self.named(self.score_name)

    def named(self, name: ScoreName) -> F64:
        """(B,) the values of one score; ValueError when this model cannot compute it."""
        if name == "k_density":
            if self.k_density is None:
                raise ValueError("k_density needs a features output and a kernel set")
            return self.k_density
        values: F64 = getattr(self, name)
        return values

    def rows(self, start: int, stop: int) -> Scores:
        """The samples start..stop-1 of the batch."""
        s = slice(start, stop)
        return Scores(
            self.label[s],
            self.probabilities[s],
            self.confidence[s],
            self.non_me[s],
            self.kernel_non_me[s],
            self.j_score[s],
            self.energy[s],
            None if self.features is None else self.features[s],
            self.kernel_set,
            self.score_name,
            None if self.certified is None else self.certified[s],
            self.certify_eps,
            self.certificate_required,
        )

    def __len__(self) -> int:
        return int(self.label.shape[0])


def _logsumexp(z: F64) -> F64:
    """Stable logsumexp over the last axis, kept: (B, L) -> (B, 1)."""
    m = z.max(axis=-1, keepdims=True)
    out: F64 = m + np.log(np.exp(z - m).sum(axis=-1, keepdims=True))
    return out


def log_softmax(logits: Array) -> F64:
    """Stable log-softmax over the last axis: (B, L) -> (B, L)."""
    z = np.asarray(logits, dtype=np.float64)
    out: F64 = z - _logsumexp(z)
    return out


def softmax(logits: Array) -> F64:
    """Softmax over the last axis: (B, L) -> (B, L)."""
    return np.exp(log_softmax(logits))


def non_me_from_log_probs(log_p: Array, top: I64 | None = None) -> F64:
    """Non-maximal entropy, Eq. (1): entropy of the non-maximal probabilities renormalised to 1.

    Takes log-probabilities (or any logits: the result is shift-invariant) of shape (B, L), and
    optionally their argmax when the caller has it already.
    """
    lp = np.asarray(log_p, dtype=np.float64)
    if top is None:
        top = lp.argmax(axis=-1)
    others = lp.copy()
    others[np.arange(others.shape[0]), top] = -np.inf
    # log q_i = log p_i - logsumexp_{j != t_hat} log p_j, for the L-1 non-maximal classes.
    m = others.max(axis=-1, keepdims=True)
    log_q = others - (m + np.log(np.exp(others - m).sum(axis=-1, keepdims=True)))
    q = np.exp(log_q)
    with np.errstate(invalid="ignore"):
        terms = np.where(q > 0, q * log_q, 0.0)
    return np.asarray(-terms.sum(axis=-1), dtype=np.float64)


def non_me(p: Array) -> F64:
    """Non-ME, Eq. (1), from probabilities p of shape (B, L)."""
    with np.errstate(divide="ignore"):
        return non_me_from_log_probs(np.log(np.asarray(p, dtype=np.float64)))


def kernel_mu(num_classes: int) -> float:
    """mu = log(L - 1), the largest possible non-ME (uniform non-maximal probabilities)."""
    return math.log(num_classes - 1)


def kernel_sigma(non_me_values: Array, mu: float) -> float:
    """sigma = sqrt(mean((nonME - mu)^2)) over the training set (below Eq. (5))."""
    v = np.asarray(non_me_values, dtype=np.float64)
    return float(np.sqrt(np.mean((v - mu) ** 2)))


def kernel_non_me(non_me_values: Array, kernel: Kernel) -> F64:
    """Kernel non-ME, Eq. (5): exp(-(nonME - mu)^2 / (eta * sigma^2))."""
    v = np.asarray(non_me_values, dtype=np.float64)
    return np.asarray(np.exp(-((v - kernel.mu) ** 2) / (kernel.eta * kernel.sigma**2)))


def score_logits(
    logits: Array,
    kernel: Kernel,
    score: ScoreName = "j_score",
    features: Array | None = None,
    kernel_set: KernelSet | None = None,
) -> Scores:
    """Run the whole thresholding test on the vector fed to the softmax (B, L).

    For an RCE model that vector is -Z (reverse logits), for a CE model Z. `score` names the
    score a threshold applies to (`decide`); K-density is there (computed when first read) when
    `features` (B, D) and a `kernel_set` are given, against the kernel set of each image's
    predicted class.
    """
    z = np.asarray(logits, dtype=np.float64)
    lse = _logsumexp(z)  # (B, 1): the energy, and what log-softmax subtracts
    lp = z - lse
    label = lp.argmax(axis=-1).astype(np.int64)
    probs = np.exp(lp)
    conf = probs.max(axis=-1)  # p[t_hat]
    nme = non_me_from_log_probs(lp, label)
    knme = kernel_non_me(nme, kernel)
    j = conf * knme
    has_kd = features is not None and kernel_set is not None
    if score == "k_density" and not has_kd:
        raise ValueError("the k_density score needs features and a kernel set")
    return Scores(
        label=label,
        probabilities=probs,
        confidence=conf,
        non_me=nme,
        kernel_non_me=knme,
        j_score=j,
        energy=lse[:, 0],
        features=np.asarray(features) if has_kd else None,
        kernel_set=kernel_set if has_kd else None,
        score_name=score,
    )


def answered(
    score: Array,
    threshold: float,
    certified: npt.NDArray[np.bool_] | None = None,
    required: bool = False,
) -> npt.NDArray[np.bool_]:
    """(B,) whether each image gets its label: score >= T and, where the model requires a
    certificate, the label is certified. `decide` and whoever keeps only these arrays use it."""
    ok = accept(score, threshold)
    if required:
        if certified is None:
            raise ValueError("the model requires a certificate but none was computed")
        ok = ok & certified
    return ok


def decide(scores: Scores, threshold: float) -> I64:
    """(B,) the decision at T: the predicted label, or NOT_SURE (-1) where score < T, and where
    the model requires a certificate, also where the label is not certified."""
    ok = answered(scores.score, threshold, scores.certified, scores.certificate_required)
    return np.where(ok, scores.label, NOT_SURE).astype(np.int64)


def threshold_for_refuse_rate(j_scores: Array, refuse_rate: float) -> float:
    """The threshold T that refuses (score < T) the given share of these (clean) samples.

    Works for any score; with refuse_rate 0 it is the lowest score (0.0 when there is none).
    """
    if not 0.0 <= refuse_rate < 1.0:
        raise ValueError(f"refuse_rate must be in [0, 1), got {refuse_rate}")
    j = np.sort(np.asarray(j_scores, dtype=np.float64))
    if j.size == 0:
        return 0.0
    if refuse_rate == 0.0:
        return float(min(j[0], 0.0))
    # Refuse exactly the k lowest scores: T is the (k+1)-th smallest score.
    k = math.floor(refuse_rate * j.size)
    return float(j[min(k, j.size - 1)])


@dataclass(frozen=True)
class Outcome:
    """A request's scores, the T applied to them and the decision: label or NOT_SURE (-1)."""

    scores: Scores
    threshold: float
    labels: npt.NDArray[np.int64]

    @property
    def accepted(self) -> npt.NDArray[np.bool_]:
        accepted: npt.NDArray[np.bool_] = self.labels != NOT_SURE
        return accepted
