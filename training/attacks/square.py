"""Square (Andriushchenko et al. 2020, torchattacks' implementation) with the audit's objective.

Square never looks at a gradient: it proposes random square-shaped changes at the corners of
the L-inf ball and keeps those that lower the loss. Given the audit's win (a wrong label that
is accepted) and its Lagrangian loss, it answers two questions: whether the white-box
attacks' gradients mislead them (if Square wins images they lose, they do; the audit's
checks), and, as the last member of the worst case, which of the images they left a query-only
attacker still wins (every output the service returns is all Square needs).
"""

from __future__ import annotations

import torch
import torchattacks

from training.attacks.registry import register
from training.attacks.threat import AdaptiveConfig, Result, Threat, class_loss, score_loss
from training.export import ServedNet


class ScoreAwareSquare(torchattacks.Square):
    """Square whose success is the audit's win (wrong label, accepted) and whose loss is the
    Lagrangian objective; the rest of Square (schedule, square proposals) is unchanged."""

    def __init__(self, threat: Threat, cfg: AdaptiveConfig, lam: float, **kwargs: object) -> None:
        super().__init__(ServedNet(threat.net, threat.objective).eval(), **kwargs)  # type: ignore[arg-type]
        self.threat, self.cfg, self.lam = threat, cfg, lam

    def margin_and_loss(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits, feats = self.threat.forward(x)
        won = self.threat.wins(logits, y, feats)
        loss = class_loss(logits, y, self.cfg).double()
        loss = loss + self.lam * score_loss(self.threat, logits, y, self.cfg, features=feats)
        # Square stops on an image once its margin is < 0: exactly when it is won.
        margin = torch.where(won, -torch.ones_like(loss), loss.clamp(min=0) + 1e-3)
        return margin.float(), loss.float()


@register("adaptive", "square")
def square_batch(
    threat: Threat,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: AdaptiveConfig,
    generator: torch.Generator | None = None,
) -> Result:
    """Square at cfg.eps with cfg.steps queries per image and cfg.restarts restarts, the
    detector term weighted by the first of cfg.lambdas; won = the served answer is a wrong
    label that the test accepts. `spent` counts queries, not gradient steps; seeded by cfg.seed."""
    atk = ScoreAwareSquare(threat, cfg, lam=cfg.lambdas[0], eps=cfg.eps, n_queries=cfg.steps,
                           n_restarts=cfg.restarts, seed=cfg.seed)  # fmt: skip
    return Result.judged(threat, atk(x, y), y, cfg.steps * cfg.restarts)
