"""Adaptive attacks on the tiny real models: bounds, real wins, early stopping, reference checks."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torchattacks
from torch import nn

from service.manifest import MODEL_FILE
from service.repository import read_kernel_set
from service.runtime import OnnxModel
from service.scoring import Scores, score_logits
from training import data as data_mod
from training.attacks.cw import cw_batch
from training.attacks.pgd import _project_off, pgd_batch, project, random_start, steepest
from training.attacks.threat import AdaptiveConfig, Threat, class_loss, l2_distance, score_loss
from training.export import ServedNet
from training.modelio import load_torch_model
from training.torch_scoring import KernelTensors, served_kind

LINF = ("lagrangian", "selective", "orthogonal", "pgd")


@pytest.fixture(scope="module")
def images() -> data_mod.TensorData:
    return data_mod.synthetic(24, seed=7)


def _threat(model_repo: Path, objective: str, threshold: float | None = None) -> Threat:
    net, m = load_torch_model(model_repo / f"tiny-{objective}" / "1")
    for p in net.parameters():
        p.requires_grad_(False)
    t = m.threshold if threshold is None else threshold
    return Threat(net, m.objective, m.kernel.to_kernel(), t, served_kind(m.score))


def _served_wins(threat: Threat, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Wins as `service.scoring` decides them, independent of the torch mirror."""
    with torch.no_grad():
        served = "j_score" if threat.score == "j" else "confidence"
        s = score_logits(threat.logits(x).numpy(), threat.kernel, served)
    return (s.label != y.numpy()) & (s.score >= threat.threshold)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("attack", LINF)
@pytest.mark.parametrize("objective", ["rce", "ce"])
def test_linf_attacks_stay_in_the_ball_and_their_wins_are_served_wins(
    model_repo: Path, images: data_mod.TensorData, attack: str, objective: str
) -> None:
    threat = _threat(model_repo, objective)
    cfg = AdaptiveConfig(attack=attack, eps=0.2, steps=20, restarts=2)  # type: ignore[arg-type]
    res = pgd_batch(threat, images.x, images.y, cfg, _gen())
    assert ((res.adv - images.x).abs() <= cfg.eps + 1e-6).all()
    assert res.adv.min() >= 0.0 and res.adv.max() <= 1.0
    np.testing.assert_array_equal(res.won.numpy(), _served_wins(threat, res.adv, images.y))
    if attack != "pgd":  # blind PGD may well lose everything to the test; the others must not
        assert res.won.any()


@pytest.mark.parametrize("attack", ["lagrangian", "selective", "pgd"])
@pytest.mark.parametrize("objective", ["rce", "ce"])
def test_l2_attacks_stay_in_the_l2_ball_and_their_wins_are_served_wins(
    model_repo: Path, images: data_mod.TensorData, attack: str, objective: str
) -> None:
    threat = _threat(model_repo, objective)
    cfg = AdaptiveConfig(attack=attack, eps=3.0, steps=20, restarts=2, norm="l2")  # type: ignore[arg-type]
    res = pgd_batch(threat, images.x, images.y, cfg, _gen())
    assert (l2_distance(res.adv, images.x) <= cfg.eps + 1e-4).all()
    assert res.adv.min() >= 0.0 and res.adv.max() <= 1.0
    np.testing.assert_array_equal(res.won.numpy(), _served_wins(threat, res.adv, images.y))
    if attack != "pgd":
        assert res.won.any()


def test_l2_step_projection_and_start_by_hand() -> None:
    g = torch.tensor([[3.0, -4.0], [0.0, 0.5]]).view(2, 1, 1, 2)
    torch.testing.assert_close(
        steepest(g, "l2").flatten(1), torch.tensor([[0.6, -0.8], [0.0, 1.0]])
    )
    torch.testing.assert_close(steepest(g, "linf").flatten(1), g.sign().flatten(1))
    x0 = torch.full((2, 1, 1, 2), 0.5)
    # (0.5 + 0.3, 0.5 - 0.4) is 0.5 from x0: scaled to 0.25; (0.6, 0.5) is inside, kept.
    cur = torch.tensor([[0.8, 0.1], [0.6, 0.5]]).view(2, 1, 1, 2)
    got = project(cur, x0, AdaptiveConfig(eps=0.25, norm="l2")).flatten(1)
    torch.testing.assert_close(got, torch.tensor([[0.65, 0.3], [0.6, 0.5]]))
    # The box comes after the ball: 0.5 + 0.9 is clipped to 1 even though the ball allows it.
    got = project(
        torch.tensor([1.4, 0.5]).view(1, 1, 1, 2), x0[:1], AdaptiveConfig(eps=1.0, norm="l2")
    )
    torch.testing.assert_close(got.flatten(1), torch.tensor([[1.0, 0.5]]))
    start = random_start(torch.Size((500, 1, 4, 4)), AdaptiveConfig(eps=2.0, norm="l2"), _gen())
    sizes = start.flatten(1).norm(dim=1)
    assert sizes.max() <= 2.0 + 1e-6 and 0.8 < sizes.mean() < 1.2  # uniform in [0, 2]


