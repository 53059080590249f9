"""The thresholding test in torch, differentiable, for attacks that know the score.

A mirror of `service.scoring` and `service.kdensity` (which stay the one reference: tests check
the two agree on the same logits and features). Computed in float64 like the numpy version, so
CE models, whose non-maximal probabilities underflow float32, keep a finite non-ME and a finite
gradient, and far-away features keep a finite log K-density.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from service.kdensity import KernelSet
from service.scoring import Kernel, ScoreName

ScoreKind = Literal["j", "confidence", "energy", "k_density"]
SCORES: tuple[ScoreKind, ...] = ("j", "confidence", "energy", "k_density")
# The manifest's score names for the scores this mirror covers.
_MANIFEST_SCORES: dict[str, ScoreKind] = {
    "j_score": "j",
    "confidence": "confidence",
    "energy": "energy",
    "k_density": "k_density",
}
_SERVICE_NAMES: dict[ScoreKind, ScoreName] = {
    "j": "j_score",
    "confidence": "confidence",
    "energy": "energy",
    "k_density": "k_density",
}


def log_threshold(kind: ScoreKind, threshold: float) -> float:
    """T in the space the mirror's scores are in: log T, except for the energy, which is a
    logarithm already (logsumexp of the logits) and is compared with T as it is. A score in
    [0, 1] against T <= 0: -inf, every answer accepted."""
    if kind == "energy":
        return threshold
    return math.log(threshold) if threshold > 0 else -math.inf


def served_kind(manifest_score: str) -> ScoreKind:
    """The mirror's name for the score a model is served on (its manifest's `score`)."""
    if manifest_score not in _MANIFEST_SCORES:
        raise ValueError(
            f"the adaptive attacks know {', '.join(_MANIFEST_SCORES)}; this model is served on "
            f"{manifest_score!r}"
        )
    return _MANIFEST_SCORES[manifest_score]


def service_name(kind: ScoreKind) -> ScoreName:
    """The service's name (`service.scoring.ScoreName`) for one of the mirror's scores."""
    return _SERVICE_NAMES[kind]


@dataclass(frozen=True)
class KernelTensors:
    """A `KernelSet` as a float64 tensor, (L, N, D), converted once for every attack step."""

    features: torch.Tensor
    sigma2: float

    @classmethod
    def of(cls, kset: KernelSet, device: torch.device | str = "cpu") -> KernelTensors:
        feats = torch.from_numpy(kset.features.astype("float64")).to(device)
        return cls(feats, kset.sigma2)


def log_k_density_at(
    features: torch.Tensor, cls: torch.Tensor, kset: KernelTensors
) -> torch.Tensor:
    """log KD of `service.kdensity` against the kernel set of class `cls`: (B, D), (B,) -> (B,).

    The squared distances are taken as differences, not |f|^2 - 2 f.f_i + |f_i|^2 as numpy
    does: same value to rounding, and the gradient 2 (f - f_i) stays exact near a kernel point.
    """
    ref = kset.features[cls]  # (B, N, D) the kernel set of each image's class
    d2 = ((features.double()[:, None, :] - ref) ** 2).sum(-1)  # (B, N)
    return torch.logsumexp(-d2 / kset.sigma2, dim=-1) - math.log(ref.shape[1])


@dataclass(frozen=True)
class Served:
    """What the service decides for a batch of B images, with log scores kept differentiable."""

    label: torch.Tensor  # (B,) argmax class t_hat
    log_score: torch.Tensor  # (B,) log J or log confidence at t_hat, float64


def non_me_at(log_p: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """Non-ME, Eq. (1), with class `cls` taken as the maximal one: (B, L), (B,) -> (B,).

    For cls = argmax this is the paper's non-ME; other classes give the non-ME the image would
    have if `cls` became the prediction, which an attack aiming at `cls` needs.
    """
    mask = torch.nn.functional.one_hot(cls, log_p.shape[-1]).bool()  # (B, L)
    lse = torch.logsumexp(log_p.masked_fill(mask, float("-inf")), dim=-1, keepdim=True)
    # (B, L) log q_i for i != cls. The entry at cls is set to 0 before exp(): left as it is,
    # it can overflow (exp(+800) for a confident CE net) and put 0 * inf = NaN into the
    # backward pass even though where() drops it from the forward one.
    log_q = torch.where(mask, torch.zeros_like(log_p), log_p - lse)
    terms = torch.where(mask, torch.zeros_like(log_q), log_q.exp() * log_q)
    return -terms.sum(dim=-1)


def log_score_at(
    served_logits: torch.Tensor, cls: torch.Tensor, kernel: Kernel, kind: ScoreKind = "j"
) -> torch.Tensor:
    """log J (Eq. 5 times confidence) or log confidence of class `cls`: (B, L), (B,) -> (B,);
    for the energy, logsumexp of the logits (Liu et al. 2020), the same for every class.

    K-density is not a function of the logits: use `log_k_density_at` on the features."""
    if kind == "k_density":
        raise ValueError("k_density is computed from the features: use log_k_density_at")
    if kind == "energy":
        return torch.logsumexp(served_logits.double(), dim=-1)
    log_p = torch.log_softmax(served_logits.double(), dim=-1)  # (B, L)
    log_conf = log_p.gather(-1, cls[:, None])[:, 0]
    if kind == "confidence":
        return log_conf
    # log of the kernel non-ME, Eq. (5): -(nonME - mu)^2 / (eta * sigma^2).
    nme = non_me_at(log_p, cls)
    return log_conf - (nme - kernel.mu) ** 2 / (kernel.eta * kernel.sigma**2)


def served(served_logits: torch.Tensor, kernel: Kernel, kind: ScoreKind = "j") -> Served:
    """The service's decision inputs: the argmax label and its log score."""
    label = served_logits.argmax(dim=-1)
    return Served(label, log_score_at(served_logits, label, kernel, kind))
