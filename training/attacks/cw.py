"""Carlini & Wagner's L2 attack with the score term (the RCE paper's C&W-wb), per image.

Minimises ||x' - x||_2^2 + c * (margin(x') + lambda * max(0, log T' - log score(x'))) over
x' = (tanh(w) + 1) / 2, with Adam, and a binary search on c per image: c shrinks after a
search step that won, and grows tenfold (then bisects) after one that did not. The smallest
winning perturbation is kept; L2 budgets are then read off those distances.

Two departures from the original's settings (Adam at lr 0.01 with its default second-moment
decay 0.999, up to 10,000 steps), both needed for runs of a few hundred steps: the learning
rate starts higher and decays along a cosine to 1% of it, and the second-moment decay is 0.9
(`AdaptiveConfig.cw_beta2` says why).
"""

from __future__ import annotations

import math

import torch

from training.attacks.registry import register
from training.attacks.threat import AdaptiveConfig, Result, Threat, class_loss, score_loss

START_MARGIN = 1e-3  # in tanh space: pixels start at most 5e-4 from their value


@register("adaptive", "cw-l2")
def cw_batch(
    threat: Threat,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: AdaptiveConfig,
    generator: torch.Generator | None = None,
) -> Result:
    """`cfg.restarts` binary-search steps of `cfg.steps` Adam steps each, on one batch."""
    n = len(x)
    lam = cfg.lambdas[0]
    c = torch.full((n,), cfg.cw_c, dtype=torch.float64, device=x.device)
    lo = torch.zeros_like(c)
    hi = torch.full_like(c, float("inf"))
    best_l2 = torch.full((n,), float("inf"), dtype=torch.float64, device=x.device)
    best = x.clone()
    with torch.no_grad():  # a clean image that already wins needs no perturbation
        logits, feats = threat.forward(x)
        clean_win = threat.wins(logits, y, feats)
    best_l2[clean_win] = 0.0
    # Pixels at exactly 0 or 1 (most of an MNIST image) would start deep in tanh's flat tails
    # (atanh(1 - 1e-6) = 7.3), where 100 Adam steps of 0.01 move them by less than 1e-4: such
    # an attack can only touch the strokes' edges. Start them at 1e-3 from the box instead.
    w0 = torch.atanh((x * 2 - 1).clamp(-1 + START_MARGIN, 1 - START_MARGIN))
    for _ in range(cfg.restarts):
        w = w0.clone().requires_grad_(True)
        opt = torch.optim.Adam([w], lr=cfg.cw_lr, betas=(0.9, cfg.cw_beta2))
        won_now = torch.zeros(n, dtype=torch.bool, device=x.device)
        for k in range(cfg.steps):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(cfg.cw_lr, k, cfg.steps)
            adv = (torch.tanh(w) + 1) / 2
            logits, feats = threat.forward(adv)
            l2 = ((adv - x) ** 2).flatten(1).sum(1).double()  # (B,) squared L2
            with torch.no_grad():
                win = threat.wins(logits, y, feats)
                better = win & (l2 < best_l2)
                best_l2 = torch.where(better, l2, best_l2)
                best[better] = adv[better].detach()
                won_now |= win
            loss = l2 + c * (
                class_loss(logits, y, cfg).double()
                + lam * score_loss(threat, logits, y, cfg, features=feats)
            )
            opt.zero_grad()
            loss.sum().backward()
            opt.step()
        # Binary search on c, per image.
        hi = torch.where(won_now, torch.minimum(hi, c), hi)
        lo = torch.where(won_now, lo, torch.maximum(lo, c))
        c = torch.where(torch.isinf(hi), c * 10, (lo + hi) / 2)
    won = torch.isfinite(best_l2)
    return Result(won.cpu(), best.detach(), torch.full((n,), cfg.steps * cfg.restarts))


def cosine_lr(first: float, k: int, steps: int) -> float:
    """Step k's learning rate: `first` decayed along a half cosine to 1% of it."""
    return first * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * k / steps)))
