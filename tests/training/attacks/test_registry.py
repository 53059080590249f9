"""The attack registry: every attack a config may name is registered, each is run by name
through one call signature, and a name no module registered is refused with the names there
are."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training import data as data_mod
from training.attacks import get, names, register
from training.attacks.classic import AttackConfig, attack, input_gradient_sign
from training.attacks.threat import AdaptiveConfig, Result, Threat
from training.modelio import load_torch_model
from training.torch_scoring import served_kind

ADAPTIVE = {"lagrangian", "selective", "orthogonal", "pgd", "cw-l2", "apgd", "square", "targeted"}
CLASSIC = {"fgsm", "bim", "pgd", "illc"}


def test_every_family_has_its_attacks() -> None:
    assert set(names("adaptive")) == ADAPTIVE
    assert set(names("classic")) == CLASSIC


def test_an_unknown_name_is_refused_with_the_names_there_are() -> None:
    with pytest.raises(ValueError, match=r"no adaptive attack 'fgsm'; registered: .*lagrangian"):
        get("adaptive", "fgsm")
    with pytest.raises(ValueError, match="attack must be one of"):
        AdaptiveConfig(attack="fgsm")
    with pytest.raises(ValueError, match="method must be one of"):
        AttackConfig(method="lagrangian")  # type: ignore[arg-type]


def test_a_name_cannot_be_registered_twice() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        register("classic", "fgsm")(lambda *a: None)
    assert get("classic", "fgsm").__name__ == "fgsm"  # the first one stays


def _threat(model_repo: Path, name: str) -> Threat:
    net, m = load_torch_model(model_repo / name / "1")
    for p in net.parameters():
        p.requires_grad_(False)
    return Threat(net, m.objective, m.kernel.to_kernel(), m.threshold, served_kind(m.score))


@pytest.mark.parametrize("name", sorted(ADAPTIVE))
def test_each_adaptive_attack_runs_by_name_inside_its_budget(model_repo: Path, name: str) -> None:
    threat = _threat(model_repo, "tiny-rce")
    ds = data_mod.synthetic(6, seed=2)
    eps = 0.2
    cfg = AdaptiveConfig(attack=name, eps=eps, steps=3, restarts=1)
    res = get("adaptive", name)(threat, ds.x, ds.y, cfg, torch.Generator().manual_seed(0))
    assert isinstance(res, Result) and res.adv.shape == ds.x.shape
    assert res.won.dtype == torch.bool and res.spent.shape == (6,)
    assert res.adv.min() >= 0 and res.adv.max() <= 1
    if name != "cw-l2":  # C&W searches for the smallest L2 perturbation, without a budget
        assert (res.adv - ds.x).abs().max() <= eps + 1e-6
    with torch.no_grad():  # a win is a wrong label the test accepts, on the image kept
        logits, feats = threat.forward(res.adv)
        torch.testing.assert_close(threat.wins(logits, ds.y, feats)[res.won], res.won[res.won])


def test_fgsm_by_name_is_one_signed_gradient_step(model_repo: Path) -> None:
    """The validator's FGSM (run through the registry, in batches) is x + eps * sign(grad J),
    computed here on the whole set at once."""
    net, m = load_torch_model(model_repo / "tiny-ce" / "1")
    ds = data_mod.synthetic(10, seed=2)
    cfg = AttackConfig(method="fgsm", eps=0.1, batch_size=4)
    want = (ds.x + 0.1 * input_gradient_sign(net, m.objective, ds.x, ds.y, "ce")).clamp(0, 1)
    torch.testing.assert_close(attack(net, m.objective, ds.x, ds.y, cfg), want)
