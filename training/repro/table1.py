"""Table 1 and Figs. 3-6: the bundled ResNet-32 models and the validation tool's report.

Nothing is recomputed here: the clean test accuracies, training steps and wall times come from
the manifests in models/ (written by `notsure calibrate`), and the adversarial results from the
validator's report (docs/attack/, written by `notsure attack`) when it exists. The one thing
added is the verdict on Figs. 3-5's claim, RCE + J-score against CE + confidence, per cost and
eps: the difference of the two AUCs with a 95% interval from their standard errors (Hanley &
McNeil; the report keeps AUCs and pair counts, not the per-image scores a bootstrap needs).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from service.manifest import MANIFEST_FILE, Manifest
from training.evaluation import Z95, auc_se, num, pct, table
from training.repro.common import Output, update_section, write_json

log = logging.getLogger(__name__)

NAME = "table1"
# Test accuracy (%) as printed in Table 1 of the arXiv paper ("Overview of Test Accuracy"),
# MNIST column, checked against the text of the paper.
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
                "pairs": a.get("pairs_correct_and_successful"),
                "adv_refused_at_5pct": {k: v.get("refuse_adversarial") for k, v in fixed.items()},
            })  # fmt: skip
    return {
        "path": path,
        "attack": report.get("attack"),
        "rows": rows,
        "verdict": _verdict(rows),
        # Summary figures; the per-model threshold sweeps stay in the tool's own report.
        "figures": sorted(p for p in attack_dir.glob("*.png") if p.stem.startswith(FIGURES)),
        "summary_md": attack_dir / "report.md" if (attack_dir / "report.md").exists() else None,
    }


def _verdict(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Per cost@eps: RCE + J-score's AUC minus CE + confidence's (the paper's pairing, on the
    pairs whose clean image is right and whose attack succeeds), with a 95% interval. The two
    models' images are attacked separately, so the two errors are taken as independent."""
    out = []
    by = {(r["objective"], r["attack"]): r for r in rows}
    for (objective, key), rce in by.items():
        ce = by.get(("ce", key))
        if objective != "rce" or ce is None or not rce["pairs"] or not ce["pairs"]:
            continue
        a = float(rce["auc_success"]["j_score"])  # type: ignore[index]
        b = float(ce["auc_success"]["confidence"])  # type: ignore[index]
        n_a, n_b = int(rce["pairs"]), int(ce["pairs"])  # type: ignore[call-overload]
        half = Z95 * (auc_se(a, n_a, n_a) ** 2 + auc_se(b, n_b, n_b) ** 2) ** 0.5
        diff = a - b
        verdict = (
            "RCE + J ahead"
            if diff - half > 0
            else "CE + confidence ahead"
            if diff + half < 0
            else "no difference resolved"
        )
        out.append({"attack": key, "rce_j": a, "rce_pairs": n_a, "ce_confidence": b,
                    "ce_pairs": n_b, "difference": diff, "ci95": [diff - half, diff + half],
                    "verdict": verdict})  # fmt: skip
    return out


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
    lines += [
        "",
        "The paper's claim (Figs. 3-5): RCE + J-score separates adversarial from normal images "
        "better than CE + confidence. AUC of each on the pairs above (pairs: clean image right, "
        "attack succeeded), their difference and its 95% interval (Hanley-McNeil standard "
        "errors, the two models taken as independent; one training seed each, so seed-to-seed "
        "variation is not in the interval):",
        "",
    ]
    vbody = []
    for v in attack["verdict"]:  # type: ignore[attr-defined]
        lo, hi = v["ci95"]
        vbody.append([
            str(v["attack"]), f"{num(v['rce_j'])} ({v['rce_pairs']})",
            f"{num(v['ce_confidence'])} ({v['ce_pairs']})",
            f"{v['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]", str(v["verdict"]),
        ])  # fmt: skip
    header = ["cost@eps", "RCE J (pairs)", "CE conf. (pairs)", "difference [95%]", "verdict"]
    lines.append(table(header, vbody))
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
