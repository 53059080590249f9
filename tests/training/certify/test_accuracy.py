"""The certificates read off margin bounds: hand-computed cases, and the confidence bound against
the softmax of real points of the ball."""

from __future__ import annotations

import math

import numpy as np
import torch

from training.certify.accuracy import certified_labels, handled, never_accepted
from training.certify.bounds import ibp, input_box
from training.nets import build_net


def _margins(rows: list[list[float]]) -> np.ndarray:
    return np.asarray([rows], dtype=np.float32)  # (1, L, L)


def test_certified_label_needs_every_rival_beaten() -> None:
    m = _margins([[0.0, 0.5, 0.2], [-0.5, 0.0, -1.0], [-0.2, 0.1, 0.0]])
    assert certified_labels(m).tolist() == [[True, False, False]]
    m[0, 0, 2] = -0.01
    assert certified_labels(m).tolist() == [[False, False, False]]


def test_a_class_that_is_always_beaten_is_never_accepted() -> None:
    # Class 1 is below class 2 everywhere (M[2, 1] = 0.1 > 0): never the argmax, whatever T.
    m = _margins([[0.0, -3.0, -3.0], [-3.0, 0.0, -3.0], [-3.0, 0.1, 0.0]])
    assert never_accepted(m, threshold=0.0).tolist() == [[False, True, False]]


def test_confidence_bound_by_hand() -> None:
    # Class 0: s_1 - s_0 >= M[1, 0] = -1 and s_2 - s_0 >= M[2, 0] = -2, so
    # p_0 <= 1 / (1 + e^-1 + e^-2) = 0.6652.
    m = _margins([[0.0, -1.0, -1.0], [-1.0, 0.0, -1.0], [-2.0, -1.0, 0.0]])
    bound = 1 / (1 + math.exp(-1) + math.exp(-2))
    assert never_accepted(m, threshold=bound + 1e-3)[0, 0]
    assert not never_accepted(m, threshold=bound - 1e-3)[0, 0]
    # Handled for true class 1 at T = 0.7: classes 0 and 2 stay below T everywhere.
    p2 = 1 / (1 + math.exp(-1) + math.exp(-1))
    assert p2 < 0.7
    assert handled(m, np.array([1]), threshold=0.7).tolist() == [True]
    assert handled(m, np.array([1]), threshold=0.6).tolist() == [False]


def test_confidence_bound_holds_at_points_of_the_ball() -> None:
    torch.manual_seed(0)
    net = build_net("mlp", (1, 28, 28), 10).eval()
    x = torch.rand(4, 1, 28, 28)
    eps = 0.02
    with torch.no_grad():
        margins = ibp(net, x, eps, "ce").margins.numpy().astype(np.float64)
        lower, upper = input_box(x, eps)
        g = torch.Generator().manual_seed(1)
        points = [lower, upper] + [lower + (upper - lower) * torch.rand(x.shape, generator=g)
                                   for _ in range(50)]  # fmt: skip
        probs = torch.stack([net(p).softmax(1) for p in points]).numpy()  # (P, B, L)
    log_denominator = np.log(np.exp(margins).sum(axis=1))  # (B, L): log sum_k exp(M[k, j])
    p_upper = np.exp(-log_denominator)
    assert (probs <= p_upper[None] + 1e-6).all()
    assert (p_upper < 1).any(), "the bound says nothing at this radius"
