"""What every adaptive attack shares: the threat (what the attacker knows), the attack's
configuration, its per-image result and the two losses it descends.

The attacker wins on an image when the served answer is a wrong label that is accepted
(score >= T). The score is the J-score, the confidence or the K-density of the net's final
hidden vector (the RCE paper's second detector): for K-density the hinge pulls the features
towards the training features of the class the attack aims at. Pixels are in [0, 1]; eps is a
budget in pixel units: L-inf by default, L2 with norm="l2".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from service.scoring import Kernel
from training.attacks.registry import names
from training.losses import Objective, served_logits
from training.torch_scoring import (
    KernelTensors,
    ScoreKind,
    log_k_density_at,
    log_score_at,
    log_threshold,
)

ClassLoss = Literal["margin", "ce"]
Norm = Literal["linf", "l2"]


@dataclass(frozen=True)
class Threat:
    """What the attacker knows: the network, what it serves, the score and the served T.

    The K-density score also needs the kernel set (`kernel_set`), and its callers pass the
    net's features (from `forward`) wherever they pass logits."""

    net: nn.Module
    objective: Objective
    kernel: Kernel
    threshold: float
    score: ScoreKind = "j"
    kernel_set: KernelTensors | None = None

    def __post_init__(self) -> None:
        if self.score == "k_density" and self.kernel_set is None:
            raise ValueError("the k_density score needs the model's kernel set (kernel_set)")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L) the vector the served softmax is applied to."""
        return served_logits(self.objective, self.net(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, C, H, W) -> served logits (B, L) and, for K-density, the features (B, D)."""
        if self.score != "k_density":
            return self.logits(x), None
        feats = self.net.features(x)  # type: ignore[operator]
        return served_logits(self.objective, self.net.fc(feats)), feats  # type: ignore[operator]

    @property
    def log_threshold(self) -> float:
        """T where `log_score` lives (log T; T itself for the energy; -inf: accept all)."""
        return log_threshold(self.score, self.threshold)

    def log_score(
        self, logits: torch.Tensor, cls: torch.Tensor, features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B,) log of the score the image would get if `cls` were its label, float64."""
        if self.score != "k_density":
            return log_score_at(logits, cls, self.kernel, self.score)
        if features is None or self.kernel_set is None:
            raise ValueError("the k_density score needs the features from Threat.forward")
        return log_k_density_at(features, cls, self.kernel_set)

    def wins(
        self, logits: torch.Tensor, y: torch.Tensor, features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B,) bool: the served answer is a wrong label and it is accepted."""
        label = logits.detach().argmax(-1)
        feats = None if features is None else features.detach()
        log_score = self.log_score(logits.detach(), label, feats)
        return (label != y) & (log_score >= self.log_threshold)


