"""White-box gradient attacks of the paper's Section 4.4: FGSM, BIM, PGD and targeted ILLC.

All attacks work on pixels in [0, 1] with an L-inf budget `eps` in pixel units, on the
un-wrapped network (forward returns Z) plus its training objective, which says what the model
serves: softmax(-Z) for RCE nets, softmax(Z) for CE nets.

Two cost functions J (paper, Section 4.4):
- "ce": the cross-entropy of the classifier the model serves, on the served logits;
- "rce": the RCE loss (Eq. 4) of the opposite 'liar' classifier, i.e. on the negated served
  logits (Z for RCE nets, -Z for CE nets).
Untargeted attacks ascend J at the true or the predicted label; ILLC descends J at the clean
image's least-likely class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from training.attacks.registry import get, names, register
from training.losses import Objective, rce_loss, served_logits

Method = Literal["fgsm", "bim", "pgd", "illc"]  # the classic attacks registered below
Cost = Literal["ce", "rce"]
LabelSource = Literal["true", "pred"]
COSTS: tuple[Cost, ...] = ("ce", "rce")


@dataclass(frozen=True)
class AttackConfig:
    """One attack. Iterative methods take `steps` steps of `step_size` (default 2.5*eps/steps,
    enough to reach the L-inf ball's surface, as in Madry et al.)."""

    method: Method = "fgsm"
    eps: float = 0.1
    cost: Cost = "ce"
    labels: LabelSource = "true"  # ignored by ILLC, whose target is the least-likely class
    steps: int = 10
    step_size: float | None = None
    seed: int = 0  # PGD's random start
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.method not in names("classic"):
            known = ", ".join(names("classic"))
            raise ValueError(f"method must be one of {known}, got {self.method!r}")
        if self.cost not in COSTS:
            raise ValueError(f"cost must be 'ce' or 'rce', got {self.cost!r}")
        if self.labels not in ("true", "pred"):
            raise ValueError(f"labels must be 'true' or 'pred', got {self.labels!r}")
        if not 0.0 <= self.eps <= 1.0:
            raise ValueError(f"eps is in pixel units and must be in [0, 1], got {self.eps}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")

    @property
    def alpha(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps


def cost_value(
    objective: Objective, z: torch.Tensor, target: torch.Tensor, cost: Cost
) -> torch.Tensor:
    """J summed over the batch, so that each image's gradient is independent of the batch size.

    z: (B, L) logits Z of the un-wrapped net; target: (B,) labels.
    """
    served = served_logits(objective, z)  # (B, L), fed to the served softmax
    if cost == "ce":
        return F.cross_entropy(served, target, reduction="sum")
    # The liar classifier is the softmax of the negated served logits; Eq. (4) on it.
    return rce_loss(-served, target) * target.shape[0]


def _device(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


@torch.no_grad()
def served_predictions(
    net: nn.Module, objective: Objective, x: torch.Tensor, batch: int = 500
) -> torch.Tensor:
    """(N, C, H, W) -> (N, L) served logits, on the CPU, in batches to bound memory."""
    device = _device(net)
    parts = [served_logits(objective, net(x[i : i + batch].to(device))).cpu()
             for i in range(0, len(x), batch)]  # fmt: skip
    return torch.cat(parts) if parts else torch.zeros((0, 0))


def input_gradient_sign(
    net: nn.Module, objective: Objective, x: torch.Tensor, target: torch.Tensor, cost: Cost
) -> torch.Tensor:
    """sign(grad_x J(x, target)) for one batch already on the net's device."""
    x = x.detach().clone().requires_grad_(True)
    loss = cost_value(objective, net(x), target, cost)
    (grad,) = torch.autograd.grad(loss, x)
    return grad.sign()


def attack_targets(
    net: nn.Module, objective: Objective, x: torch.Tensor, y: torch.Tensor, cfg: AttackConfig
) -> torch.Tensor:
    """The label each image is attacked at: true, predicted, or least likely (ILLC)."""
    if cfg.method == "illc":
        return served_predictions(net, objective, x).argmin(dim=1)
    if cfg.labels == "pred":
        return served_predictions(net, objective, x).argmax(dim=1)
    return y


def fgsm_direction(
    net: nn.Module, objective: Objective, x: torch.Tensor, target: torch.Tensor, cfg: AttackConfig
) -> torch.Tensor:
    """sign(grad_x J) for a whole set, batched; FGSM at any eps is clip(x + eps * this, 0, 1).

    The direction does not depend on eps, so an eps sweep needs one gradient per image.
    """
    device = _device(net)
    parts = []
    for i in range(0, len(x), cfg.batch_size):
        xb, tb = x[i : i + cfg.batch_size].to(device), target[i : i + cfg.batch_size].to(device)
        parts.append(input_gradient_sign(net, objective, xb, tb, cfg.cost).cpu())
    return torch.cat(parts) if parts else torch.zeros_like(x)


@register("classic", "fgsm")
def fgsm(
    net: nn.Module, objective: Objective, x: torch.Tensor, target: torch.Tensor,
    cfg: AttackConfig, generator: torch.Generator | None = None,
) -> torch.Tensor:  # fmt: skip
    """FGSM on one batch: x* = clip(x + eps * sign(grad_x J), 0, 1)."""
    return (x + cfg.eps * input_gradient_sign(net, objective, x, target, cfg.cost)).clamp(0, 1)


@register("classic", "bim", "pgd", "illc")
def iterate(
    net: nn.Module, objective: Objective, x: torch.Tensor, target: torch.Tensor,
    cfg: AttackConfig, generator: torch.Generator | None = None,
) -> torch.Tensor:  # fmt: skip
    """BIM/PGD/ILLC on one batch: x_{k+1} = clip_{x,eps}(x_k +- alpha * sign(grad J(x_k)))."""
    # ILLC is targeted: it descends J towards the least-likely class.
    sign = -1.0 if cfg.method == "illc" else 1.0
    adv = x.clone()
    if cfg.method == "pgd":
        noise = torch.rand(x.shape, generator=generator) * 2 * cfg.eps - cfg.eps
        adv = (adv + noise.to(x.device)).clamp(0.0, 1.0)
    for _ in range(cfg.steps):
        step = input_gradient_sign(net, objective, adv, target, cfg.cost)
        adv = adv + sign * cfg.alpha * step
        adv = torch.minimum(torch.maximum(adv, x - cfg.eps), x + cfg.eps).clamp(0.0, 1.0)
    return adv.detach()


def attack(
    net: nn.Module, objective: Objective, x: torch.Tensor, y: torch.Tensor, cfg: AttackConfig
) -> torch.Tensor:
    """Adversarial versions of x (N, C, H, W) in [0, 1], on the CPU; the net stays in eval mode.

    Runs on the device the net's parameters are on; x and y may live anywhere.
    """
    was_training = net.training
    net.eval()  # batch-norm statistics must not move while attacking
    try:
        target = attack_targets(net, objective, x, y, cfg)
        run = get("classic", cfg.method)
        device = _device(net)
        generator = torch.Generator().manual_seed(cfg.seed)
        parts = []
        for i in range(0, len(x), cfg.batch_size):
            xb = x[i : i + cfg.batch_size].to(device)
            tb = target[i : i + cfg.batch_size].to(device)
            parts.append(run(net, objective, xb, tb, cfg, generator).cpu())
        return torch.cat(parts) if parts else x.cpu().clone()
    finally:
        net.train(was_training)
