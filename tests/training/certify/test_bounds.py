"""Interval bounds: hand-computed values, exactness where IBP is exact, agreement with an
independent lower/upper (W+ / W-) formulation, and soundness against random and PGD points."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training.adversarial import linf_pgd
from training.certify.bounds import (
    Bounds,
    UnsupportedLayer,
    ibp,
    input_box,
    interval_bounds,
    served_sign,
)
from training.losses import Objective
from training.modelio import load_torch_model
from training.nets import MLP, MLPConfig, Normalize, PreActBlock, ResNet, SimpleCNN, build_net

MODELS = Path(__file__).resolve().parents[3] / "models"
BUNDLED_CNNS = ("mnist-cnn-ce-at", "mnist-cnn-rce-at")
TOL = 1e-4  # float32 rounding of sums of a few thousand terms


def _unnormalised(net: nn.Module) -> nn.Module:
    """Set the first layer to the identity so that hand-computed values stay simple."""
    norm = net.normalize
    assert isinstance(norm, Normalize)
    norm.mean.zero_()
    norm.std.fill_(1.0)
    return net


def _hand_net() -> MLP:
    net = _unnormalised(MLP(MLPConfig(in_features=2, hidden=(2,), num_classes=2)))
    assert isinstance(net, MLP)
    lin = net.body[1]
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -1.0], [2.0, 1.0]]))
        lin.bias.copy_(torch.tensor([0.0, -1.0]))
        net.fc.weight.copy_(torch.tensor([[1.0, 2.0], [-1.0, 1.0]]))
        net.fc.bias.copy_(torch.tensor([0.5, 0.0]))
    return net.eval()


def test_hand_computed_bounds_and_elision() -> None:
    # x in [0.4, 0.6]^2: h = relu(x1 - x2, 2 x1 + x2 - 1) in [0, 0.2] x [0.2, 0.8];
    # z1 = h1 + 2 h2 + 0.5 in [0.9, 2.3], z2 = -h1 + h2 in [0, 0.8];
    # z1 - z2 = 2 h1 + h2 + 0.5 in [0.7, 1.7]: tighter than 0.9 - 0.8 = 0.1 from the logit bounds.
    net, x = _hand_net(), torch.full((1, 1, 1, 2), 0.5)
    ce = ibp(net, x, 0.1, "ce")
    torch.testing.assert_close(ce.lower, torch.tensor([[0.9, 0.0]]))
    torch.testing.assert_close(ce.upper, torch.tensor([[2.3, 0.8]]))
    torch.testing.assert_close(ce.margins, torch.tensor([[[0.0, 0.7], [-1.7, 0.0]]]))
    assert ce.certified(torch.tensor([0])).tolist() == [True]
    assert ce.certified(torch.tensor([1])).tolist() == [False]
    # RCE serves -Z: the bounds flip, and class 1 (the smaller Z) is the certified one.
    rce = ibp(net, x, 0.1, "rce")
    torch.testing.assert_close(rce.lower, torch.tensor([[-2.3, -0.8]]))
    torch.testing.assert_close(rce.upper, torch.tensor([[-0.9, 0.0]]))
    torch.testing.assert_close(rce.margins, torch.tensor([[[0.0, -1.7], [0.7, 0.0]]]))
    assert rce.certified(torch.tensor([1])).tolist() == [True]
    assert rce.certified(torch.tensor([0])).tolist() == [False]


def test_ball_is_cut_to_the_pixel_range() -> None:
    x = torch.tensor([[[[0.05, 0.5, 0.97]]]])
    lower, upper = input_box(x, torch.tensor([0.1]))
    torch.testing.assert_close(lower, torch.tensor([[[[0.0, 0.4, 0.87]]]]))
    torch.testing.assert_close(upper, torch.tensor([[[[0.15, 0.6, 1.0]]]]))


@pytest.mark.parametrize("objective", ["ce", "rce"])
def test_linear_classifier_bounds_are_exact(objective: Objective) -> None:
    """An affine function's minimum over a box is at a corner: IBP must equal that minimum."""
    torch.manual_seed(0)
    net = MLP(MLPConfig(in_features=4, hidden=(), num_classes=3)).eval()
    x = torch.tensor([[[[0.1, 0.5], [0.9, 0.35]]]])
    eps = 0.2
    b = ibp(net, x, eps, objective)
    lower, upper = input_box(x, eps)
    corners = torch.stack(
        [torch.where(torch.tensor(bits).view(1, 2, 2), upper[0], lower[0])
         for bits in itertools.product([False, True], repeat=4)]
    )  # fmt: skip  # (16, 1, 2, 2)
    with torch.no_grad():
        s = served_sign(objective) * net(corners)  # (16, 3)
    exact_margins = (s[:, :, None] - s[:, None, :]).amin(0)
    torch.testing.assert_close(b.margins[0], exact_margins, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.lower[0], s.amin(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(b.upper[0], s.amax(0), atol=1e-5, rtol=0)


def test_zero_radius_gives_the_served_logits() -> None:
    torch.manual_seed(1)
    net = build_net("cnn", (1, 28, 28), 10).eval()
    x = torch.rand(3, 1, 28, 28)
    b = ibp(net, x, 0.0, "rce")
    with torch.no_grad():
        s = -net(x)
    torch.testing.assert_close(b.lower, s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.upper, s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.margins, s[:, :, None] - s[:, None, :], atol=1e-4, rtol=1e-5)


# An independent formulation: lower/upper propagated with the positive and negative parts of
# each weight (lower' = W+ l + W- u + b), no centre/radius, written out layer by layer.


def _ref_affine(op, weight: torch.Tensor, bias: torch.Tensor | None, lo, hi):  # type: ignore[no-untyped-def]
    pos, neg = weight.clamp(min=0), weight.clamp(max=0)
    new_lo = op(lo, pos) + op(hi, neg)
    new_hi = op(hi, pos) + op(lo, neg)
    if bias is not None:
        new_lo, new_hi = new_lo + _bshape(bias, new_lo), new_hi + _bshape(bias, new_hi)
    return new_lo, new_hi


def _bshape(bias: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return bias.view(1, -1, *([1] * (like.dim() - 2)))


def _ref_layer(m: nn.Module, lo: torch.Tensor, hi: torch.Tensor):  # type: ignore[no-untyped-def]
    if isinstance(m, nn.Sequential):
        for child in m:
            lo, hi = _ref_layer(child, lo, hi)
        return lo, hi
    if isinstance(m, Normalize):
        return (lo - m.mean) / m.std, (hi - m.mean) / m.std
    if isinstance(m, nn.Conv2d):

        def conv(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return F.conv2d(t, w, None, m.stride, m.padding)

        return _ref_affine(conv, m.weight, m.bias, lo, hi)
    if isinstance(m, nn.Linear):
        return _ref_affine(F.linear, m.weight, m.bias, lo, hi)
    if isinstance(m, nn.BatchNorm2d):
        scale = m.weight / torch.sqrt(m.running_var + m.eps)
        shift = m.bias - m.running_mean * scale

        def mul(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return t * w.view(1, -1, 1, 1)

        return _ref_affine(mul, scale, shift, lo, hi)
    if isinstance(m, (nn.ReLU, nn.MaxPool2d, nn.Flatten)):
        return m(lo), m(hi)
    if isinstance(m, nn.Dropout):
        return lo, hi
    if isinstance(m, PreActBlock):
        a_lo, a_hi = _ref_layer(m.bn1, lo, hi)
        a_lo, a_hi = a_lo.relu(), a_hi.relu()
        s_lo, s_hi = _ref_layer(m.shortcut, a_lo, a_hi) if m.shortcut is not None else (lo, hi)
        o_lo, o_hi = _ref_layer(m.conv1, a_lo, a_hi)
        o_lo, o_hi = _ref_layer(m.bn2, o_lo, o_hi)
        o_lo, o_hi = _ref_layer(m.conv2, o_lo.relu(), o_hi.relu())
        return o_lo + s_lo, o_hi + s_hi
    raise AssertionError(type(m))


def _reference(net: nn.Module, x: torch.Tensor, eps: float, objective: Objective) -> Bounds:
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    if isinstance(net, SimpleCNN):
        lo, hi = _ref_layer(nn.Sequential(net.normalize, net.conv, net.mlp), lo, hi)
    elif isinstance(net, MLP):
        lo, hi = _ref_layer(nn.Sequential(net.normalize, net.body), lo, hi)
    else:
        assert isinstance(net, ResNet)
        seq = nn.Sequential(net.normalize, net.stem, net.blocks, net.bn, nn.ReLU())
        lo, hi = _ref_layer(seq, lo, hi)
        lo, hi = lo.mean((2, 3)), hi.mean((2, 3))
    sign = served_sign(objective)
    w, b = sign * net.fc.weight, sign * net.fc.bias
    s_lo, s_hi = _ref_affine(F.linear, w, b, lo, hi)
    n = w.shape[0]
    margins = torch.empty(x.shape[0], n, n)
    for c in range(n):
        for j in range(n):
            m_lo, _ = _ref_affine(F.linear, (w[c] - w[j])[None], (b[c] - b[j])[None], lo, hi)
            margins[:, c, j] = m_lo[:, 0]
    return Bounds(margins=margins, lower=s_lo, upper=s_hi)


def _random_net(arch: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = build_net(arch, (1, 28, 28), 10)
    for m in net.modules():  # BN statistics and affine parameters away from the identity
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(-1.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.eval()


@pytest.mark.parametrize("objective", ["ce", "rce"])
@pytest.mark.parametrize("arch", ["cnn", "mlp", "resnet8"])
def test_equal_to_the_lower_upper_formulation(arch: str, objective: Objective) -> None:
    net = _random_net(arch, 2)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        got, want = ibp(net, x, 0.01, objective), _reference(net, x, 0.01, objective)
    scale = float(want.upper.abs().max()) + 1.0
    for name in ("lower", "upper", "margins"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), atol=TOL * scale,
                                   rtol=1e-4, msg=name)  # fmt: skip


def targeted_pgd(
    net: nn.Module, x: torch.Tensor, direction: torch.Tensor, eps: float, steps: int = 10
) -> torch.Tensor:
    """L-inf PGD that maximises <direction, served logits> (e.g. s_j - s_y) inside the ball."""
    lower, upper = input_box(x, eps)
    xa = ((lower + upper) / 2).clone().requires_grad_(True)
    for _ in range(steps):
        (grad,) = torch.autograd.grad((net(xa) * direction).sum(), xa)
        with torch.no_grad():
            xa += 2.5 * eps / steps * grad.sign()
            xa.copy_(torch.max(torch.min(xa, upper), lower))
    return xa.detach()


def _adversarial_points(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, objective: Objective
) -> torch.Tensor:
    """Random points of the ball, the served-loss PGD point, and for every class j the PGD points
    that push s_j - s_y up and s_j alone up and down (all directions in one batch)."""
    sign, n, b = served_sign(objective), 10, x.shape[0]
    lower, upper = input_box(x, eps)
    points = [lower, upper]
    g = torch.Generator().manual_seed(0)
    points += [lower + (upper - lower) * torch.rand(x.shape, generator=g) for _ in range(6)]
    points.append(linf_pgd(net, x, y, objective, eps, 10, 2.5 * eps / 10, True, g))
    eye, own = torch.eye(n), F.one_hot(y, n).float()  # (L, L), (B, L)
    directions = torch.cat([eye[:, None] - own[None], eye[:, None].expand(n, b, n),
                            -eye[:, None].expand(n, b, n)])  # fmt: skip  # (3L, B, L)
    xs = x[None].expand(3 * n, *x.shape).reshape(3 * n * b, *x.shape[1:])
    pushed = targeted_pgd(net, xs, sign * directions.reshape(3 * n * b, n), eps)
    return torch.cat([torch.stack(points), pushed.view(3 * n, *x.shape)])  # (P, B, C, H, W)


def _check_inside(net: nn.Module, b: Bounds, points: torch.Tensor, objective: Objective) -> None:
    sign = served_sign(objective)
    with torch.no_grad():
        s = sign * net(points.flatten(0, 1)).view(points.shape[0], points.shape[1], -1)
    slack = TOL * (float(s.abs().max()) + 1.0)
    assert (s >= b.lower - slack).all(), float((b.lower - s).max())
    assert (s <= b.upper + slack).all(), float((s - b.upper).max())
    margins = s[..., :, None] - s[..., None, :]  # (P, B, L, L)
    assert (margins >= b.margins - slack).all(), float((b.margins - margins).max())


@pytest.mark.parametrize("objective", ["ce", "rce"])
@pytest.mark.parametrize("arch", ["cnn", "mlp", "resnet8"])
def test_random_and_pgd_points_lie_inside_the_bounds(arch: str, objective: Objective) -> None:
    net = _random_net(arch, 3)
    x, y = torch.rand(3, 1, 28, 28), torch.randint(0, 10, (3,))
    # The ResNet's bounds are loose at 0.03 already; its tight case is the telling one.
    for eps in (0.001,) if arch.startswith("resnet") else (0.001, 0.03):
        with torch.no_grad():
            b = ibp(net, x, eps, objective)
        _check_inside(net, b, _adversarial_points(net, x, y, eps, objective), objective)


def _digit() -> torch.Tensor:
    """The first MNIST test image (a 7), as shipped for the README: (1, 1, 28, 28) in [0, 1]."""
    import numpy as np
    from PIL import Image

    img = Image.open(MODELS.parent / "docs" / "examples" / "digit.png").convert("L")
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None, None]


@pytest.mark.parametrize("name", BUNDLED_CNNS)
def test_bundled_cnns_sound_on_digits(name: str) -> None:
    """The trained networks, at radii where the bounds are tight enough to mean something."""
    from training.data import synthetic

    net, manifest = load_torch_model(MODELS / name / "1")
    objective: Objective = manifest.objective  # type: ignore[assignment]
    x = torch.cat([_digit(), synthetic(2, seed=5).x])
    with torch.no_grad():
        y = (served_sign(objective) * net(x)).argmax(1)
    for eps in (1e-4, 0.01):
        with torch.no_grad():
            b = ibp(net, x, eps, objective)
        points = _adversarial_points(net, x, y, eps, objective)
        _check_inside(net, b, points, objective)
        cert = b.certified(y)
        if eps == 1e-4:  # not vacuous: the bounds prove the digit's label at this radius
            assert bool(cert[0])
        with torch.no_grad():
            labels = (served_sign(objective) * net(points.flatten(0, 1))).argmax(1)
        labels = labels.view(points.shape[0], -1)
        assert (labels[:, cert] == y[cert]).all(), "a certificate was contradicted"


def test_batchnorm_in_training_mode_is_refused() -> None:
    net = build_net("resnet8", (1, 28, 28), 10).train()
    with pytest.raises(UnsupportedLayer, match=r"net\.eval\(\)"):
        ibp(net, torch.rand(1, 1, 28, 28), 0.1, "ce")


def test_unknown_layer_is_named() -> None:
    net = build_net("mlp", (1, 28, 28), 10)
    net.body[2] = nn.Tanh()
    with pytest.raises(UnsupportedLayer, match="Tanh"):
        interval_bounds(net, input_box(torch.rand(1, 1, 28, 28), 0.1), "ce")
