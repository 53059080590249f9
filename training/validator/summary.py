"""Write the attack report to a folder: report.json, PNG figures and a markdown summary."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from training.evaluation import num, pct, table
from training.validator import plots
from training.validator.report import CLEAN_REFUSE_RATES, ETAS, METRICS, build_report
from training.validator.run import AttackRun

log = logging.getLogger(__name__)

ABBR = {"confidence": "conf", "non_me": "nonME", "j_score": "J"}


def _pct(v: float | None) -> str:
    return pct(v, 1)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [table(header, rows), ""]


def _rows(report: dict[str, Any], cost: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(m, a) for m in report["models"] for a in plots._attacks(m, cost)]


def markdown(report: dict[str, Any], figures: dict[str, list[str]]) -> str:
    """The summary tables (the JSON has every number, including the full threshold sweeps)."""
    att = report["attack"]
    lines = [
        f"# Attack report: {att['method'].upper()}"
        + (f" ({att['steps']} steps)" if att["steps"] else "")
        + f", decisions from {report['source']}",
        "",
        f"N = {att['n']} clean test images + N adversarial versions per (cost, eps); "
        f"labels attacked: {att['labels']}. Scores are the service's responses "
        f"(or the same ONNX graph in-process when the source is 'offline'). Wall time of the "
        f"run that wrote this report: {report['wall_time_s']:.0f} s (cached parts excluded).",
        "",
    ]
    lines += _table(
        ["model", "objective", "T (manifest)", "T rule", "clean acc", "clean refuse at T"],
        [
            [
                m["name"],
                m["objective"].upper(),
                f"{m['threshold']:.4g}",
                m["threshold_rule"] or "-",
                _pct(m["clean_accuracy"]),
                _pct(m["clean_refuse_at_T"]),
            ]
            for m in report["models"]
        ],
    )
    for cost in att["costs"]:
        rows = _rows(report, cost)
        lines += [
            f"## {att['method'].upper()}, {cost.upper()} cost",
            "",
            "At the manifest's T (the service's "
            "decisions); accuracy of accepted is over the mixed 2N set.",
            "",
        ]
        lines += _table(
            [
                "model",
                "eps",
                "adv acc (no test)",
                "attack success",
                "refuse normal",
                "refuse adv",
                "acc of accepted",
                "acc of accepted adv",
            ],
            [
                [
                    m["objective"].upper(),
                    f"{a['eps']:g}",
                    _pct(a["adversarial_accuracy"]),
                    _pct(a["attack_success_rate"]),
                    _pct(a["at_manifest_T"]["refuse_normal"]),
                    _pct(a["at_manifest_T"]["refuse_adversarial"]),
                    _pct(a["at_manifest_T"]["accuracy_of_accepted"]),
                    _pct(a["at_manifest_T"]["accuracy_of_accepted_adversarial"]),
                ]
                for m, a in rows
            ],
        )
        lines += [
            "ROC-AUC (normal vs adversarial; 'subset': clean right and attack succeeded, "
            "as in the authors' code) and refuse rate on adversarial samples when T is set "
            "on these clean images to refuse 5% / 1% of them.",
            "",
        ]
        header = ["model", "eps", "pairs in subset"]
        header += [f"AUC {ABBR[k]}" for k in METRICS] + [f"AUC {ABBR[k]} subset" for k in METRICS]
        header += [
            f"adv refused @{r:.0%} ({ABBR[k]})"
            for r in CLEAN_REFUSE_RATES
            for k in ("confidence", "j_score")
        ]
        body = []
        for m, a in rows:
            fixed = a["fixed_clean_refuse"]
            body.append(
                [m["objective"].upper(), f"{a['eps']:g}", str(a["pairs_correct_and_successful"])]
                + [num(a["auc"][k]) for k in METRICS]
                + [num(a["auc_correct_and_successful"][k]) for k in METRICS]
                + [
                    _pct(fixed[f"{r:g}"][k]["refuse_adversarial"])
                    for r in CLEAN_REFUSE_RATES
                    for k in ("confidence", "j_score")
                ]
            )
        lines += _table(header, body)
        lines += [
            "Ranking (Figs. 3-4): the 2N samples sorted by each metric; accuracy of the "
            "top N / share of normal samples in it.",
            "",
        ]
        lines += _table(
            ["model", "eps", *[f"top-N acc / normal share by {ABBR[k]}" for k in METRICS]],
            [
                [
                    m["objective"].upper(),
                    f"{a['eps']:g}",
                    *[
                        f"{_pct(a['ranking'][k]['top_n_accuracy'])} / "
                        f"{_pct(a['ranking'][k]['top_n_normal_share'])}"
                        for k in METRICS
                    ],
                ]
                for m, a in rows
            ],
        )
        lines += [
            "Relaxation factor (Fig. 6): mean J on adversarial samples per eta, and mean "
            "confidence.",
            "",
        ]
        lines += _table(
            ["model", "eps", *[f"J eta={e:g}" for e in ETAS], "confidence"],
            [
                [
                    m["objective"].upper(),
                    f"{a['eps']:g}",
                    *[num(a["eta_sweep"]["mean_j_adversarial"][f"{e:g}"]) for e in ETAS],
                    num(a["eta_sweep"]["mean_confidence_adversarial"]),
                ]
                for m, a in rows
            ],
        )
        lines += [f"![{f}]({f})" for f in figures[cost]] + [""]
    lines += [f"![{f}]({f})" for f in figures["examples"]] + [""]
    return "\n".join(lines)


def write_report(run: AttackRun, out_dir: Path) -> dict[str, Any]:
    """report.json + PNGs + report.md in out_dir; returns the report dict."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(run)
    figures: dict[str, list[str]] = {"examples": []}
    method = run.cfg.method
    for cost in run.cfg.costs:
        figures[cost] = [
            plots.per_eps(
                report["models"], cost, out_dir / f"ranking-{cost}.png", "ranking", method
            ),
            plots.per_eps(report["models"], cost, out_dir / f"auc-{cost}.png", "auc", method),
        ]
        for m in report["models"]:
            stem = f"{m['name']}-{cost}"
            figures[cost].append(
                plots.threshold_sweep(m, cost, out_dir / f"sweep-{stem}.png", method)
            )
            figures[cost].append(plots.eta_sweep(m, cost, out_dir / f"eta-{stem}.png", method))
    for rec in run.records:
        figures["examples"].append(
            plots.examples(rec.name, rec.examples, out_dir / f"examples-{rec.name}.png")
        )
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text(markdown(report, figures), encoding="utf-8")
    log.info("report written to %s", out_dir)
    return report
