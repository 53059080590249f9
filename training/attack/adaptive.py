"""Adaptive white-box attacks: they know the weights, the score and the served threshold T.

The attacker wins on an image when the served answer is a wrong label that is accepted
(score >= T). Every attack here works per image: an image is checked at every step, its first
winning version is kept and it leaves the batch, and random restarts are spent only on images
not yet won.

- "lagrangian": PGD on  loss(wrong class) + lambda * max(0, log T' - log score), with T' a
  little above T and lambda swept over the restarts;
- "selective" and "orthogonal" (Bryniarski et al. 2021): step on the classifier loss while the
  image is classified right, then on the score loss; "orthogonal" projects each gradient off
  the other so that one step does not undo the other;
- "pgd": the classifier loss alone, i.e. PGD against a model without the test (a sanity
  check against torchattacks);
- "cw-l2": Carlini & Wagner's L2 attack with the score term added (the C&W-wb attack of the
  RCE paper's official code), binary search on c, see `cw.py`.
The score is the J-score, the confidence or the K-density of the net's final hidden vector
(the RCE paper's second detector): for K-density the hinge pulls the features towards the
training features of the class the attack aims at.
Pixels are in [0, 1]; eps is a budget in pixel units: L-inf by default, L2 with norm="l2"
(the PGD attacks then step along the L2-normalised gradient and project onto the L2 ball).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from service.scoring import Kernel
from training.attack.score import KernelTensors, ScoreKind, log_k_density_at, log_score_at
from training.losses import Objective, served_logits

AttackName = Literal["lagrangian", "selective", "orthogonal", "pgd", "cw-l2", "apgd", "square"]
ATTACKS: tuple[AttackName, ...] = (
    "lagrangian", "selective", "orthogonal", "pgd", "cw-l2", "apgd", "square",
)  # fmt: skip
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
        log_t = math.log(self.threshold) if self.threshold > 0 else -math.inf
        return (label != y) & (log_score >= log_t)


@dataclass(frozen=True)
class AdaptiveConfig:
    """One adaptive attack. Steps follow a schedule from eps/4, halved every quarter of the
    steps, unless step_size is given (coarse steps first find the region, fine ones the
    accepted corner of it); in the budget's norm, L-inf (sign steps) or L2."""

    attack: AttackName = "lagrangian"
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
        if self.attack not in ATTACKS:
            raise ValueError(f"attack must be one of {', '.join(ATTACKS)}, got {self.attack!r}")
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
    if threat.threshold <= 0:
        return torch.zeros(len(y), dtype=torch.float64, device=logits.device)
    log_target = math.log(threat.threshold) + cfg.log_margin
    cls = logits.argmax(-1) if at_served else wrong_class(logits, y)
    return (log_target - threat.log_score(logits, cls, features)).clamp(min=0)


def _per_image(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) to broadcast over `like`'s image dimensions."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def l2_distance(adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) L2 norm of the perturbation in pixel units."""
    return (adv - x).flatten(1).norm(dim=1)


