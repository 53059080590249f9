"""Which weights an adversarially trained run keeps (`notsure train --keep best`).

During training a held-out check (PGD on a few hundred held-out images, once an epoch) saves the
weights of its best epoch: robust accuracy can fall late in training (robust overfitting, Rice
et al. 2020). That check is small, and a few images decide between two good epochs, so at the
end the best epoch's weights and the last ones face a larger check, PGD with twice the steps on
the whole held-out split; the better of the two is kept (the last on a tie), and the run's
result says which and why.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.adversarial import AdversarialConfig, evaluate, robust_accuracy
from training.data import TensorData
from training.losses import Objective

log = logging.getLogger(__name__)


def best_check(log_path: Path) -> dict[str, Any] | None:
    """The held-out check whose weights `best.safetensors` holds: the last record of the run's
    log marked best (the log spans every resumed piece of the run); None when there is none."""
    if not log_path.exists():
        return None
    kept = None
    for line in log_path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line) if line.strip() else {}
        if record.get("best"):
            kept = record
    return kept


def keep_best_or_last(
    net: nn.Module,
    best: dict[str, torch.Tensor],
    last_step: int,
    steps_per_epoch: float,
    log_path: Path,
    held_out: TensorData,
    objective: Objective,
    adv: AdversarialConfig,
    device: torch.device,
) -> dict[str, Any]:
    """Load into net (holding the last weights) whichever of best/last does better under PGD
    (2 x the check's steps, at the run's eps) on the whole held-out split; returns the record
    of the choice: the kept step and epoch, both candidates' figures and the reason."""
    net.eval()  # no dropout in the check (the caller's evaluation sets eval mode again anyway)
    steps = 2 * adv.guard_steps
    flagged = best_check(log_path) or {}
    if len(held_out) == 0:
        net.load_state_dict(best)
        why = "the best epoch of the in-training check (no held-out split for a larger one)"
        return {"step": int(flagged.get("step", -1)), "epoch": float(flagged.get("epoch", 0.0)),
                "choice": "best", "why": why, "candidates": {}}  # fmt: skip
    last = {k: v.detach().clone() for k, v in net.state_dict().items()}
    candidates = {
        "best": (best, int(flagged.get("step", -1)), float(flagged.get("epoch", float("nan")))),
        "last": (last, last_step, last_step / steps_per_epoch),
    }
    figures: dict[str, dict[str, float]] = {}
    x, y = held_out.x.to(device), held_out.y.to(device)
    for name, (weights, step, epoch) in candidates.items():
        net.load_state_dict(weights)
        figures[name] = {
            "step": step,
            "epoch": epoch,
            "held_out_pgd": robust_accuracy(net, x, y, objective, adv.eps, steps),
            "held_out_clean": evaluate(net, held_out, objective, device),
        }
    choice = "best" if figures["best"]["held_out_pgd"] > figures["last"]["held_out_pgd"] else "last"
    net.load_state_dict(candidates[choice][0])
    other = "last" if choice == "best" else "best"
    why = (
        f"{'the best epoch of the in-training check' if choice == 'best' else 'the last weights'}"
        f": held-out PGD-{steps} accuracy {figures[choice]['held_out_pgd']:.2%} at eps "
        f"{adv.eps:g} on {len(held_out)} images (clean {figures[choice]['held_out_clean']:.2%}), "
        f"against {figures[other]['held_out_pgd']:.2%} for the {other} "
        f"(step {figures[other]['step']})"
    )
    log.info("keeping %s", why)
    return {"step": figures[choice]["step"], "epoch": figures[choice]["epoch"], "choice": choice,
            "why": why, "candidates": figures}  # fmt: skip
