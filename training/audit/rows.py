"""Result rows of the adaptive audit, from the chunks the runner saved.

A row: {"model", "score", "attack", "eps", "n", "steps", "restarts", "attack_success",
"handled", ...} with attack_success = share of the n images whose served answer is a wrong,
accepted label, and handled = 1 - attack_success (answer right or NOT SURE). Extra keys say
the norm, the threshold and how many images the planned job covers, and for a model with a
bound graph the radius its answers are certified at and whether the decision required it
("certify_eps", "certificate_required").
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from training.audit.jobs import AuditJob
from training.provenance import run_record

KEYS = ("model", "score", "attack", "norm", "eps", "clean_refusal")
# Rows with the same KEYS that are not the same figure: other settings, or a model decided with
# a certificate (its rows never replace those from before it had one).
SAME_RUN = ("steps", "restarts", "planned_n", "loss", "certify_eps", "certificate_required")


def attack_label(job: AuditJob) -> str:
    a = job.attack
    return f"{a.attack}-ce" if a.attack == "lagrangian" and a.loss == "ce" else a.attack


def _row(
    job: AuditJob,
    attack: str,
    eps: float,
    norm: str,
    won: np.ndarray,
    threshold: float,
    steps: int,
    restarts: int,
    **extra: object,
) -> dict[str, object]:
    success = float(won.mean()) if len(won) else 0.0
    return {
        "model": job.model,
        "score": job.score,
        "attack": attack,
        "eps": eps,
        "n": len(won),
        "steps": steps,
        "restarts": restarts,
        "attack_success": round(success, 4),
        "handled": round(1.0 - success, 4),
        "norm": norm,
        "threshold": threshold,
        "clean_refusal": job.clean_refusal,
        "planned_n": job.n,
        **extra,
    }


def job_rows(
    job: AuditJob, saved: dict[str, np.ndarray], l2_budgets: Sequence[float]
) -> list[dict[str, object]]:
    """One row per job (one per L2 budget for C&W)."""
    a, won, t = job.attack, saved["served_won"], float(saved["threshold"][0])
    disagree = int((saved["torch_won"] != saved["served_won"]).sum())
    if a.attack == "cw-l2":
        return [
            _row(
                job,
                "cw-l2",
                b,
                "l2",
                won & (saved["l2"] <= b + 1e-6),
                t,
                a.steps,
                a.restarts,
                torch_vs_served_disagree=disagree,
            )
            for b in l2_budgets
        ]
    return [
        _row(
            job,
            attack_label(job),
            a.eps,
            a.norm,
            won,
            t,
            a.steps,
            a.restarts,
            torch_vs_served_disagree=disagree,
            mean_steps_to_win=round(float(saved["spent"][won].mean()), 1) if won.any() else None,
        )
    ]


def worst_case_rows(
    members: list[tuple[AuditJob, dict[str, np.ndarray]]],
    also: Sequence[tuple[AuditJob, dict[str, np.ndarray]]] = (),
) -> list[dict[str, object]]:
    """Per image, won when any attack of the group won it, over the largest job's images;
    the jobs in `also` (C&W for an L2 budget) add their wins but never set the images."""
    if not members:
        return []
    main_job, main = max(members, key=lambda m: len(m[1]["idx"]))
    won = np.zeros(len(main["idx"]), dtype=bool)
    for _, saved in [*members, *also]:
        m = min(len(won), len(saved["idx"]))
        won[saved["idx"][:m]] |= saved["served_won"][:m]
    names = sorted({attack_label(j) for j, _ in [*members, *also]})
    return [
        _row(
            main_job,
            "worst-case",
            main_job.attack.eps,
            main_job.attack.norm,
            won,
            float(main["threshold"][0]),
            main_job.attack.steps,
            main_job.attack.restarts,
            over=names,
        )
    ]


def within_budget(saved: dict[str, np.ndarray], budget: float) -> dict[str, np.ndarray]:
    """A C&W job's saved results as a member of an L2 group: won where it won within the
    budget (C&W searches for the smallest perturbation; L2 PGD is given the budget)."""
    return {**saved, "served_won": saved["served_won"] & (saved["l2"] <= budget + 1e-6)}


def merge_rows(path: Path, rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Replace rows with the same identity, keep the others, write atomically, sorted; each row
    carries the date and machine of its run (`"run"`). A row is not replaced by one over fewer
    images: that is the same job started again where its
    saved results were lost, and it shows its own figure once it has caught up."""
    old = json.loads(path.read_text()) if path.exists() else []

    def ident(r: dict[str, object]) -> tuple[str, ...]:
        return tuple(str(r.get(k)) for k in (*KEYS, *SAME_RUN))

    merged = {ident(r): r for r in old}
    for r in rows:
        was = merged.get(ident(r))
        if was is None or int(r["n"]) >= int(was["n"]):  # type: ignore[call-overload]
            # A row keeps the date and machine of the run that gave its figures: rebuilt with
            # the same figures it keeps its stamp, with new ones it takes this run's.
            same = was is not None and {k: v for k, v in was.items() if k != "run"} == r
            merged[ident(r)] = {**r, "run": was["run"] if same and "run" in was else run_record()}  # type: ignore[index]
    out = sorted(merged.values(), key=lambda r: tuple(str(r.get(k)) for k in KEYS))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.replace(path)
    return out
