"""The tables and the plot of `notsure validate ood` (docs/ood.md shows them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SCORE_TEXT = {"j_score": "J-score", "confidence": "confidence", "energy": "energy",
              "k_density": "K-density"}  # fmt: skip


def pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def model_table(m: dict[str, Any]) -> str:
    """One markdown table per model: a row per OOD set, for each score refuse / AUROC / FPR."""
    scores = list(m["thresholds"])
    served = m["served_score"]
    names = [SCORE_TEXT[s] + (" (served)" if s == served else "") for s in scores]
    head = "| set | n | " + " | ".join(f"{n} refused / AUROC / FPR@95" for n in names) + " |"
    lines = [head, "|" + "---|" * (2 + len(scores))]
    idd = m["in_distribution"]
    lines.append(
        f"| {idd['set']} (ID) | {idd['n']} | "
        + " | ".join(f"{pct(idd['refuse_rate'][s])} / - / -" for s in scores)
        + " |"
    )
    by_set: dict[str, dict[str, dict[str, Any]]] = {}
    for r in m["rows"]:
        by_set.setdefault(r["set"], {})[r["score"]] = r
    for name, rows in by_set.items():
        n = next(iter(rows.values()))["n"]
        cells = [f"{pct(rows[s]['refuse_rate'])} / {rows[s]['auroc']:.3f} / "
                 f"{pct(rows[s]['fpr_at_95_tpr'])}" for s in scores]  # fmt: skip
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    t = ", ".join(f"{SCORE_TEXT[s]} {v:.4g}" for s, v in m["thresholds"].items())
    return (
        f"**{m['model']}** v{m['version']} ({m['objective'].upper()}, served on "
        f"{SCORE_TEXT[served]}; T: {t})\n\n" + "\n".join(lines) + "\n"
    )


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    """tables.md (markdown tables) and ood.png (refuse rate and AUROC per set and score)."""
    text = "\n".join(model_table(m) for m in report["models"])
    sets = {k: v for m in report["models"] for k, v in m["sets"].items()}
    legend = "\n".join(f"- {k}: {v}" for k, v in sets.items())
    (out_dir / "tables.md").write_text(f"{report['protocol']}.\n\n{text}\n{legend}\n")
    plot(report, out_dir / "ood.png")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = report["models"]
    fig, axes = plt.subplots(2, len(models), figsize=(6.5 * len(models), 7.5), squeeze=False)
    for col, m in enumerate(models):
        scores = list(m["thresholds"])
        sets = list(dict.fromkeys(r["set"] for r in m["rows"]))
        cell = {(r["set"], r["score"]): r for r in m["rows"]}
        width = 0.8 / len(scores)
        x = np.arange(len(sets))
        for row, (key, label) in enumerate((("refuse_rate", "refused at T"), ("auroc", "AUROC"))):
            ax = axes[row][col]
            for i, s in enumerate(scores):
                vals = [cell[(st, s)][key] for st in sets]
                name = SCORE_TEXT[s] + (" (served)" if s == m["served_score"] else "")
                ax.bar(x + (i - (len(scores) - 1) / 2) * width, vals, width, label=name)
            ax.set_xticks(x, sets, rotation=20)
            ax.set_ylim(0, 1.05)
            ax.set_ylabel(label)
            ax.grid(axis="y", alpha=0.3)
            if row == 0:
                ax.axhline(0.8, color="grey", ls=":", lw=1)
                ax.set_title(f"{m['model']} (ID {m['in_distribution']['set']})")
                ax.legend(fontsize=8, ncol=len(scores), loc="lower center",
                          bbox_to_anchor=(0.5, 1.08), frameon=False)  # fmt: skip
    fig.suptitle("Out-of-distribution images through the live service (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
