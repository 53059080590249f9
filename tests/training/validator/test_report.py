"""The report's metrics against hand-computed and brute-force expectations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from service.manifest import KernelParams, Manifest
from service.scoring import score_logits
from training.clients import NOT_SURE, Decisions
from training.validator.report import auc, eps_metrics, top_n
from training.validator.run import ModelRecord


def _brute_force_top_n(values: list[float], flags: list[int], n: int) -> float:
    """Average, over every order of the samples, of a stable descending sort's top-n flags."""
    results = []
    for perm in itertools.permutations(range(len(values))):
        order = sorted(perm, key=lambda i: -values[i])  # stable: ties keep perm's order
        results.append(sum(flags[i] for i in order[:n]) / n)
    return float(np.mean(results))


@pytest.mark.parametrize(
    ("values", "flags", "n"),
    [
        ([0.9, 0.8, 0.7, 0.1], [1, 0, 1, 1], 2),
        ([1.0, 1.0, 1.0, 0.5, 0.2, 1.0], [1, 0, 0, 1, 1, 1], 3),  # a saturated CE confidence
        ([0.3, 0.3, 0.3], [1, 0, 0], 1),
        ([0.5, 0.4, 0.4, 0.4, 0.1], [0, 1, 1, 0, 1], 4),
    ],
)
def test_top_n_is_the_expectation_over_tie_orders(
    values: list[float], flags: list[int], n: int
) -> None:
    expected = _brute_force_top_n(values, flags, n)
    assert top_n(np.array(values), np.array(flags), n) == pytest.approx(expected)


def test_auc_counts_correctly_ordered_pairs() -> None:
    # Pairs (normal, adversarial): (0.9, 0.1) (0.9, 0.85) (0.8, 0.1) right, (0.8, 0.85) wrong.
    assert auc(np.array([0.9, 0.8]), np.array([0.1, 0.85])) == pytest.approx(0.75)
    assert auc(np.array([0.5]), np.array([0.5])) == pytest.approx(0.5)
    assert auc(np.array([]), np.array([0.3])) is None


def _manifest(threshold: float) -> Manifest:
    return Manifest(
        name="m",
        version=1,
        classes=[str(i) for i in range(10)],
        input_shape=(1, 28, 28),
        objective="rce",
        output="neg_logits",
        architecture="resnet8",
        kernel=KernelParams(mu=math.log(9), sigma=0.4),
        threshold=threshold,
        sha256="0" * 64,
    )


def _decisions(logits: np.ndarray, manifest: Manifest) -> Decisions:
    """What a correct service returns for these logits (float32, -1 on NOT SURE)."""
    s = score_logits(logits, manifest.kernel.to_kernel())
    return Decisions(
        label=np.where(s.score >= manifest.threshold, s.label, NOT_SURE),
        j_score=s.j_score.astype(np.float32),
        confidence=s.confidence.astype(np.float32),
        non_me=s.non_me.astype(np.float32),
        probabilities=s.probabilities.astype(np.float32),
        threshold=manifest.threshold,
    )


def test_eps_metrics_on_a_constructed_mixed_set() -> None:
    rng = np.random.default_rng(0)
    manifest = _manifest(threshold=0.3)
    n = 200
    y = rng.integers(0, 10, n)
    # Clean: confident and right; adversarial: flatter logits, half of them misclassified.
    clean_logits = rng.normal(0, 0.1, (n, 10))
    clean_logits[np.arange(n), y] += 8.0
    adv_logits = rng.normal(0, 0.1, (n, 10))
    wrong = (y + 1) % 10
    adv_logits[np.arange(n), np.where(np.arange(n) % 2 == 0, y, wrong)] += 2.0
    clean, adv = _decisions(clean_logits, manifest), _decisions(adv_logits, manifest)
    rec = ModelRecord("m", 1, manifest, y, clean)
    out = eps_metrics(rec, clean, adv)

    assert out["clean_accuracy"] == 1.0
    assert out["adversarial_accuracy"] == pytest.approx(0.5)
    assert out["attack_success_rate"] == pytest.approx(0.5)
    assert out["pairs_correct_and_successful"] == n // 2
    at_t = out["at_manifest_T"]
    j_clean, j_adv = clean.j_score, adv.j_score
    assert at_t["refuse_normal"] == pytest.approx(np.mean(j_clean < 0.3))
    assert at_t["refuse_adversarial"] == pytest.approx(np.mean(j_adv < 0.3))
    assert at_t["service_decision_mismatches"] == 0
    accepted = np.r_[j_clean, j_adv] >= 0.3
    correct = np.r_[np.ones(n, bool), adv.predicted == y]
    assert at_t["accuracy_of_accepted"] == pytest.approx(correct[accepted].mean())

    sweep = {row["T"]: row for row in out["threshold_sweep"]}
    assert sweep[0.0]["refuse_normal"] == 0.0 and sweep[0.0]["coverage"] == 1.0
    assert sweep[0.0]["accuracy_of_accepted"] == pytest.approx(0.75)

    # Clean samples are far more confident here: each metric separates them well.
    assert out["auc"]["confidence"] > 0.95 and out["auc"]["j_score"] > 0.5
    assert out["ranking"]["confidence"]["top_n_normal_share"] > 0.95
    for rate, rows in out["fixed_clean_refuse"].items():
        for row in rows.values():
            assert row["refuse_normal"] <= float(rate) + 1e-12
    eta = out["eta_sweep"]
    # At the manifest's own eta (1), the re-weighted mean J is the mean J the service returned.
    assert eta["mean_j_adversarial"]["1"] == pytest.approx(float(j_adv.mean()), rel=1e-5)
    # A wider kernel (larger eta, Eq. 5) can only raise every J.
    assert eta["mean_j_adversarial"]["5"] >= eta["mean_j_adversarial"]["1"]


def test_a_service_threshold_override_is_detected() -> None:
    manifest = _manifest(threshold=0.3)
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (50, 10))
    served = _manifest(threshold=0.6)  # the service applied another T than the manifest's
    clean, adv = _decisions(logits, served), _decisions(logits[::-1].copy(), served)
    rec = ModelRecord("m", 1, manifest, rng.integers(0, 10, 50), clean)
    at_t = eps_metrics(rec, clean, adv)["at_manifest_T"]
    assert at_t["service_T"] == 0.6 and at_t["T"] == 0.3
    # The report's at-T numbers use the manifest's T, not the service's decisions.
    assert at_t["refuse_normal"] == pytest.approx(np.mean(clean.j_score < 0.3))
    assert at_t["service_decision_mismatches"] == 0
