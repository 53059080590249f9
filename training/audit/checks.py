"""Sanity checks of the adaptive audit against independent attacks (torchattacks).

- Reference PGD: with T = 0 (a model without the test) our L-inf attack is plain PGD; its
  misclassification rate must match torchattacks' PGD and APGD at the same budget.
- Gradient masking: a score-based black-box attack (torchattacks' Square, which never looks at a
  gradient) is given the same win condition and objective; if it won images the white-box
  attack lost, the gradients would be misleading the white-box attack.
- Gradient alignment: where Orthogonal PGD steps on the score (misclassified images), the
  cosine between the classification and the score gradients. Orthogonal PGD removes from each
  its component along the other, which leaves little of either when they are aligned.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchattacks

from training.attacks.pgd import pgd_batch
from training.attacks.square import ScoreAwareSquare
from training.attacks.threat import AdaptiveConfig, Threat, class_loss, score_loss
from training.audit.jobs import all_jobs
from training.audit.store import load_job
from training.audit.subject import Models
from training.export import ServedNet
from training.provenance import run_record
from training.torch_scoring import served_kind

log = logging.getLogger(__name__)
# Attacks that use only the served scores: the gradient-masking check compares them with the
# white-box attacks, so the white-box side leaves them out.
SCORE_BASED = frozenset({"square"})


@dataclass(frozen=True)
class CheckResult:
    name: str
    model: str
    eps: float
    n: int
    values: dict[str, float]
    run: dict[str, str] = field(default_factory=run_record)  # when and where it was measured


def reference_pgd(
    threat: Threat, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, name: str
) -> CheckResult:
    """Misclassification rates of our PGD and torchattacks' PGD/APGD on a model without the test."""
    blind = replace(threat, threshold=0.0)
    alpha = eps / 8
    ours = pgd_batch(blind, x, y, AdaptiveConfig(attack="pgd", eps=eps, steps=steps, restarts=1,
                     step_size=alpha), torch.Generator().manual_seed(0)).won  # fmt: skip
    served = ServedNet(threat.net, threat.objective).eval()
    torch.manual_seed(0)
    values = {"ours_pgd_margin": float(ours.float().mean())}
    for key, atk in (
        ("torchattacks_pgd_ce", torchattacks.PGD(served, eps=eps, alpha=alpha, steps=steps)),
        ("torchattacks_apgd_ce", torchattacks.APGD(served, eps=eps, steps=steps, loss="ce")),
    ):
        adv = atk(x, y)  # needs gradients: outside no_grad
        with torch.no_grad():
            values[key] = float((served(adv).argmax(1) != y).float().mean())
    return CheckResult("reference-pgd", name, eps, len(y), values)


def gradient_alignment(
    threat: Threat, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, name: str
) -> CheckResult:
    """Cosine between the gradients of the classification loss and of the score loss (at the
    served label, as Orthogonal PGD takes it) on the images that blind PGD (`steps` of eps/8)
    misclassifies: where Orthogonal PGD steps on the score. Images where either gradient is
    zero (the margin floored, or the score above T' already) are left out."""
    cfg = AdaptiveConfig(attack="pgd", eps=eps, steps=steps, restarts=1, step_size=eps / 8)
    blind = replace(threat, threshold=0.0)
    adv = pgd_batch(blind, x, y, cfg, torch.Generator().manual_seed(0)).adv
    adv = adv.detach().requires_grad_(True)
    logits, feats = threat.forward(adv)
    c_loss = class_loss(logits, y, cfg).double()
    s_loss = score_loss(threat, logits, y, cfg, at_served=True, features=feats)
    g_c = torch.autograd.grad(c_loss.sum(), adv, retain_graph=True)[0].flatten(1)
    g_s = torch.autograd.grad(s_loss.sum(), adv)[0].flatten(1)
    wrong = logits.argmax(-1) != y
    both = wrong & (g_c.norm(dim=1) > 0) & (g_s.norm(dim=1) > 0)
    cos = F.cosine_similarity(g_c[both], g_s[both], dim=1)
    values = {
        "misclassified": float(wrong.float().mean()),
        "with_both_gradients": float(both.sum()),
    }
    if both.any():
        values |= {
            "median_cosine": float(cos.median()),
            "share_abs_cosine_over_0.5": float((cos.abs() > 0.5).float().mean()),
        }
    return CheckResult("gradient-alignment", name, eps, len(y), values)


