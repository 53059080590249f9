"""Transfer check: adversarial images crafted on other (undefended) models, sent to a target.

A second test for gradient masking next to Square: if images crafted without the target's
gradients (here torchattacks' PGD on another model, all steps, no early stop, so the images sit
deep inside the wrong class) won images the white-box attack on the target itself lost, the
target's gradients would be misleading its white-box attack. The win is the audit's: the
target serves a wrong label and accepts it at its served T (and, where it requires one, with a
certificate; such a win within the certified radius of its clean original raises,
`training.audit.soundness`).
"""

from __future__ import annotations

import logging

import numpy as np

from training.attacks.transfer import craft
from training.audit.checks import CheckResult, whitebox_wins, write_checks
from training.audit.soundness import check_certified_wins
from training.audit.subject import AuditConfig, Model, Models, decided_wins
from training.torch_scoring import served_kind

log = logging.getLogger(__name__)

SOURCES = ("mnist-resnet32-rce", "mnist-resnet32-ce")
EPS = (0.1, 0.3)


def cached_craft(cfg: AuditConfig, source: Model, eps: float, n: int, steps: int) -> np.ndarray:
    path = (
        cfg.work_dir
        / "transfer"
        / f"{source.name}-{source.manifest.sha256[:12]}-pgd{steps}-eps{eps:g}-n{n}.npz"
    )
    if not path.exists():
        x, y = source.data.x[:n], source.data.y[:n]
        adv = craft(source.net, source.manifest.objective, x, y, eps, steps)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, adv=adv.astype(np.float32))
    return np.load(path)["adv"]


def served_wins(target: Model, adv: np.ndarray, y: np.ndarray, job: str) -> np.ndarray:
    """(N,) the target's served answer to the first N test images' `adv` is a wrong label that
    it accepts; certified wins are checked against the bounds."""
    s = target.served(adv)
    m = target.manifest
    won = decided_wins(s, y, served_kind(m.score), m.threshold)
    if s.certified is not None and s.certify_eps is not None:
        idx = np.arange(len(adv))
        linf = np.abs(adv - target.data.x[: len(adv)].numpy()).reshape(len(adv), -1).max(1)
        check_certified_wins(target, job, idx, won, s.certified, linf, s.certify_eps)
    return won


def run_transfer(
    models: Models, sources: tuple[str, ...] = SOURCES, n: int = 200, steps: int = 20
) -> list[CheckResult]:
    """Every source's images at every eps against every target in cfg.models, next to the
    target's white-box wins on the same images (the worst case of its attacks at that eps)."""
    cfg = models.cfg
    if cfg.dry_run:  # the tiny models attack each other
        sources, n, steps = cfg.models, 8, 3
    results: list[CheckResult] = []
    out = cfg.out_json.with_name("checks.json")
    for src in sources:
        source = models[src]
        for eps in EPS:
            adv = cached_craft(cfg, source, eps, n, steps)
            for name in cfg.models:
                target = models[name]
                white = whitebox_wins(models, name, eps, n)
                if white is None:
                    continue
                job = f"transfer-from-{src} eps {eps:g}"
                won = served_wins(target, adv, target.data.y[:n].numpy(), job)
                values = {
                    "transfer_success": float(won.mean()),
                    "whitebox_success": float(white.mean()),
                    "transfer_only": float((won & ~white).mean()),
                    "source_misclassified": float(
                        (source.served(adv).label != source.data.y[:n].numpy()).mean()
                    ),
                    "steps": float(steps),
                }
                results.append(CheckResult(f"transfer-from-{src}", name, eps, n, values))
                log.info("%s", results[-1])
                write_checks(out, results)
    return results
