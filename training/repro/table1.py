"""Table 1 and Figs. 3-6: the bundled ResNet-32 models and the validation tool's report.

Nothing is recomputed here: the clean test accuracies, training steps and wall times come from
the manifests in models/ (written by `notsure calibrate`), and the adversarial results from the
attack tool's report (docs/attack/, written by `notsure attack`) when it exists. This section
only collects them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from service.manifest import MANIFEST_FILE, Manifest
from training.evaluation import num, pct, table
from training.repro.common import Output, update_section, write_json

log = logging.getLogger(__name__)

NAME = "table1"
# Test accuracy (%) as printed in Table 1 of the arXiv paper ("Overview of Test Accuracy"),
# MNIST column, checked against /work/shared/paper/rce-thresholding-test.txt.
PAPER_TABLE1_MNIST_ACCURACY = {
    ("resnet32", "ce"): 99.28,
    ("resnet32", "rce"): 99.21,
    ("resnet56", "ce"): 99.30,
    ("resnet56", "rce"): 99.30,
    ("resnet110", "ce"): 99.36,
    ("resnet110", "rce"): 99.23,
}


FIGURES = ("ranking", "auc", "eta")  # Figs. 3-4, AUC, Fig. 6 of the attack report


@dataclass(frozen=True)
class Table1Config:
    models_dir: Path = Path("models")
    attack_dir: Path = Path("docs/attack")


def _manifests(models_dir: Path) -> list[tuple[Path, Manifest]]:
    found = []
    for path in sorted(models_dir.glob(f"*/*/{MANIFEST_FILE}")):
        try:
            found.append((path.parent, Manifest.load(path)))
        except ValueError as exc:  # an invalid manifest is reported, not fatal for the table
            log.warning("skipping %s: %s", path, exc)
    return found


def run(cfg: Table1Config, out: Output) -> dict[str, object]:
    rows: list[dict[str, object]] = []
    for folder, m in _manifests(cfg.models_dir):
        tr = m.training
        paper = PAPER_TABLE1_MNIST_ACCURACY.get((m.architecture, m.objective))
        rows.append(
            {
                "model": f"{m.name}/{m.version}",
                "folder": folder,
                "architecture": m.architecture,
                "objective": m.objective,
                "dataset": tr.dataset if tr else "?",
                "clean_test_accuracy": m.metrics.get("clean_test_accuracy"),
                "paper_test_accuracy": None if paper is None else paper / 100,
                "steps": tr.steps if tr else None,
                "batch_size": tr.batch_size if tr else None,
                "optimizer": tr.optimizer if tr else None,
                "wall_time_s": tr.wall_time_s if tr else None,
                "threshold": m.threshold,
                "threshold_rule": m.threshold_rule,
                "test_refuse_rate": m.metrics.get("test_refuse_rate"),
            }
        )
    attack = _attack_report(cfg.attack_dir)
    summary: dict[str, object] = {"experiment": NAME, "models": rows, "attack_report": attack}
    write_json(out.json_path(NAME), summary)
    update_section(
        out.report,
        NAME,
        "Table 1 and Figs. 3-6: ResNet-32 on MNIST (bundled models)",
        _markdown(rows, attack, out),
    )
    return summary


def _attack_report(attack_dir: Path) -> dict[str, object] | None:
    """Headline numbers of the validation tool's report.json, and the figures beside it."""
    path = attack_dir / "report.json"
    if not path.exists():
        return None
    report = json.loads(path.read_text(encoding="utf-8"))
    rows = []
    for m in report.get("models", []):
        for key, a in m.get("attacks", {}).items():
            fixed = a.get("fixed_clean_refuse", {}).get("0.05", {})
            rows.append({
                "model": m.get("name"), "objective": m.get("objective"), "attack": key,
                "clean_accuracy": a.get("clean_accuracy"),
                "adversarial_accuracy": a.get("adversarial_accuracy"),
                "auc_success": a.get("auc_correct_and_successful", {}),
                "adv_refused_at_5pct": {k: v.get("refuse_adversarial") for k, v in fixed.items()},
            })  # fmt: skip
    return {
        "path": path,
        "attack": report.get("attack"),
        "rows": rows,
        # Summary figures; the per-model threshold sweeps stay in the tool's own report.
        "figures": sorted(p for p in attack_dir.glob("*.png") if p.stem.startswith(FIGURES)),
        "summary_md": attack_dir / "report.md" if (attack_dir / "report.md").exists() else None,
    }


def _attack_markdown(attack: dict[str, object], out: Output) -> list[str]:
    summary_md = attack["summary_md"]
    settings = attack["attack"] or {}
    how = ", ".join(f"{k} {v}" for k, v in settings.items() if v is not None)
    lines = [
        f"Figs. 3-6 come from the validation tool (`notsure attack`: {how}): "
        f"[report.json]({out.link(Path(str(attack['path'])))})"
        + (
            f", [summary with every figure]({out.link(Path(str(summary_md)))})"
            if summary_md
            else ""
        )
        + ". Its headline numbers: AUC over pairs whose clean image is right and whose attack "
        "succeeds; adversarial images refused at the T that refuses 5% of the clean ones.",
        "",
    ]
    body = []
    for r in attack["rows"]:
        auc, ref = r["auc_success"], r["adv_refused_at_5pct"]
        body.append([str(r["model"]), str(r["attack"]), pct(r["adversarial_accuracy"], 1),
                     num(auc.get("confidence")), num(auc.get("j_score")),
                     pct(ref.get("confidence"), 1), pct(ref.get("j_score"), 1)])  # fmt: skip
    header = ["model", "cost@eps", "adv. accuracy", "AUC conf.", "AUC J", "refused (conf.)",
              "refused (J)"]  # fmt: skip
    lines.append(table(header, body))
    for fig in attack["figures"]:
        lines += ["", f"![{Path(fig).stem}]({out.link(Path(fig))})"]
    return lines


def _markdown(rows: list[dict[str, object]], attack: dict[str, object] | None, out: Output) -> str:
    lines = []
    if rows:
        body = [
            [
                str(r["model"]),
                str(r["dataset"]),
                str(r["objective"]).upper(),
                pct(r["paper_test_accuracy"]) if r["paper_test_accuracy"] else "-",
                pct(r["clean_test_accuracy"]),
                str(r["steps"]),
                str(r["batch_size"]),
                str(r["optimizer"]),
                f"{float(r['wall_time_s']) / 60:.0f} min",
            ]
            for r in rows
        ]
        lines += [
            "Clean test accuracy of the bundled models (from each `manifest.json`, written by "
            "`notsure calibrate` on the 10,000 MNIST test images) next to the paper's "
            "(its Table 1, arXiv version):",
            "",
            table(
                [
                    "model",
                    "data",
                    "objective",
                    "paper",
                    "measured",
                    "steps",
                    "batch",
                    "optimiser",
                    "training wall time",
                ],
                body,
            ),
        ]
    else:
        lines.append("No calibrated models (models/<name>/<version>/manifest.json) found yet.")
    lines.append("")
    if attack is None:
        lines.append("The validation tool's report (docs/attack/report.json) does not exist yet.")
    else:
        lines += _attack_markdown(attack, out)
    return "\n".join(lines)
