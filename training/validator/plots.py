"""PNG figures of the attack report, after the paper's Figs. 3-6 (matplotlib, no pyplot state)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from training.validator.report import ETAS, METRICS

METRIC_LABEL = {"confidence": "confidence", "non_me": "non-ME", "j_score": "J-score"}


def _save(fig: Figure, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path.name


def _attacks(model: dict[str, Any], cost: str) -> list[dict[str, Any]]:
    return sorted((a for a in model["attacks"].values() if a["cost"] == cost),
                  key=lambda a: a["eps"])  # fmt: skip


def threshold_sweep(model: dict[str, Any], cost: str, path: Path, method: str) -> str:
    """Fig. 5: accuracy of accepted predictions and refuse rates on the 2N samples versus T."""
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3)
    keys = ("accuracy_of_accepted", "refuse_normal", "refuse_adversarial")
    titles = ("accuracy of accepted (2N)", "refuse rate, normal", "refuse rate, adversarial")
    for a in _attacks(model, cost):
        t = [row["T"] for row in a["threshold_sweep"]]
        for ax, key in zip(axes, keys, strict=True):
            v = [np.nan if row[key] is None else row[key] for row in a["threshold_sweep"]]
            ax.plot(t, v, label=f"eps {a['eps']:g}")
    for ax, title in zip(axes, titles, strict=True):
        ax.axvline(model["threshold"], color="grey", ls="--", lw=1, label="manifest T")
        ax.set(title=title, xlabel="threshold T (symlog)", ylim=(-0.02, 1.02), xlim=(0, 1))
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"{model['name']} ({model['objective'].upper()}), {method.upper()} {cost.upper()} cost"
    )
    return _save(fig, path)


def per_eps(models: list[dict[str, Any]], cost: str, path: Path, what: str, method: str) -> str:
    """Figs. 3-4 (what='ranking') or the ROC-AUCs (what='auc') versus eps, per model and metric."""
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    panels: tuple[tuple[str, str | None, str], ...] = (
        (("ranking", "top_n_accuracy", "accuracy of the top N"),
         ("ranking", "top_n_normal_share", "share of normal samples in the top N"))
        if what == "ranking"
        else (("auc", None, "ROC-AUC, all pairs"),
              ("auc_correct_and_successful", None, "ROC-AUC, clean right & attack succeeded"))
    )  # fmt: skip
    for ax, (group, key, title) in zip(axes, panels, strict=True):
        for mi, model in enumerate(models):
            attacks = _attacks(model, cost)
            eps = [a["eps"] for a in attacks]
            for metric in METRICS:
                v = [a[group][metric][key] if key else a[group][metric] for a in attacks]
                v = [np.nan if x is None else x for x in v]
                ax.plot(eps, v, marker="o", ls=("-", "--", ":")[mi % 3],
                        label=f"{model['objective'].upper()} {METRIC_LABEL[metric]}")  # fmt: skip
        ax.set(title=title, xlabel="eps")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{method.upper()}, {cost.upper()} cost")
    return _save(fig, path)


def eta_sweep(model: dict[str, Any], cost: str, path: Path, method: str) -> str:
    """Fig. 6: mean J-score (per relaxation factor eta) and mean confidence on adversarial."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    attacks = _attacks(model, cost)
    eps = [a["eps"] for a in attacks]
    for eta in ETAS:
        ax.plot(eps, [a["eta_sweep"]["mean_j_adversarial"][f"{eta:g}"] for a in attacks],
                marker="o", label=f"J, eta {eta:g}")  # fmt: skip
    conf = [a["eta_sweep"]["mean_confidence_adversarial"] for a in attacks]
    ax.plot(eps, conf, "k--", marker="s", label="confidence")
    ax.set(xlabel="eps", ylabel="mean on adversarial samples", ylim=(-0.02, 1.02),
           title=f"{model['name']}, {method.upper()} {cost.upper()} cost")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def examples(name: str, images: dict[str, np.ndarray], path: Path) -> str:
    """A few clean images and their adversarial versions, one row per (cost, eps)."""
    rows = list(images)
    cols = min(len(v) for v in images.values())
    fig = Figure(figsize=(1.2 * cols + 1.2, 1.2 * len(rows)))
    axes = np.atleast_2d(fig.subplots(len(rows), cols, squeeze=False))
    for r, key in enumerate(rows):
        for c in range(cols):
            img = images[key][c]  # (C, H, W)
            ax = axes[r, c]
            ax.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0),
                      cmap="gray", vmin=0, vmax=1)  # fmt: skip
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(key, fontsize=8)
    fig.suptitle(name, fontsize=9)
    return _save(fig, path)
