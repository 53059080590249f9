"""The attacks against independent expectations: torchattacks' FGSM, hand-written costs, bounds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchattacks
from torch import nn

from training import data as data_mod
from training.attacks.classic import (
    AttackConfig,
    attack,
    attack_targets,
    cost_value,
    fgsm_direction,
    served_predictions,
)
from training.export import ServedNet
from training.losses import Objective
from training.modelio import load_torch_model
from training.nets import build_net


@pytest.fixture(scope="module")
def images() -> data_mod.TensorData:
    return data_mod.synthetic(48, seed=5)


def _random_net(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_net(arch, (1, 28, 28), 10).eval()


@pytest.mark.parametrize("objective", ["ce", "rce"])
@pytest.mark.parametrize("labels", ["true", "pred"])
@pytest.mark.parametrize("eps", [0.05, 0.3])
def test_fgsm_ce_cost_matches_torchattacks(
    model_repo: Path, images: data_mod.TensorData, objective: str, labels: str, eps: float
) -> None:
    net, manifest = load_torch_model(model_repo / f"tiny-{objective}" / "1")
    # torchattacks' FGSM ascends the cross-entropy of its model's output: give it the served
    # logits (-Z for RCE), which is exactly the "CE cost" of the paper.
    served = ServedNet(net, manifest.objective).eval()
    with torch.no_grad():
        target = images.y if labels == "true" else served(images.x).argmax(1)
    expected = torchattacks.FGSM(served, eps=eps)(images.x, target)
    cfg = AttackConfig(method="fgsm", eps=eps, cost="ce", labels=labels, batch_size=13)  # type: ignore[arg-type]
    got = attack(net, manifest.objective, images.x, images.y, cfg)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not net.training


def _rce_by_hand(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eq. (4) written out: -(1/(L-1)) * sum_{i != y} log softmax(z)_i, summed over the batch."""
    log_p = torch.log_softmax(z, dim=1)
    mask = torch.ones_like(log_p).scatter(1, y[:, None], 0.0)
    return -(log_p * mask).sum() / (z.shape[1] - 1)


@pytest.mark.parametrize("objective", ["ce", "rce"])
def test_rce_cost_is_rce_loss_of_the_liar_classifier(
    images: data_mod.TensorData, objective: Objective
) -> None:
    net = _random_net("mlp")
    x, y = images.x[:16], images.y[:16]
    z = net(x)
    # The liar classifier predicts with softmax(Z) for RCE nets and softmax(-Z) for CE nets.
    liar = z if objective == "rce" else -z
    torch.testing.assert_close(cost_value(objective, z, y, "rce"), _rce_by_hand(liar, y))
    served = -z if objective == "rce" else z
    torch.testing.assert_close(
        cost_value(objective, z, y, "ce"), F.cross_entropy(served, y, reduction="sum")
    )


@pytest.mark.parametrize("objective", ["ce", "rce"])
def test_rce_cost_direction_is_the_sign_of_the_hand_written_gradient(
    images: data_mod.TensorData, objective: Objective
) -> None:
    net = _random_net("resnet8")
    x, y = images.x[:8], images.y[:8]
    xg = x.clone().requires_grad_(True)
    z = net(xg)
    _rce_by_hand(z if objective == "rce" else -z, y).backward()
    assert xg.grad is not None
    cfg = AttackConfig(cost="rce", batch_size=3)
    torch.testing.assert_close(fgsm_direction(net, objective, x, y, cfg), xg.grad.sign())


def test_results_do_not_depend_on_the_batch_size(images: data_mod.TensorData) -> None:
    net = _random_net("resnet8", seed=1)
    for method in ("fgsm", "bim", "illc"):  # PGD's random start depends on the batching
        small, large = (
            attack(
                net,
                "rce",
                images.x,
                images.y,
                AttackConfig(method=method, eps=0.1, steps=3, batch_size=b),
            )  # type: ignore[arg-type]
            for b in (5, 48)
        )
        torch.testing.assert_close(small, large, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["fgsm", "bim", "pgd", "illc"])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_adversarial_images_stay_in_the_box_and_the_ball(
    images: data_mod.TensorData, method: str, eps: float
) -> None:
    net = _random_net("mlp")
    cfg = AttackConfig(method=method, eps=eps, steps=4)  # type: ignore[arg-type]
    adv = attack(net, "ce", images.x, images.y, cfg)
    assert adv.shape == images.x.shape and adv.dtype == torch.float32
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    assert float((adv - images.x).abs().max()) <= eps + 1e-6
    if eps == 0.0:
        torch.testing.assert_close(adv, images.x)


@pytest.mark.parametrize("objective", ["ce", "rce"])
def test_iterative_attacks_hurt_the_trained_model(
    model_repo: Path, images: data_mod.TensorData, objective: str
) -> None:
    net, manifest = load_torch_model(model_repo / f"tiny-{objective}" / "1")
    obj = manifest.objective
    clean_pred = served_predictions(net, obj, images.x).argmax(1)
    assert float((clean_pred == images.y).float().mean()) >= 0.95

    def predictions(method: str) -> torch.Tensor:
        adv = attack(net, obj, images.x, images.y, AttackConfig(method=method, eps=0.3, steps=10))  # type: ignore[arg-type]
        return served_predictions(net, obj, adv).argmax(1)

    def accuracy(method: str) -> float:
        return float((predictions(method) == images.y).float().mean())

    fgsm, bim, pgd = accuracy("fgsm"), accuracy("bim"), accuracy("pgd")
    # Iterating with a 2.5*eps/steps step reaches at least as far as one FGSM step.
    assert bim <= fgsm + 0.05 and pgd <= fgsm + 0.05
    assert bim < 0.5

    # ILLC is targeted: images move to the class the clean image found least likely.
    cfg = AttackConfig(method="illc", eps=0.3, steps=10)
    target = attack_targets(net, obj, images.x, images.y, cfg)
    assert not bool((clean_pred == target).any())
    adv = attack(net, obj, images.x, images.y, cfg)
    hits = float((served_predictions(net, obj, adv).argmax(1) == target).float().mean())
    untargeted_hits = float((predictions("bim") == target).float().mean())
    assert hits > 0.2 and hits > untargeted_hits


def test_pgd_random_start_is_seeded(images: data_mod.TensorData) -> None:
    net = _random_net("mlp")
    runs = [
        attack(
            net,
            "ce",
            images.x,
            images.y,
            AttackConfig(method="pgd", eps=0.1, steps=1, step_size=0.0, seed=s),
        )
        for s in (0, 0, 1)
    ]
    torch.testing.assert_close(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "cw"},
        {"cost": "mse"},
        {"labels": "random"},
        {"eps": 1.5},
        {"eps": -0.1},
        {"steps": 0},
        {"batch_size": 0},
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        AttackConfig(**kwargs)  # type: ignore[arg-type]