def test_l2_pgd_without_the_test_matches_torchattacks(
    model_repo: Path, images: data_mod.TensorData
) -> None:
    """With T = 0 the L2 attack is plain L2 PGD: its error rate must match torchattacks'
    PGDL2 at the same budget, within a few of the 24 images (the losses differ)."""
    threat = _threat(model_repo, "ce", threshold=0.0)
    eps, steps = 2.5, 20
    served = ServedNet(threat.net, threat.objective).eval()
    cfg = AdaptiveConfig(
        attack="pgd", eps=eps, steps=steps, restarts=1, step_size=eps / 8, norm="l2"
    )
    ours = pgd_batch(threat, images.x, images.y, cfg, _gen()).won.float().mean().item()
    torch.manual_seed(0)
    atk = torchattacks.PGDL2(served, eps=eps, alpha=eps / 8, steps=steps, random_start=True)
    adv = atk(images.x, images.y)
    with torch.no_grad():
        ref = (served(adv).argmax(1) != images.y).float().mean().item()
    assert 0.2 < ref < 1.0, ref  # a budget where the rate says something
    assert abs(ours - ref) <= 0.15, (ours, ref)


def test_success_grows_with_eps_and_reaches_all_images(
    model_repo: Path, images: data_mod.TensorData
) -> None:
    threat = _threat(model_repo, "rce")
    rates = [
        pgd_batch(threat, images.x, images.y, AdaptiveConfig(eps=e, steps=30, restarts=2), _gen())
        .won.float()
        .mean()
        .item()
        for e in (0.02, 0.1, 0.3, 0.6)
    ]
    assert rates == sorted(rates)
    assert rates[0] < rates[-1] and rates[-1] == 1.0


