"""The abstain-aware targeted attack on the tiny real models: inside the budget, its wins are
the service's wins, and trying every wrong class beats PGD that ignores the score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from service.scoring import score_logits
from training import data as data_mod
from training.attacks import get
from training.attacks.targeted import wrong_classes
from training.attacks.threat import AdaptiveConfig, Result, Threat
from training.modelio import load_torch_model
from training.torch_scoring import served_kind


@pytest.fixture(scope="module")
def images() -> data_mod.TensorData:
    return data_mod.synthetic(24, seed=7)


def _threat(model_repo: Path, objective: str) -> Threat:
    net, m = load_torch_model(model_repo / f"tiny-{objective}" / "1")
    for p in net.parameters():
        p.requires_grad_(False)
    return Threat(net, m.objective, m.kernel.to_kernel(), m.threshold, served_kind(m.score))


def _served_wins(threat: Threat, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Wins as `service.scoring` decides them, independent of the torch mirror."""
    with torch.no_grad():
        served = "j_score" if threat.score == "j" else "confidence"
        s = score_logits(threat.logits(x).numpy(), threat.kernel, served)
    return (s.label != y.numpy()) & (s.score >= threat.threshold)


def _run(threat: Threat, images: data_mod.TensorData, cfg: AdaptiveConfig) -> Result:
    res: Result = get("adaptive", cfg.attack)(
        threat, images.x, images.y, cfg, torch.Generator().manual_seed(0)
    )
    return res


@pytest.mark.parametrize("objective", ["rce", "ce"])
def test_targeted_stays_in_the_ball_and_its_wins_are_served_wins(
    model_repo: Path, images: data_mod.TensorData, objective: str
) -> None:
    threat = _threat(model_repo, objective)
    cfg = AdaptiveConfig(attack="targeted", eps=0.2, steps=10, restarts=1)
    res = _run(threat, images, cfg)
    assert ((res.adv - images.x).abs() <= cfg.eps + 1e-6).all()
    assert res.adv.min() >= 0.0 and res.adv.max() <= 1.0
    np.testing.assert_array_equal(res.won.numpy(), _served_wins(threat, res.adv, images.y))
    assert res.won.any()
    assert (res.spent <= 9 * cfg.steps).all()


def test_targeted_beats_pgd_that_ignores_the_score_on_the_undefended_model(
    model_repo: Path, images: data_mod.TensorData
) -> None:
    """The CE model served on its confidence: the same 90 steps per image, spent on every
    wrong class in turn, win more images than untargeted PGD on the classifier loss alone."""
    threat = _threat(model_repo, "ce")
    targeted = _run(
        threat, images, AdaptiveConfig(attack="targeted", eps=0.2, steps=10, restarts=1)
    )
    blind = _run(threat, images, AdaptiveConfig(attack="pgd", eps=0.2, steps=10, restarts=9))
    won_t, won_b = (
        _served_wins(threat, targeted.adv, images.y),
        _served_wins(threat, blind.adv, images.y),
    )
    assert won_t.sum() > won_b.sum()


def test_wrong_classes_are_every_class_but_the_label_strongest_first(model_repo: Path) -> None:
    threat = _threat(model_repo, "rce")
    ds = data_mod.synthetic(5, seed=3)
    order = wrong_classes(threat, ds.x, ds.y)
    logits = threat.logits(ds.x).detach()
    for i in range(5):
        want = [c for c in logits[i].argsort(descending=True).tolist() if c != ds.y[i]]
        assert order[i].tolist() == want
