"""Network shapes, parameter counts and the exposed hidden vector."""

from __future__ import annotations

import pytest
import torch

from training.nets import build_net, count_parameters


def resnet_params(depth: int, channels: int, classes: int = 10) -> int:
    """Count by hand: stem, pre-act blocks (2 BN + 2 conv3x3, 1x1 projection when the width
    changes), final BN, linear head."""
    n = (depth - 2) // 6
    total = channels * 16 * 9
    c_in = 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += 2 * c_in + c_in * width * 9 + 2 * width + width * width * 9
            total += c_in * width if c_in != width else 0
            c_in = width
    return total + 2 * 64 + 64 * classes + classes


def cnn_params(c: int, f1: int, f2: int, hidden: int, side: int) -> int:
    convs = (c * f1 * 9 + f1) + (f1 * f1 * 9 + f1) + (f1 * f2 * 9 + f2) + (f2 * f2 * 9 + f2)
    return (
        convs + (f2 * side * side * hidden + hidden) + (hidden * hidden + hidden) + hidden * 10 + 10
    )


@pytest.mark.parametrize(
    ("arch", "shape", "params"),
    [
        ("resnet32", (1, 28, 28), resnet_params(32, 1)),
        ("resnet32", (3, 32, 32), resnet_params(32, 3)),
        ("resnet56", (1, 28, 28), resnet_params(56, 1)),
        ("resnet110", (3, 32, 32), resnet_params(110, 3)),
        ("cnn", (1, 28, 28), cnn_params(1, 32, 64, 200, 4)),
        ("cnn", (3, 32, 32), cnn_params(3, 64, 128, 256, 5)),
        ("mlp", (1, 28, 28), 784 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10),
    ],
)
def test_shapes_and_parameter_counts(arch: str, shape: tuple[int, int, int], params: int) -> None:
    net = build_net(arch, shape, 10).eval()
    x = torch.rand(3, *shape)
    assert net(x).shape == (3, 10)
    assert count_parameters(net) == params
    feats = net.features(x)
    assert feats.ndim == 2 and feats.shape[0] == 3
    assert torch.allclose(net.fc(feats), net(x))  # forward = head(features)


def test_resnet32_is_about_046m_parameters_as_in_the_paper() -> None:
    assert resnet_params(32, 1) == 466_426  # worked out on paper once
    assert abs(count_parameters(build_net("resnet32", (1, 28, 28), 10)) - 0.46e6) < 0.01e6


def test_normalisation_is_inside_the_network() -> None:
    net = build_net("resnet32", (1, 28, 28), 10)
    assert torch.allclose(net.normalize(torch.full((1, 1, 1, 1), 0.1307)), torch.zeros(1))


def test_bad_architecture_names() -> None:
    with pytest.raises(ValueError, match="6n\\+2"):
        build_net("resnet33", (1, 28, 28), 10)
    with pytest.raises(ValueError, match="unknown architecture"):
        build_net("vgg", (1, 28, 28), 10)
