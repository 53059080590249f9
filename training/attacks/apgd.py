"""Auto-PGD (Croce & Hein 2020, torchattacks' implementation) as a member of the worst case.

APGD-CE ignores the thresholding test: it only pushes the served label off the true one, with
its own step-size schedule. It is in the audit because on adversarially trained networks its
misclassification rate at T = 0 was well above our fixed-schedule PGD's (see the reference-PGD
check), so images it gets wrong and the model accepts are wins our attacks may miss.
"""

from __future__ import annotations

import torch
import torchattacks

from training.attacks.registry import register
from training.attacks.threat import AdaptiveConfig, Result, Threat
from training.export import ServedNet


@register("adaptive", "apgd")
def apgd_batch(
    threat: Threat,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: AdaptiveConfig,
    generator: torch.Generator | None = None,
) -> Result:
    """APGD-CE at cfg.eps, cfg.steps per restart, cfg.restarts restarts; won = the served
    answer is a wrong label that the test accepts. Seeded by cfg.seed, not by `generator`."""
    served = ServedNet(threat.net, threat.objective).eval()
    atk = torchattacks.APGD(served, norm="Linf", eps=cfg.eps, steps=cfg.steps,
                            n_restarts=cfg.restarts, seed=cfg.seed, loss="ce")  # fmt: skip
    return Result.judged(threat, atk(x, y), y, cfg.steps * cfg.restarts)