class _Counting(nn.Module):
    """Counts the images the attack sends through the network."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.rows = net, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += len(x)
        return self.net(x)


def test_won_images_leave_and_restarts_go_to_the_rest(
    model_repo: Path, images: data_mod.TensorData
) -> None:
    base = _threat(model_repo, "rce")
    counting = _Counting(base.net)
    threat = replace(base, net=counting)
    # The smallest budget at which some images are won and some are not.
    for eps in (0.1, 0.2, 0.3, 0.4, 0.6):
        counting.rows = 0
        cfg = AdaptiveConfig(eps=eps, steps=10, restarts=3)
        res = pgd_batch(threat, images.x, images.y, cfg, _gen())
        if res.won.any() and not res.won.all():
            break
    with torch.no_grad():
        clean_won = threat.wins(threat.logits(images.x), images.y)
    counting.rows -= len(images.x)  # the check above
    assert res.won.any() and not res.won.all()  # both kinds are present at this budget
    # One forward per image for the clean check, then per restart (steps + 1) forwards, or
    # k + 1 in the restart where it was won at step k; nothing after the win. A win at the
    # last check of restart r (k = steps) has the same `spent` as one at the start of restart
    # r + 1 (k = 0) and needs one forward less: those may count one less.
    r, k = res.spent // cfg.steps, res.spent % cfg.steps
    per_image = torch.where(res.won, r * (cfg.steps + 1) + k + 1, cfg.restarts * (cfg.steps + 1))
    per_image = torch.where(clean_won, torch.zeros_like(per_image), per_image)
    ambiguous = int((res.won & ~clean_won & (k == 0) & (r > 0)).sum())
    expected = len(images.x) + int(per_image.sum())
    assert expected - ambiguous <= counting.rows <= expected


def test_pgd_without_the_test_matches_torchattacks(
    model_repo: Path, images: data_mod.TensorData
) -> None:
    """With T = 0 the attack is plain PGD; its error rate must match torchattacks' PGD at the
    same budget (eps, steps, step size, random start). The loss differs (margin here, CE
    there), so the rates agree within a few of the 24 images, not exactly; APGD, whose step
    size adapts, is the stronger reference and bounds ours from above."""
    threat = _threat(model_repo, "ce", threshold=0.0)
    eps, steps = 0.15, 20
    served = ServedNet(threat.net, threat.objective).eval()
    cfg = AdaptiveConfig(attack="pgd", eps=eps, steps=steps, restarts=1, step_size=eps / 8)
    ours = pgd_batch(threat, images.x, images.y, cfg, _gen()).won.float().mean().item()
    torch.manual_seed(0)
    rates = []
    for atk in (
        torchattacks.PGD(served, eps=eps, alpha=eps / 8, steps=steps, random_start=True),
        torchattacks.APGD(served, eps=eps, steps=steps, loss="ce", seed=0),
    ):
        adv = atk(images.x, images.y)  # needs gradients: outside no_grad
        with torch.no_grad():
            rates.append((served(adv).argmax(1) != images.y).float().mean().item())
    pgd, apgd = rates
    assert 0.2 < pgd < 1.0  # a budget where the rate says something
    assert abs(ours - pgd) <= 0.15, (ours, rates)
    assert ours <= apgd + 0.05, (ours, rates)


def test_adaptive_attack_beats_the_one_that_ignores_the_score(
    model_repo: Path, images: data_mod.TensorData
) -> None:
    threat = _threat(model_repo, "rce")
    cfg = AdaptiveConfig(eps=0.1, steps=30, restarts=2)
    adaptive = pgd_batch(threat, images.x, images.y, cfg, _gen()).won.float().mean()
    blind = (
        pgd_batch(threat, images.x, images.y, replace(cfg, attack="pgd"), _gen()).won.float().mean()
    )
    assert adaptive >= blind


def test_projection_removes_the_component_along_the_other_gradient() -> None:
    g = torch.tensor([[3.0, 4.0], [1.0, 0.0]]).view(2, 1, 1, 2)
    other = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(2, 1, 1, 2)
    out = _project_off(g, other)
    torch.testing.assert_close(out.flatten(1), torch.tensor([[0.0, 4.0], [1.0, 0.0]]))


@pytest.mark.parametrize("objective", ["rce", "ce"])
def test_cw_wins_are_served_wins_and_more_search_never_grows_the_distance(
    model_repo: Path, images: data_mod.TensorData, objective: str
) -> None:
    threat = _threat(model_repo, objective)
    x, y = images.x[:16], images.y[:16]
    cfg = AdaptiveConfig(attack="cw-l2", steps=30, restarts=1, lambdas=(1.0,))
    one, three = cw_batch(threat, x, y, cfg), cw_batch(threat, x, y, replace(cfg, restarts=3))
    for res in (one, three):
        np.testing.assert_array_equal(res.won.numpy(), _served_wins(threat, res.adv, y))
        assert res.adv.min() >= 0.0 and res.adv.max() <= 1.0
    assert three.won.sum() >= one.won.sum() > 0
    both = one.won & three.won
    assert (l2_distance(three.adv, x)[both] <= l2_distance(one.adv, x)[both] + 1e-6).all()


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="attack must be one of"):
        AdaptiveConfig(attack="fgsm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pixel units"):
        AdaptiveConfig(eps=2.0)
    assert AdaptiveConfig(eps=2.0, norm="l2").eps == 2.0  # an L2 budget may exceed 1
    with pytest.raises(ValueError, match="norm must be"):
        AdaptiveConfig(norm="l1")  # type: ignore[arg-type]


def test_cw_learning_rate_decays_along_a_cosine_to_one_percent() -> None:
    from training.attacks.cw import cosine_lr

    assert cosine_lr(0.1, 0, 100) == pytest.approx(0.1)
    assert cosine_lr(0.1, 50, 100) == pytest.approx(0.1 * (0.01 + 0.99 * 0.5))
    assert cosine_lr(0.1, 100, 100) == pytest.approx(0.001)


class _KDensity:
    """A tiny model attacked on K-density, with the service's own view of it (ONNX graph,
    `service.scoring`, the verified kernel set) to check the attack against."""

    def __init__(self, model_repo: Path, objective: str, images: data_mod.TensorData) -> None:
        folder = model_repo / f"tiny-{objective}" / "1"
        net, m = load_torch_model(folder)
        for p in net.parameters():
            p.requires_grad_(False)
        kset = read_kernel_set(m, folder)
        assert kset is not None
        self.kset, self.kernel = kset, m.kernel.to_kernel()
        self.onnx = OnnxModel(folder / MODEL_FILE, device="cpu")
        # The tiny nets' features are so tight that the T refusing a share of clean images
        # is near 1, out of reach of a 20-step attack: T a quarter of the lowest clean density
        # still refuses what the blind attack makes of these images (log KD about -4 to -6).
        t = 0.25 * float(self.served(images.x).named("k_density").min())
        self.threat = Threat(net, m.objective, self.kernel, t, "k_density", KernelTensors.of(kset))

    def served(self, x: torch.Tensor) -> Scores:
        logits, feats = self.onnx.run_with_features(x.numpy())
        return score_logits(logits, self.kernel, "k_density", feats, self.kset)

    def served_wins(self, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        s = self.served(x)
        return (s.label != y.numpy()) & (s.named("k_density") >= self.threat.threshold)


@pytest.mark.parametrize("objective", ["rce", "ce"])
def test_k_density_threat_scores_images_as_the_service_does(
    model_repo: Path, images: data_mod.TensorData, objective: str
) -> None:
    kd = _KDensity(model_repo, objective, images)
    with torch.no_grad():
        logits, feats = kd.threat.forward(images.x)
        assert feats is not None
        got = kd.threat.log_score(logits, logits.argmax(-1), feats).numpy()
    ref = kd.served(images.x)
    np.testing.assert_array_equal(logits.argmax(-1).numpy(), ref.label)
    # torch and onnxruntime features differ by float32 rounding, (f - f_i)^2 / sigma^2 by more.
    np.testing.assert_allclose(got, np.log(ref.named("k_density")), rtol=1e-4, atol=1e-4)


def test_k_density_threat_needs_the_kernel_set(model_repo: Path) -> None:
    threat = _threat(model_repo, "rce")
    with pytest.raises(ValueError, match="kernel set"):
        replace(threat, score="k_density")
    kd_threat = replace(
        threat, score="k_density", kernel_set=KernelTensors(torch.zeros(10, 1, 4), 1.0)
    )
    with pytest.raises(ValueError, match="features"):
        kd_threat.wins(torch.zeros(2, 10), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("attack", ["lagrangian", "selective", "orthogonal"])
@pytest.mark.parametrize("objective", ["rce", "ce"])
def test_k_density_attacks_win_served_wins_inside_the_ball(
    model_repo: Path, images: data_mod.TensorData, attack: str, objective: str
) -> None:
    kd = _KDensity(model_repo, objective, images)
    cfg = AdaptiveConfig(attack=attack, eps=0.2, steps=20, restarts=2)  # type: ignore[arg-type]
    res = pgd_batch(kd.threat, images.x, images.y, cfg, _gen())
    assert ((res.adv - images.x).abs() <= cfg.eps + 1e-6).all()
    assert res.adv.min() >= 0.0 and res.adv.max() <= 1.0
    np.testing.assert_array_equal(res.won.numpy(), kd.served_wins(res.adv, images.y))
    if attack != "orthogonal":  # too weak to win here in 40 steps; see the next test
        assert res.won.any()


def test_orthogonal_score_steps_raise_the_k_density_of_the_misclassified_images(
    model_repo: Path, images: data_mod.TensorData
) -> None:
    kd = _KDensity(model_repo, "rce", images)
    cfg = AdaptiveConfig(attack="orthogonal", eps=0.3, steps=20, restarts=1)
    medians = []
    for c in (cfg, replace(cfg, attack="pgd")):
        s = kd.served(pgd_batch(kd.threat, images.x, images.y, c, _gen()).adv)
        wrong = s.label != images.y.numpy()
        assert wrong.sum() >= 3
        medians.append(np.median(np.log(s.named("k_density")[wrong])))
    orthogonal, blind = medians
    assert orthogonal > blind + 1.0, medians


def test_k_density_term_wins_more_than_the_attack_that_ignores_it(
    model_repo: Path, images: data_mod.TensorData
) -> None:
    kd = _KDensity(model_repo, "rce", images)
    cfg = AdaptiveConfig(eps=0.2, steps=20, restarts=2)
    adaptive = pgd_batch(kd.threat, images.x, images.y, cfg, _gen()).won.sum()
    blind = pgd_batch(kd.threat, images.x, images.y, replace(cfg, attack="pgd"), _gen())
    assert adaptive > blind.won.sum()


@pytest.mark.parametrize("objective", ["rce", "ce"])
def test_cw_with_the_k_density_term_wins_served_wins(
    model_repo: Path, images: data_mod.TensorData, objective: str
) -> None:
    kd = _KDensity(model_repo, objective, images)
    x, y = images.x[:16], images.y[:16]
    cfg = AdaptiveConfig(attack="cw-l2", steps=30, restarts=2, lambdas=(1.0,))
    res = cw_batch(kd.threat, x, y, cfg)
    np.testing.assert_array_equal(res.won.numpy(), kd.served_wins(res.adv, y))
    assert res.adv.min() >= 0.0 and res.adv.max() <= 1.0
    assert res.won.any()


def test_gradient_alignment_reports_the_cosines_of_misclassified_images(
    model_repo: Path, images: data_mod.TensorData
) -> None:
    """The check's cosines, recomputed here by hand on the same images (its PGD is seeded)."""
    from training.audit.checks import gradient_alignment

    threat = _threat(model_repo, "rce")
    r = gradient_alignment(threat, images.x, images.y, 0.3, steps=10, name="tiny-rce")
    assert r.name == "gradient-alignment" and r.n == len(images.y)
    assert 0 < r.values["misclassified"] <= 1
    assert r.values["with_both_gradients"] > 0  # some wrong images are still below T'
    assert -1.0 <= r.values["median_cosine"] <= 1.0
    assert 0.0 <= r.values["share_abs_cosine_over_0.5"] <= 1.0
    # By hand: numpy cosines of the two gradients at the same adversarial images.
    cfg = AdaptiveConfig(attack="pgd", eps=0.3, steps=10, restarts=1, step_size=0.3 / 8)
    adv = pgd_batch(replace(threat, threshold=0.0), images.x, images.y, cfg, _gen()).adv
    adv = adv.detach().requires_grad_(True)
    logits, feats = threat.forward(adv)
    c = class_loss(logits, images.y, cfg).double().sum()
    s = score_loss(threat, logits, images.y, cfg, at_served=True, features=feats).sum()
    gc = torch.autograd.grad(c, adv, retain_graph=True)[0].flatten(1).numpy().astype(np.float64)
    gs = torch.autograd.grad(s, adv)[0].flatten(1).numpy().astype(np.float64)
    wrong = (logits.argmax(-1) != images.y).numpy()
    nc, ns = np.linalg.norm(gc, axis=1), np.linalg.norm(gs, axis=1)
    both = wrong & (nc > 0) & (ns > 0)
    assert r.values["with_both_gradients"] == both.sum()
    cos = (gc[both] * gs[both]).sum(1) / (nc[both] * ns[both])
    lower_median = np.sort(cos)[(len(cos) - 1) // 2]  # torch's median of an even count
    assert r.values["median_cosine"] == pytest.approx(float(lower_median), abs=1e-5)


@pytest.mark.parametrize("objective", ["rce", "ce"])
def test_energy_served_models_are_attacked_on_the_energy(
    model_repo: Path, images: data_mod.TensorData, objective: str
) -> None:
    """A model served on the energy (logsumexp of the logits, compared with T as it is, not
    its log): the attack's wins are the wins the service's scoring decides on the energy."""
    net, m = load_torch_model(model_repo / f"tiny-{objective}" / "1")
    for p in net.parameters():
        p.requires_grad_(False)
    kernel = m.kernel.to_kernel()
    with torch.no_grad():
        clean = score_logits(ServedNet(net, m.objective)(images.x).numpy(), kernel, "energy")
    t = float(np.quantile(clean.energy, 0.25))  # a quarter of the clean images refused
    threat = Threat(net, m.objective, kernel, t, "energy")
    res = pgd_batch(threat, images.x, images.y, AdaptiveConfig(eps=0.3, steps=20, restarts=2),
                    _gen())  # fmt: skip
    assert ((res.adv - images.x).abs() <= 0.3 + 1e-6).all()
    with torch.no_grad():
        s = score_logits(threat.logits(res.adv).numpy(), kernel, "energy")
    np.testing.assert_array_equal(res.won.numpy(), (s.label != images.y.numpy()) & (s.energy >= t))
    assert res.won.any()
