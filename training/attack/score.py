"""The thresholding test in torch, differentiable, for attacks that know the score.

A mirror of `service.scoring` (which stays the one reference: tests check the two agree on the
same logits). Computed in float64 like the numpy version, so CE models, whose non-maximal
probabilities underflow float32, keep a finite non-ME and a finite gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from service.scoring import Kernel

ScoreKind = Literal["j", "confidence"]
SCORES: tuple[ScoreKind, ...] = ("j", "confidence")
# The manifest's score names for the scores this mirror covers.
_MANIFEST_SCORES: dict[str, ScoreKind] = {"j_score": "j", "confidence": "confidence"}


def served_kind(manifest_score: str) -> ScoreKind:
    """The mirror's name for the score a model is served on (its manifest's `score`)."""
    if manifest_score not in _MANIFEST_SCORES:
        raise ValueError(
            f"the adaptive attacks know j_score and confidence; this model is served on "
            f"{manifest_score!r}"
        )
    return _MANIFEST_SCORES[manifest_score]


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
    """log J (Eq. 5 times confidence) or log confidence of class `cls`: (B, L), (B,) -> (B,)."""
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
