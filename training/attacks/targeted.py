"""The abstain-aware targeted attack: for each wrong class in turn, PGD that makes it the served
label with a score above the served T.

The untargeted attacks push up whichever wrong class is strongest at each step; on a model
that refuses, that class may be one whose score never reaches T while another wrong class
could. This attack tries every wrong class c of an image (the strongest at the clean image
first), with random restarts, descending

    CE(served logits, c) + lambda * max(0, log T' - log score_c),

i.e. maximising log p_c and the score the image would get with c as its label (the J-score,
the confidence or the K-density of c), with T' a little above T and lambda cycled over the
restarts. An image is checked at every step and leaves the batch at its first win.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from training.attacks.pgd import project, random_start, steepest
from training.attacks.registry import register
from training.attacks.threat import AdaptiveConfig, Result, Threat


def targeted_loss(
    threat: Threat,
    logits: torch.Tensor,
    target: torch.Tensor,
    cfg: AdaptiveConfig,
    lam: float,
    features: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B,) to minimise: CE towards `target` plus lam times the hinge on its log score."""
    loss = F.cross_entropy(logits, target, reduction="none").double()
    if threat.log_threshold == -math.inf:
        return loss
    log_goal = threat.log_threshold + cfg.log_margin
    hinge = (log_goal - threat.log_score(logits, target, features)).clamp(min=0)
    return loss + lam * hinge


def wrong_classes(threat: Threat, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, L-1) each image's wrong classes, the strongest at the clean image first."""
    with torch.no_grad():
        logits, _ = threat.forward(x)
    order = logits.argsort(-1, descending=True)  # (B, L)
    return order[order != y[:, None]].view(len(x), -1)


@register("adaptive", "targeted")
def targeted_batch(
    threat: Threat,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: AdaptiveConfig,
    generator: torch.Generator,
) -> Result:
    """For each wrong class, cfg.restarts restarts of cfg.steps L-inf (or L2) PGD steps on the
    images not yet won; `spent` counts every step over all classes and restarts."""
    n = len(x)
    adv_out, spent = x.clone(), torch.zeros(n, dtype=torch.long)
    with torch.no_grad():  # a clean image served wrong and accepted is won at no cost
        logits, feats = threat.forward(x)
        won = threat.wins(logits, y, feats).cpu()
    targets = wrong_classes(threat, x, y)
    runs = [(c, r) for c in range(targets.shape[1]) for r in range(cfg.restarts)]
    for i, (c, r) in enumerate(runs):
        idx = (~won).nonzero()[:, 0]
        if len(idx) == 0:
            break
        lam = cfg.lambdas[r % len(cfg.lambdas)]
        dev = idx.to(x.device)
        x0, y0, t0 = x[dev], y[dev], targets[dev, c]
        cur = (x0 + random_start(x0.shape, cfg, generator).to(x.device)).clamp(0.0, 1.0)
        for k in range(cfg.steps + 1):
            cur.requires_grad_(True)
            logits, feats = threat.forward(cur)
            w = threat.wins(logits, y0, feats)
            if w.any():
                hit = idx[w.cpu()]
                adv_out[hit.to(x.device)] = cur[w].detach()
                won[hit], spent[hit] = True, i * cfg.steps + k
            keep = ~w
            if k == cfg.steps or not keep.any():
                cur, idx = cur.detach()[keep], idx[keep.cpu()]
                break
            loss = targeted_loss(threat, logits, t0, cfg, lam, feats)
            grad = torch.autograd.grad(loss.sum(), cur)[0][keep]
            cur, x0, y0, t0 = cur.detach()[keep], x0[keep], y0[keep], t0[keep]
            idx = idx[keep.cpu()]
            cur = project(cur - cfg.alpha(k) * steepest(grad, cfg.norm), x0, cfg)
        if len(idx):  # the last iterate of the images still not won
            adv_out[idx.to(x.device)] = cur.detach()
            spent[idx] = (i + 1) * cfg.steps
    return Result(won, adv_out.detach(), spent)