def square_vs_whitebox(
    threat: Threat, x: torch.Tensor, y: torch.Tensor, eps: float, queries: int,
    whitebox_won: np.ndarray, name: str,
) -> CheckResult:  # fmt: skip
    """Images won by Square with the audit's objective, next to the white-box wins on them."""
    cfg = AdaptiveConfig(eps=eps)
    atk = ScoreAwareSquare(threat, cfg, lam=1.0, eps=eps, n_queries=queries, seed=0)
    adv = atk(x, y)
    with torch.no_grad():
        logits, feats = threat.forward(adv)
        won = threat.wins(logits, y, feats).numpy()
    return CheckResult("square-vs-whitebox", name, eps, len(y), {
        "square_success": float(won.mean()), "whitebox_success": float(whitebox_won.mean()),
        "square_only": float((won & ~whitebox_won).mean()), "queries": float(queries)})  # fmt: skip


def write_checks(path: Path, results: list[CheckResult]) -> None:
    import json

    old = json.loads(path.read_text()) if path.exists() else []
    rows = {(r["check"], r["model"], r["eps"]): r for r in old}
    for r in results:
        rows[(r.name, r.model, r.eps)] = {"check": r.name, "model": r.model, "eps": r.eps,
                                          "n": r.n, **r.values, "run": r.run}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            sorted(rows.values(), key=lambda r: (r["check"], r["model"], r["eps"])), indent=1
        )
        + "\n"
    )


def whitebox_wins(
    models: Models, name: str, eps: float, n: int, score: str | None = None,
    clean_refusal: float | None = None,
) -> np.ndarray | None:  # fmt: skip
    """(n,) which of the first n images the white-box attacks won against `score` (default:
    the served one) at the T refusing `clean_refusal` of clean images (default: the served
    T): the worst case over every saved gradient-based attack of that group (the Lagrangian
    attack, its cascades, the other attacks on fewer images; not the worst case's Square
    cascade, which is what they are checked against); None (and a warning) while the group's
    Lagrangian attack has fewer than n images."""

    cfg = models.cfg
    served = models.served()
    model = models[name]
    score = score or served[name]
    group = [
        j
        for j in all_jobs((name,), cfg.dry_run, served)
        if (j.score, j.clean_refusal, j.attack.eps, j.attack.norm) == (score, clean_refusal, eps,
                                                                        "linf")
        and j.attack.attack not in SCORE_BASED  # what the white-box attacks are compared with
    ]  # fmt: skip
    saved = {j: load_job(cfg, model, j) for j in group}
    covered = max(
        (len(v["idx"]) for j, v in saved.items()
         if v is not None and j.attack.attack == "lagrangian" and not j.cascade),
        default=0,
    )  # fmt: skip
    if covered < n:
        log.warning(
            "%s: no Lagrangian result on %d images at eps %g against %s yet; check skipped",
            name, n, eps, score,
        )  # fmt: skip
        return None
    won = np.zeros(n, dtype=bool)
    for part in saved.values():
        if part is not None:
            first = part["idx"] < n
            won[part["idx"][first]] |= part["served_won"][first]
    return won


def run_checks(
    models: Models, n: int = 100, square_n: int = 50, queries: int = 1000
) -> list[CheckResult]:
    """Both checks on every model, at eps 0.1 and 0.3."""
    cfg = models.cfg
    results: list[CheckResult] = []
    out = cfg.out_json.with_name("checks.json")
    for name in cfg.models:
        model = models[name]
        threat = Threat(model.net, model.manifest.objective, model.manifest.kernel.to_kernel(),
                        model.manifest.threshold, served_kind(model.manifest.score))  # fmt: skip
        x, y = model.data.x[:n], model.data.y[:n]
        for eps in (0.1, 0.3):
            results.append(reference_pgd(threat, x, y, eps, steps=20, name=name))
            log.info("%s", results[-1])
            write_checks(out, results)
        results.append(gradient_alignment(threat, x, y, 0.1, steps=20, name=name))
        log.info("%s", results[-1])
        write_checks(out, results)
        for eps in (0.1, 0.3):
            white = whitebox_wins(models, name, eps, square_n)
            if white is None:
                continue
            results.append(square_vs_whitebox(threat, x[:square_n], y[:square_n], eps, queries,
                                              white, name))  # fmt: skip
            log.info("%s", results[-1])
            write_checks(out, results)
        if model.kernel_set is None:
            continue
        # The NeurIPS version's K-density detector, at the T the audit attacks it at.
        kd = model.threat("k_density", model.threshold("k_density", 0.05))
        for eps in (0.1, 0.3):
            white = whitebox_wins(models, name, eps, square_n, "k_density", 0.05)
            if white is None:
                continue
            r = square_vs_whitebox(kd, x[:square_n], y[:square_n], eps, queries, white, name)
            results.append(replace(r, name="square-vs-whitebox-k_density"))
            log.info("%s", results[-1])
            write_checks(out, results)
    return results
