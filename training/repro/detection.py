"""Threshold sweeps and filtering summaries of the paper reproductions.

The scores themselves (confidence, non-ME, kernel non-ME, J) come from `service.scoring`, ROC-AUC
and the clean-rate threshold from `training.evaluation`; this module only aggregates them.
Conventions: a sample is *accepted* (answered) when its score is >= T and refused (NOT SURE)
otherwise; "accuracy of output" is the accuracy over the accepted
samples, judged against the true label of the clean image (paper, Section 4.5 and Fig. 7).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from service.scoring import Kernel, score_logits
from training.evaluation import refuse_at_clean_rate, roc_auc

F64 = npt.NDArray[np.float64]
Bool = npt.NDArray[np.bool_]
METRICS = ("confidence", "j_score")


@dataclass(frozen=True)
class Scored:
    """Per-sample predictions and scores of one set of images (B,)."""

    label: npt.NDArray[np.int64]
    confidence: F64
    j_score: F64

    def metric(self, name: str) -> F64:
        if name not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {name!r}")
        return self.confidence if name == "confidence" else self.j_score


def score(logits: npt.NDArray[np.floating], kernel: Kernel) -> Scored:
    """Run the thresholding test's scoring (service.scoring) on served logits (B, L)."""
    s = score_logits(logits, kernel)
    return Scored(label=s.label, confidence=s.confidence, j_score=s.j_score)


def sweep(
    scores: F64, correct: Bool, is_adversarial: Bool, thresholds: F64
) -> dict[str, list[float]]:
    """For each T: accuracy of output, refuse rate overall, on clean and on adversarial samples.

    scores, correct, is_adversarial: (M,) over a mixed set; thresholds: (K,). Returns lists (K,).
    """
    accepted = scores[None, :] >= thresholds[:, None]  # (K, M)
    n_acc = accepted.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(n_acc > 0, (accepted & correct[None, :]).sum(axis=1) / n_acc, np.nan)
    clean, adv = ~is_adversarial, is_adversarial
    curves = {
        "threshold": thresholds,
        "accuracy_of_output": acc,
        "refuse_rate": 1.0 - accepted.mean(axis=1),
        "refuse_rate_clean": 1.0 - accepted[:, clean].mean(axis=1),
        "refuse_rate_adversarial": 1.0 - accepted[:, adv].mean(axis=1),
    }
    # 6 significant digits are plenty for rates over <= 10^6 samples and keep the JSON small.
    return {k: [float(f"{v:.6g}") for v in c] for k, c in curves.items()}


def filtering_summary(
    clean: Scored, adversarial: Scored, y: npt.NDArray[np.int64], clean_refuse: float = 0.05
) -> dict[str, float]:
    """Attack success and, per metric, how well it flags the adversarial samples.

    `auc_success` uses only pairs whose clean image is classified correctly and whose attack
    succeeded (the authors' protocol); `adv_refused` is the share of those successful
    adversarial samples refused at the T that refuses `clean_refuse` of all clean samples.
    """
    clean_ok = clean.label == y
    fooled = adversarial.label != y
    success = clean_ok & fooled
    out: dict[str, float] = {
        "clean_accuracy": float(clean_ok.mean()),
        "adversarial_accuracy": float((~fooled).mean()),
        "attack_success_rate": float(success.sum() / max(int(clean_ok.sum()), 1)),
    }
    for m in METRICS:
        c, a = clean.metric(m), adversarial.metric(m)
        out[f"auc_all_{m}"] = roc_auc(c, a)
        out[f"auc_success_{m}"] = roc_auc(c[success], a[success])
        t, refused = refuse_at_clean_rate(c, a[success], clean_refuse)
        out[f"threshold_{m}"] = t
        out[f"adv_refused_{m}"] = refused
        out[f"mean_adv_{m}"] = float(a.mean())
    return out
