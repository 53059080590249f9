"""AutoAttack as published (Croce & Hein 2020; torchattacks' `AutoAttack`, standard version:
APGD-CE, APGD-T, FAB-T, Square), for robust accuracy comparable with published tables.

No abstention here: an image counts as robust when the served argmax of AutoAttack's image is
its true label, as the service decides it (the ONNX graph and `service.scoring`). AutoAttack is
given the logits the service feeds to its softmax (`ServedNet`: -Z for an RCE net, whose raw
logits rank the classes the other way round). Resumable like every audit job: each chunk of
images is saved as it finishes under `work_dir/<model>/autoattack-...`, and the rows go to
`autoattack.json` beside the audit's rows, each with the date and machine of its run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchattacks
from torch import nn

from training.audit.rows import merge_rows
from training.audit.store import load_chunks, missing_ranges
from training.audit.subject import AuditConfig, Model, Models
from training.export import ServedNet
from training.losses import Objective
from training.progress import progress_bar

EPS = (0.3,)  # MNIST's standard L-inf budget, that of the published tables
N_IMAGES = 1000


def autoattack_net(net: nn.Module, objective: Objective) -> nn.Module:
    """What AutoAttack attacks: the net's served logits, (B, C, H, W) -> (B, L), in eval mode."""
    return ServedNet(net, objective).eval()


def autoattack_images(
    net: nn.Module,
    objective: Objective,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    num_classes: int,
    seed: int = 0,
) -> torch.Tensor:
    """AutoAttack's standard version at L-inf eps on one batch: (B, C, H, W) -> same."""
    atk = torchattacks.AutoAttack(autoattack_net(net, objective), norm="Linf", eps=eps,
                                  version="standard", n_classes=num_classes, seed=seed)  # fmt: skip
    return atk(x, y).detach()


def autoattack_json(cfg: AuditConfig) -> Path:
    """The rows file: beside the audit's rows (under the work folder for a dry run)."""
    return cfg.out_json.with_name("autoattack.json")


def _folder(cfg: AuditConfig, model: Model, eps: float, n: int) -> Path:
    return cfg.work_dir / model.name / f"autoattack-eps{eps:g}-n{n}-{model.manifest.sha256[:12]}"


def attack_chunk(model: Model, eps: float, lo: int, hi: int) -> dict[str, np.ndarray]:
    """AutoAttack on images lo..hi-1; right and robust as the served graph decides them."""
    x, y = model.data.x[lo:hi], model.data.y[lo:hi]
    adv = autoattack_images(
        model.net, model.manifest.objective, x, y, eps, model.manifest.num_classes
    )
    return {
        "idx": np.arange(lo, hi),
        "clean_right": model.served(x.numpy(), certify=False).label == y.numpy(),
        "robust": model.served(adv.numpy(), certify=False).label == y.numpy(),
        "linf": (adv - x).abs().flatten(1).amax(1).numpy(),
    }


def measure(cfg: AuditConfig, model: Model, eps: float, n: int) -> dict[str, object]:
    """Attack the first n images not yet saved, chunk by chunk; the row over all n."""
    folder = _folder(cfg, model, eps, n)
    folder.mkdir(parents=True, exist_ok=True)
    ranges = missing_ranges(load_chunks(folder), n, cfg.chunk)
    with progress_bar(f"{model.name} autoattack eps {eps:g}", total=n) as bar:
        bar.advance(n - sum(hi - lo for lo, hi in ranges))
        for lo, hi in ranges:
            tmp = folder / f"chunk-{lo:05d}.tmp.npz"
            np.savez_compressed(tmp, **attack_chunk(model, eps, lo, hi))
            tmp.replace(folder / f"chunk-{lo:05d}.npz")
            bar.advance(hi - lo)
    saved = load_chunks(folder)
    if saved is None or len(saved["idx"]) < n:
        raise RuntimeError(f"{folder}: AutoAttack results for {n} images are incomplete")
    return {
        "model": model.name,
        "score": "none",  # no abstention: the served argmax
        "attack": "autoattack",
        "norm": "linf",
        "eps": eps,
        "clean_refusal": None,
        "version": "standard",
        "n": n,
        "clean_accuracy": round(float(saved["clean_right"].mean()), 4),
        "robust_accuracy": round(float(saved["robust"].mean()), 4),
        "max_linf": round(float(saved["linf"].max()), 6),
    }


def run_autoattack(models: Models) -> list[dict[str, object]]:
    """AutoAttack robust accuracy of every configured model at each eps (cfg.eps, else 0.3),
    on the first 1,000 test images (8 in a dry run); returns the rows of `autoattack_json`."""
    cfg = models.cfg
    n = 8 if cfg.dry_run else N_IMAGES
    rows = [measure(cfg, models[name], eps, n) for name in cfg.models for eps in (cfg.eps or EPS)]
    return merge_rows(autoattack_json(cfg), rows)
