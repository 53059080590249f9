"""Export the page's adversarial gallery: a few of the audit's attacked images per model and eps.

The audit (`notsure attack --adaptive`) keeps the adversarial images only in its work folder;
the committed results under docs/robustness/results/ keep which images each job won. This script
runs the same job (same attack, steps, restarts, loss, score and T) again on the job's first
images, keeps a few of them as 28x28 PNGs under service/ui/gallery/ (the page serves them) and
writes index.json with, for each image, the job and results file it comes from, the true label,
what the committed audit reported for that image, and what the served graph decides on the
regenerated image. The audit attacked the images in chunks of 50 with the same seed; a shorter
chunk draws other random restarts, so an image can differ from the audit's own (the index says
where the two outcomes differ).

Run from the repository root, with MNIST under data/ (or --data-dir):
    python docs/ui-gallery/export.py --data-dir /path/to/data
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
from pathlib import Path

import numpy as np
from PIL import Image

from training.audit.jobs import all_jobs
from training.audit.runner import attack_chunk
from training.audit.store import results_path
from training.audit.subject import AuditConfig, Models

OUT = Path("service/ui/gallery")
# (model, eps): the default model and the adversarially trained CE model, which the README
# recommends against an attacker, at the two budgets the README's table reports.
CASES = [
    ("mnist-resnet32-rce", 0.1),
    ("mnist-resnet32-rce", 0.3),
    ("mnist-cnn-ce-at", 0.1),
    ("mnist-cnn-ce-at", 0.3),
]
ATTACKED = 4  # images attacked per case (a robust model resists: every step of every restart runs)
KEEP = 2  # images kept per case


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=Path("data"))
    args = ap.parse_args()
    names = tuple(sorted({m for m, _ in CASES}))
    cfg = AuditConfig(models=names, data_dir=args.data_dir, threads=2)
    models = Models(cfg)
    jobs = all_jobs(names, served=models.served())
    OUT.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, object]] = []
    for name, eps in CASES:
        model = models[name]
        job = next(
            j for j in jobs
            if j.model == name and j.attack.attack == "lagrangian" and j.attack.loss == "margin"
            and abs(j.attack.eps - eps) < 1e-9 and j.clean_refusal is None and not j.cascade
            and j.attack.norm == "linf" and j.n == 1000
        )  # fmt: skip
        kept = results_path(cfg, model, job)
        audit = dict(np.load(kept, allow_pickle=False))
        won = dict(zip(audit["idx"].tolist(), audit["served_won"].tolist(), strict=True))
        arrays = attack_chunk(model, job, 0, ATTACKED, np.zeros(ATTACKED, dtype=bool))
        # What the PNGs hold: 8-bit pixels (up to 0.5/255 further from the clean image than eps).
        shipped = (np.rint(arrays["adv"] * 255) / 255).astype(np.float32)
        served = model.served(shipped)
        clean = model.data.x[:ATTACKED].numpy()
        linf = np.abs(shipped - clean).reshape(ATTACKED, -1).max(axis=1)
        score = served.named(model.manifest.score)
        threshold = float(arrays["threshold"][0])
        # Prefer images the audit won (wrong and accepted), then the refused ones.
        order = sorted(range(ATTACKED), key=lambda i: (not won[i], i))[:KEEP]
        for i in order:
            y = int(model.data.y[i])
            file = f"{name}-eps{eps:g}-{i}.png"
            pixels = np.rint(shipped[i, 0] * 255).astype(np.uint8)  # (28, 28)
            Image.fromarray(pixels, mode="L").save(OUT / file, optimize=True)
            accepted = bool(score[i] >= threshold)
            entries.append({
                "file": file, "model": name, "eps": eps, "true_label": y,
                "mnist_test_index": i, "attack": job.name,
                "source": str(kept), "audit_won": bool(won[i]),
                "served_label": int(served.label[i]) if accepted else None,
                "served_decision": "accepted" if accepted else "not_sure",
                "served_score": float(score[i]), "threshold": threshold,
                "linf": float(linf[i]),
            })  # fmt: skip
        write_index(entries)  # after each case, so that a stopped run keeps what it made


def write_index(entries: list[dict[str, object]]) -> None:
    index = {
        "made": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, no GPU",
        "command": "python docs/ui-gallery/export.py",
        "examples": entries,
    }
    tmp = OUT / "index.json.tmp"
    tmp.write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    tmp.replace(OUT / "index.json")


if __name__ == "__main__":
    main()