def _project_off(g: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """g minus its component along `other`, per image; (B, ...) -> (B, ...)."""
    gf, of = g.flatten(1), other.flatten(1)
    coef = (gf * of).sum(1) / (of * of).sum(1).clamp(min=1e-30)
    return (gf - coef[:, None] * of).view_as(g)


def descent_direction(
    threat: Threat,
    x: torch.Tensor,
    logits: torch.Tensor,
    y: torch.Tensor,
    cfg: AdaptiveConfig,
    lam: float,
    features: torch.Tensor | None = None,
) -> torch.Tensor:
    """The gradient to descend for one step of the configured attack, (B, C, H, W)."""
    c_loss = class_loss(logits, y, cfg).double()
    if cfg.attack == "pgd":
        return torch.autograd.grad(c_loss.sum(), x)[0]
    # Bryniarski et al. step on what the detector says about the served label.
    at_served = cfg.attack != "lagrangian"
    s_loss = score_loss(threat, logits, y, cfg, at_served, features)
    if cfg.attack == "lagrangian":
        return torch.autograd.grad((c_loss + lam * s_loss).sum(), x)[0]
    right = (logits.argmax(-1) == y).double()  # (B,) still classified right
    if cfg.attack == "selective":
        return torch.autograd.grad((right * c_loss + (1 - right) * s_loss).sum(), x)[0]
    # Orthogonal: both gradients from one forward pass, each projected off the other.
    g_c = torch.autograd.grad(c_loss.sum(), x, retain_graph=True)[0]
    g_s = torch.autograd.grad(s_loss.sum(), x)[0]
    r = _per_image(right.to(x.dtype), x)
    return r * _project_off(g_c, g_s) + (1 - r) * _project_off(g_s, g_c)


def steepest(grad: torch.Tensor, norm: Norm) -> torch.Tensor:
    """The unit step of steepest descent in the norm: sign for L-inf, grad / ||grad||_2 for L2."""
    if norm == "linf":
        return grad.sign()
    return grad / _per_image(grad.flatten(1).norm(dim=1).clamp(min=1e-12), grad)


def project(cur: torch.Tensor, x0: torch.Tensor, cfg: AdaptiveConfig) -> torch.Tensor:
    """Back onto the eps-ball around x0 in the budget's norm, then into the pixel box."""
    if cfg.norm == "linf":
        return torch.minimum(torch.maximum(cur, x0 - cfg.eps), x0 + cfg.eps).clamp(0.0, 1.0)
    scale = (cfg.eps / l2_distance(cur, x0).clamp(min=1e-12)).clamp(max=1.0)
    return (x0 + (cur - x0) * _per_image(scale, cur)).clamp(0.0, 1.0)


def random_start(
    shape: torch.Size, cfg: AdaptiveConfig, generator: torch.Generator
) -> torch.Tensor:
    """A random perturbation inside the budget: uniform in the L-inf box, or for L2 a random
    direction with a length uniform in [0, eps]."""
    if cfg.norm == "linf":
        return (torch.rand(shape, generator=generator) * 2 - 1) * cfg.eps
    d = torch.randn(shape, generator=generator)
    d = d / _per_image(d.flatten(1).norm(dim=1), d)
    return d * _per_image(torch.rand(shape[0], generator=generator) * cfg.eps, d)


def pgd_batch(
    threat: Threat,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: AdaptiveConfig,
    generator: torch.Generator,
) -> Result:
    """The PGD attacks (L-inf or L2) on one batch already on the net's device."""
    adv_out, spent = x.clone(), torch.zeros(len(x), dtype=torch.long)
    with torch.no_grad():  # a clean image served wrong and accepted is won at no cost
        logits, feats = threat.forward(x)
        won = threat.wins(logits, y, feats).cpu()
    for r in range(cfg.restarts):
        idx = (~won).nonzero()[:, 0]
        if len(idx) == 0:
            break
        lam = cfg.lambdas[r % len(cfg.lambdas)]
        x0, y0 = x[idx.to(x.device)], y[idx.to(x.device)]
        cur = (x0 + random_start(x0.shape, cfg, generator).to(x.device)).clamp(0.0, 1.0)
        for k in range(cfg.steps + 1):
            cur.requires_grad_(True)
            logits, feats = threat.forward(cur)
            w = threat.wins(logits, y0, feats)
            if w.any():
                hit = idx[w.cpu()]
                adv_out[hit.to(x.device)] = cur[w].detach()
                won[hit], spent[hit] = True, r * cfg.steps + k
            keep = ~w
            if k == cfg.steps or not keep.any():
                cur, idx = cur.detach()[keep], idx[keep.cpu()]
                break
            grad = descent_direction(threat, cur, logits, y0, cfg, lam, feats)[keep]
            cur, x0, y0, idx = cur.detach()[keep], x0[keep], y0[keep], idx[keep.cpu()]
            cur = project(cur - cfg.alpha(k) * steepest(grad, cfg.norm), x0, cfg)
        if len(idx):
            adv_out[idx.to(x.device)] = cur.detach()
            spent[idx] = (r + 1) * cfg.steps
    return Result(won, adv_out.detach(), spent)
