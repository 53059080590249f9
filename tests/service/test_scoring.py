"""The thresholding test against values computed by hand (math module, one sample at a time)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.scoring import (
    Kernel,
    decide,
    kernel_mu,
    kernel_non_me,
    kernel_sigma,
    non_me,
    score_logits,
    softmax,
    threshold_for_refuse_rate,
)


def hand_non_me(p: list[float]) -> float:
    """Eq. (1) written out: entropy of the non-maximal probabilities renormalised to 1."""
    top = max(range(len(p)), key=lambda i: p[i])
    rest = [p[i] for i in range(len(p)) if i != top]
    total = sum(rest)
    return -sum((q / total) * math.log(q / total) for q in rest if q > 0)


@pytest.mark.parametrize(
    "p", [[0.5, 0.25, 0.25], [0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.4, 0.3, 0.2, 0.1]]
)
def test_non_me_matches_hand_computation(p: list[float]) -> None:
    assert non_me(np.array([p]))[0] == pytest.approx(hand_non_me(p), abs=1e-12)


def test_non_me_of_uniform_rest_is_log_l_minus_1() -> None:
    # p = [0.5, 0.25, 0.25]: the rest renormalises to [0.5, 0.5], entropy ln 2.
    assert non_me(np.array([[0.5, 0.25, 0.25]]))[0] == pytest.approx(math.log(2))


def test_j_score_by_hand() -> None:
    # p = [0.7, 0.2, 0.1], mu = ln 2, sigma = 0.1, eta = 1.
    p = [0.7, 0.2, 0.1]
    nme = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    k = math.exp(-((nme - math.log(2)) ** 2) / (1.0 * 0.1**2))
    scores = score_logits(np.log(np.array([p])), Kernel(mu=math.log(2), sigma=0.1))
    assert scores.label[0] == 0
    assert scores.confidence[0] == pytest.approx(0.7)
    assert scores.non_me[0] == pytest.approx(nme)
    assert scores.kernel_non_me[0] == pytest.approx(k)
    assert scores.j_score[0] == pytest.approx(0.7 * k)  # 0.5079...
    # 0.7 k = 0.5079 >= 0.5 is answered with its label; at T = 0.51 it is NOT SURE.
    assert decide(scores, 0.5).tolist() == [0] and decide(scores, 0.51).tolist() == [-1]


def test_eta_relaxes_the_kernel() -> None:
    values = np.array([1.0])
    strict = kernel_non_me(values, Kernel(mu=2.0, sigma=0.5, eta=0.1))[0]
    loose = kernel_non_me(values, Kernel(mu=2.0, sigma=0.5, eta=5.0))[0]
    assert strict == pytest.approx(math.exp(-1 / (0.1 * 0.25)))
    assert loose == pytest.approx(math.exp(-1 / (5.0 * 0.25)))


def test_saturated_ce_logits_stay_finite() -> None:
    # float32 softmax underflows the non-maximal probabilities; the log-space path must not.
    logits = np.zeros((1, 10), np.float32)
    logits[0, 3] = 100.0
    s = score_logits(logits, Kernel(mu=kernel_mu(10), sigma=0.1))
    assert s.label[0] == 3
    assert s.non_me[0] == pytest.approx(math.log(9))  # the 9 others are equal
    assert np.isfinite(s.j_score).all()


def test_softmax_is_shift_invariant_and_normalised() -> None:
    z = np.array([[1.0, 2.0, 3.0], [1001.0, 1002.0, 1003.0]])
    p = softmax(z)
    assert np.allclose(p.sum(axis=1), 1.0)
    assert np.allclose(p[0], p[1])
    e = [math.exp(v) for v in (1.0, 2.0, 3.0)]
    assert p[0, 2] == pytest.approx(e[2] / sum(e))


def test_kernel_parameters() -> None:
    assert kernel_mu(10) == pytest.approx(math.log(9))
    # sigma = sqrt(mean((v - mu)^2)) = sqrt((0.01 + 0.09) / 2)
    assert kernel_sigma(np.array([1.1, 0.7]), 1.0) == pytest.approx(math.sqrt(0.05))


def test_threshold_refuses_the_requested_share() -> None:
    j = np.array([0.9, 0.1, 0.5, 0.3, 0.2, 0.8, 0.7, 0.6, 0.4, 0.95])
    t = threshold_for_refuse_rate(j, 0.2)
    assert t == pytest.approx(0.3)
    assert (j < t).sum() == 2
    assert threshold_for_refuse_rate(j, 0.0) == 0.0
    with pytest.raises(ValueError):
        threshold_for_refuse_rate(j, 1.0)


def test_rows_slice_every_field() -> None:
    s = score_logits(np.random.default_rng(0).normal(size=(5, 4)), Kernel(1.0, 0.3))
    part = s.rows(1, 3)
    assert len(part) == 2
    assert np.array_equal(part.label, s.label[1:3])
    assert np.array_equal(part.probabilities, s.probabilities[1:3])


def test_energy_is_logsumexp_by_hand() -> None:
    z = [2.0, -1.0, 0.5]
    s = score_logits(np.array([z]), Kernel(mu=math.log(2), sigma=0.1), score="energy")
    assert s.energy[0] == pytest.approx(math.log(sum(math.exp(v) for v in z)))
    # Shift by +1000: the naive sum overflows, the stable one moves by exactly 1000.
    big = score_logits(np.array([z]) + 1000.0, Kernel(mu=math.log(2), sigma=0.1), "energy")
    assert big.energy[0] == pytest.approx(s.energy[0] + 1000.0)


@pytest.mark.parametrize("name", ["j_score", "confidence", "energy"])
def test_decide_applies_t_to_the_named_score(name: str) -> None:
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]]))
    base = score_logits(logits, Kernel(mu=math.log(2), sigma=0.5))
    values = base.named(name)  # type: ignore[arg-type]
    t = float(values.mean())
    s = score_logits(logits, Kernel(mu=math.log(2), sigma=0.5), score=name)  # type: ignore[arg-type]
    assert s.score_name == name and np.array_equal(s.score, values)
    want = [int(lab) if v >= t else -1 for lab, v in zip(s.label, values, strict=True)]
    assert decide(s, t).tolist() == want


def test_k_density_score_needs_features() -> None:
    with pytest.raises(ValueError, match="features"):
        score_logits(np.zeros((1, 3)), Kernel(mu=1.0, sigma=1.0), score="k_density")


def test_default_scores() -> None:
    from service.scoring import default_score

    assert default_score("rce") == "j_score" and default_score("ce") == "confidence"
