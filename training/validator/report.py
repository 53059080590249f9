"""The numbers of the attack report (paper Section 4.3-4.5), from the recorded decisions.

Nothing here recomputes a model's scores: every metric is derived from what the service
returned (label, J-score, confidence, non-ME, probabilities). Only the relaxation-factor sweep
(Fig. 6) re-weights the returned non-ME with other kernels, through `service.scoring`.
Normal samples are the positive class throughout: a higher metric should mean "normal".
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from service.scoring import Kernel, kernel_non_me
from training.clients import Decisions
from training.evaluation import refuse_at_clean_rate, roc_auc
from training.provenance import run_record
from training.validator.run import AttackRun, ModelRecord

METRICS = ("confidence", "non_me", "j_score")
ETAS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0)  # Fig. 6
CLEAN_REFUSE_RATES = (0.05, 0.01)
# J-scores of well-calibrated models crowd near 0 and 1, so the grid is linear plus logarithmic.
T_GRID = tuple(
    float(t)
    for t in np.unique(np.round(np.r_[np.linspace(0.0, 1.0, 101), np.geomspace(1e-4, 1, 41)], 6))
)

Bools = npt.NDArray[np.bool_]


def top_n(values: np.ndarray, flags: np.ndarray, n: int) -> float:
    """Mean of `flags` over the n samples with the highest `values` (Figs. 3-4).

    A CE net's confidence saturates at 1.0 in float32, so ties are common: the tie group at the
    cut-off contributes its average, the expectation under a random order within ties.
    """
    v, f = np.asarray(values, np.float64), np.asarray(flags, np.float64)
    cut = np.sort(v)[::-1][n - 1]
    above, at = v > cut, v == cut
    slots = n - int(above.sum())
    return float((f[above].sum() + slots * f[at].mean()) / n)


def auc(normal: np.ndarray, adversarial: np.ndarray) -> float | None:
    """ROC-AUC of a metric separating normal (positive) from adversarial samples; None if a set
    is empty (JSON has no NaN)."""
    value = roc_auc(normal, adversarial)
    return None if np.isnan(value) else value


def _accuracy(correct: Bools, accepted: Bools) -> float | None:
    return float(correct[accepted].mean()) if accepted.any() else None


def _served(d: Decisions, rec: ModelRecord) -> np.ndarray:
    """The values of the score the model is served on (the records carry J and confidence)."""
    score = rec.manifest.score
    if score not in ("j_score", "confidence"):
        raise ValueError(f"the attack report covers models served on j_score or confidence, "
                         f"not {score}")  # fmt: skip
    return np.asarray(getattr(d, score))


def eps_metrics(rec: ModelRecord, clean: Decisions, adv: Decisions) -> dict[str, Any]:
    """All numbers for one (model, cost, eps) mixed set of 2N samples."""
    y, t = rec.y, rec.manifest.threshold
    ok_clean, ok_adv = clean.predicted == y, adv.predicted == y
    correct = np.r_[ok_clean, ok_adv]
    is_normal = np.r_[np.ones(len(y), bool), np.zeros(len(y), bool)]
    j = np.r_[clean.j_score, adv.j_score].astype(np.float64)
    # The authors' AUC subset: clean image right, attack successful (auc_of_roc_RCE.m).
    sub = ok_clean & ~ok_adv
    out: dict[str, Any] = {
        "clean_accuracy": float(ok_clean.mean()),
        "adversarial_accuracy": float(ok_adv.mean()),
        "attack_success_rate": float((~ok_adv[ok_clean]).mean()) if ok_clean.any() else None,
        "pairs_correct_and_successful": int(sub.sum()),
    }
    # At the manifest's T, the decisions are the service's own unless it applied another T
    # (e.g. a NOTSURE_THRESHOLDS override); score >= T then stands in for them.
    refused = np.r_[clean.refused, adv.refused]
    served = np.r_[_served(clean, rec), _served(adv, rec)].astype(np.float64)
    acc_t = ~refused if np.isclose(adv.threshold, t, rtol=0, atol=1e-7) else served >= t
    out["at_manifest_T"] = {
        "T": t,
        "refuse_normal": float(1 - acc_t[is_normal].mean()),
        "refuse_adversarial": float(1 - acc_t[~is_normal].mean()),
        "accuracy_of_accepted": _accuracy(correct, acc_t),
        "accuracy_of_accepted_adversarial": _accuracy(ok_adv, acc_t[~is_normal]),
        "service_T": adv.threshold,
        # Decisions that disagree with the returned score >= the returned T (expected 0;
        # float32 rounding could flip a sample sitting exactly at T).
        "service_decision_mismatches": int((refused != (served < adv.threshold)).sum()),
    }
    out["threshold_sweep"] = [
        {"T": tt, "accuracy_of_accepted": _accuracy(correct, j >= tt),
         "coverage": float((j >= tt).mean()),
         "refuse_normal": float((j[is_normal] < tt).mean()),
         "refuse_adversarial": float((j[~is_normal] < tt).mean())}
        for tt in sorted({*T_GRID, t})
    ]  # fmt: skip
    out["ranking"], out["auc"], out["auc_correct_and_successful"] = {}, {}, {}
    out["fixed_clean_refuse"] = {f"{r:g}": {} for r in CLEAN_REFUSE_RATES}
    for m in METRICS:
        vc, va = getattr(clean, m).astype(np.float64), getattr(adv, m).astype(np.float64)
        both = np.r_[vc, va]
        out["ranking"][m] = {"top_n_accuracy": top_n(both, correct, len(y)),
                             "top_n_normal_share": top_n(both, is_normal, len(y))}  # fmt: skip
        out["auc"][m] = auc(vc, va)
        out["auc_correct_and_successful"][m] = auc(vc[sub], va[sub])
        for r in CLEAN_REFUSE_RATES:
            # T chosen on these very clean images (an oracle choice, stated in the report).
            tr, refused = refuse_at_clean_rate(vc, va, r)
            out["fixed_clean_refuse"][f"{r:g}"][m] = {
                "threshold": tr,
                "refuse_normal": float((vc < tr).mean()),
                "refuse_adversarial": refused,
            }
    k = rec.manifest.kernel
    out["eta_sweep"] = {
        "mean_confidence_adversarial": float(adv.confidence.astype(np.float64).mean()),
        "mean_confidence_normal": float(clean.confidence.astype(np.float64).mean()),
        "mean_j_adversarial": {f"{e:g}": _mean_j(adv, Kernel(k.mu, k.sigma, e)) for e in ETAS},
        "mean_j_normal": {f"{e:g}": _mean_j(clean, Kernel(k.mu, k.sigma, e)) for e in ETAS},
    }
    return out


def _mean_j(d: Decisions, kernel: Kernel) -> float:
    """Mean J = confidence x kernel non-ME (Eq. 5) for another relaxation factor eta."""
    return float((d.confidence * kernel_non_me(d.non_me, kernel)).mean())


def model_report(rec: ModelRecord) -> dict[str, Any]:
    m = rec.manifest
    clean_t = ~rec.clean.refused  # the decisions the service made, on its own score
    return {
        "name": rec.name,
        "version": rec.version,
        "objective": m.objective,
        "architecture": m.architecture,
        "threshold": m.threshold,
        "threshold_rule": m.threshold_rule,
        "kernel": {"mu": m.kernel.mu, "sigma": m.kernel.sigma, "eta": m.kernel.eta},
        "n": len(rec.y),
        "clean_accuracy": float((rec.clean.predicted == rec.y).mean()),
        "clean_refuse_at_T": float(1 - clean_t.mean()),
        "timings_s": rec.timings,
        "attacks": {
            f"{cost}@{eps:g}": {"cost": cost, "eps": eps} | eps_metrics(rec, rec.clean, adv)
            for (cost, eps), adv in rec.adv.items()
        },
    }


def build_report(run: AttackRun) -> dict[str, Any]:
    """The whole report as a JSON-serialisable dict."""
    c = run.cfg
    return {
        "run": run_record(),
        "source": run.source,
        "wall_time_s": run.wall_time_s,
        "attack": {
            "method": c.method,
            "labels": c.labels,
            "costs": list(c.costs),
            "eps": list(c.eps),
            "steps": c.steps if c.method != "fgsm" else None,
            "n": c.n,
        },
        "models": [model_report(r) for r in run.records],
    }
