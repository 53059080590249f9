"""The PGD attacks against the thresholding test, per image (L-inf or L2 budget).

Every attack here works per image: an image is checked at every step, its first winning
version is kept and it leaves the batch, and random restarts are spent only on images not yet
won.

- "lagrangian": PGD on  loss(wrong class) + lambda * max(0, log T' - log score), with T' a
  little above T and lambda swept over the restarts;
- "selective" and "orthogonal" (Bryniarski et al. 2021): step on the classifier loss while the
  image is classified right, then on the score loss; "orthogonal" projects each gradient off
  the other so that one step does not undo the other;
- "pgd": the classifier loss alone, i.e. PGD against a model without the test (a sanity
  check against torchattacks).

With norm="l2" the attacks step along the L2-normalised gradient and project onto the L2 ball.
"""

from __future__ import annotations

import torch

from training.attacks.registry import register
from training.attacks.threat import (
    AdaptiveConfig,
    Norm,
    Result,
    Threat,
    class_loss,
    l2_distance,
    per_image,
    score_loss,
)


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
    r = per_image(right.to(x.dtype), x)
    return r * _project_off(g_c, g_s) + (1 - r) * _project_off(g_s, g_c)


def steepest(grad: torch.Tensor, norm: Norm) -> torch.Tensor:
    """The unit step of steepest descent in the norm: sign for L-inf, grad / ||grad||_2 for L2."""
    if norm == "linf":
        return grad.sign()
    return grad / per_image(grad.flatten(1).norm(dim=1).clamp(min=1e-12), grad)


def project(cur: torch.Tensor, x0: torch.Tensor, cfg: AdaptiveConfig) -> torch.Tensor:
    """Back onto the eps-ball around x0 in the budget's norm, then into the pixel box."""
    if cfg.norm == "linf":
        return torch.minimum(torch.maximum(cur, x0 - cfg.eps), x0 + cfg.eps).clamp(0.0, 1.0)
    scale = (cfg.eps / l2_distance(cur, x0).clamp(min=1e-12)).clamp(max=1.0)
    return (x0 + (cur - x0) * per_image(scale, cur)).clamp(0.0, 1.0)


def random_start(
    shape: torch.Size, cfg: AdaptiveConfig, generator: torch.Generator
) -> torch.Tensor:
    """A random perturbation inside the budget: uniform in the L-inf box, or for L2 a random
    direction with a length uniform in [0, eps]."""
    if cfg.norm == "linf":
        return (torch.rand(shape, generator=generator) * 2 - 1) * cfg.eps
    d = torch.randn(shape, generator=generator)
    d = d / per_image(d.flatten(1).norm(dim=1), d)
    return d * per_image(torch.rand(shape[0], generator=generator) * cfg.eps, d)


@register("adaptive", "lagrangian", "selective", "orthogonal", "pgd")
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