@dataclass(frozen=True)
class AdaptiveConfig:
    """One adaptive attack. Steps follow a schedule from eps/4, halved every quarter of the
    steps, unless step_size is given (coarse steps first find the region, fine ones the
    accepted corner of it); in the budget's norm, L-inf (sign steps) or L2."""

    attack: str = "lagrangian"  # a registered adaptive attack (`names("adaptive")`)
    eps: float = 0.3
    steps: int = 200
    restarts: int = 5
    loss: ClassLoss = "margin"
    lambdas: tuple[float, ...] = (1.0, 10.0)  # Lagrangian weights, cycled over the restarts
    log_margin: float = 0.1  # T' = T * exp(log_margin): aim a little above the served T
    kappa: float = 2.0  # the margin loss stops rewarding once the wrong class leads by kappa
    step_size: float | None = None
    seed: int = 0
    norm: Norm = "linf"  # the budget's norm for the PGD attacks (C&W is always L2)
    cw_c: float = 10.0  # C&W: initial constant c, then binary search
    cw_lr: float = 0.1  # C&W: Adam's first learning rate in tanh space, decayed to 1% of it
    # C&W: Adam's second-moment decay. The default 0.999 remembers the huge first gradients of
    # the score term (log J starts far below log T) for ~1,000 steps and freezes a 200-step
    # run: on 20 RCE ResNet-32 images 2 of 20 won with 0.999, 18 of 20 with 0.9.
    cw_beta2: float = 0.9

    def __post_init__(self) -> None:
        if self.attack not in names("adaptive"):
            known = ", ".join(names("adaptive"))
            raise ValueError(f"attack must be one of {known}, got {self.attack!r}")
        if self.loss not in ("margin", "ce"):
            raise ValueError(f"loss must be 'margin' or 'ce', got {self.loss!r}")
        if self.norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {self.norm!r}")
        # An L2 budget can exceed one pixel's range: up to sqrt(784) = 28 for a 28x28 image.
        top = 1.0 if self.norm == "linf" else 28.0
        if not 0.0 <= self.eps <= top:
            raise ValueError(f"eps is in pixel units and must be in [0, {top:g}], got {self.eps}")
        if self.steps < 1 or self.restarts < 1 or not self.lambdas:
            raise ValueError("steps and restarts must be >= 1 and lambdas non-empty")

    def alpha(self, k: int) -> float:
        if self.step_size is not None:
            return self.step_size
        return self.eps / 4 * 0.5 ** min(3, 4 * k // self.steps)


@dataclass(frozen=True)
class Result:
    """Per image of a batch: whether it was won, the image kept, and the steps spent on it."""

    won: torch.Tensor  # (B,) bool
    adv: torch.Tensor  # (B, C, H, W): the first winning image, else the last iterate
    spent: torch.Tensor  # (B,) gradient steps until the win (or all steps spent)

    @classmethod
    def judged(cls, threat: Threat, adv: torch.Tensor, y: torch.Tensor, spent: int) -> Result:
        """The outcome of a third-party attack's finished images: won = the served answer is
        a wrong label that the test accepts; `spent` (steps or queries) charged to each."""
        adv = adv.detach()
        with torch.no_grad():
            logits, features = threat.forward(adv)
            won = threat.wins(logits, y, features).cpu()
        return cls(won, adv, torch.full((len(adv),), spent, dtype=torch.long))


def wrong_class(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) the strongest wrong class, the one an untargeted attack pushes up."""
    return logits.masked_fill(F.one_hot(y, logits.shape[-1]).bool(), float("-inf")).argmax(-1)


def class_loss(logits: torch.Tensor, y: torch.Tensor, cfg: AdaptiveConfig) -> torch.Tensor:
    """(B,) to minimise: the margin s_y - max_{i != y} s_i (floored at -kappa) or the CE of
    the strongest wrong class."""
    t = wrong_class(logits, y)
    if cfg.loss == "ce":
        return F.cross_entropy(logits, t, reduction="none")
    s_y = logits.gather(-1, y[:, None])[:, 0]
    s_t = logits.gather(-1, t[:, None])[:, 0]
    return (s_y - s_t).clamp(min=-cfg.kappa)


def score_loss(
    threat: Threat,
    logits: torch.Tensor,
    y: torch.Tensor,
    cfg: AdaptiveConfig,
    at_served: bool = False,
    features: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B,) hinge max(0, log T' - log score), the score taken at the strongest wrong class
    (the one the attack aims at) or, with at_served, at the served label (what is detected).
    For K-density that class picks the kernel set the features are pulled towards."""
    if threat.log_threshold == -math.inf:
        return torch.zeros(len(y), dtype=torch.float64, device=logits.device)
    log_target = threat.log_threshold + cfg.log_margin
    cls = logits.argmax(-1) if at_served else wrong_class(logits, y)
    return (log_target - threat.log_score(logits, cls, features)).clamp(min=0)


def per_image(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) to broadcast over `like`'s image dimensions."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def l2_distance(adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) L2 norm of the perturbation in pixel units."""
    return (adv - x).flatten(1).norm(dim=1)
