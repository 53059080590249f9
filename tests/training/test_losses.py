"""CE and RCE (Eq. 4) against hand computation and their defining properties."""

from __future__ import annotations

import math

import torch

from training.losses import ce_loss, rce_loss, reverse_labels, served_logits


def test_rce_matches_hand_computation() -> None:
    z = torch.tensor([[1.0, 2.0, 0.5]])
    e = [math.exp(v) for v in (1.0, 2.0, 0.5)]
    p = [v / sum(e) for v in e]
    # t = 1: -(1/(L-1)) * (log p0 + log p2)
    want = -(math.log(p[0]) + math.log(p[2])) / 2
    assert math.isclose(rce_loss(z, torch.tensor([1])).item(), want, rel_tol=1e-6)


def test_rce_equals_ce_against_the_reverse_label() -> None:
    torch.manual_seed(0)
    z, t = torch.randn(16, 10), torch.randint(0, 10, (16,))
    y_r = reverse_labels(t, 10)
    soft_ce = -(y_r * torch.log_softmax(z, dim=1)).sum(dim=1).mean()
    assert torch.allclose(rce_loss(z, t), soft_ce, atol=1e-6)
    assert torch.allclose(y_r.sum(dim=1), torch.ones(16))
    assert (y_r[torch.arange(16), t] == 0).all()


def test_rce_minimiser_over_a_free_logit_vector_is_the_reverse_label() -> None:
    z = torch.zeros(1, 5, requires_grad=True)
    opt = torch.optim.SGD([z], lr=5.0)
    for _ in range(3000):
        opt.zero_grad()
        rce_loss(z, torch.tensor([2])).backward()
        opt.step()
    p = torch.softmax(z, dim=1)[0].detach()
    assert p[2] < 1e-3  # 0 at t
    assert torch.allclose(p[[0, 1, 3, 4]], torch.full((4,), 0.25), atol=1e-3)  # 1/(L-1)
    # ...so the reverse logits predict t with confidence -> 1 and a uniform rest.
    assert served_logits("rce", z).argmax().item() == 2


def test_ce_is_pytorch_cross_entropy() -> None:
    z, t = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
    assert math.isclose(
        ce_loss(z, t).item(), -math.log(math.exp(2) / (math.exp(2) + 1)), rel_tol=1e-6
    )


def test_tiny_rce_model_is_argmax_correct_with_reverse_logits() -> None:
    """A small net trained with RCE predicts with softmax(-Z), not softmax(Z)."""
    from training.data import synthetic
    from training.nets import build_net

    torch.manual_seed(0)
    train, test = synthetic(512, seed=0), synthetic(256, seed=1)
    net = build_net("mlp", (1, 28, 28), 10)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(150):
        idx = torch.randint(0, 512, (64,))
        opt.zero_grad()
        rce_loss(net(train.x[idx]), train.y[idx]).backward()
        opt.step()
    with torch.no_grad():
        z = net(test.x)
    assert (served_logits("rce", z).argmax(1) == test.y).float().mean() > 0.95
    assert (z.argmax(1) == test.y).float().mean() < 0.2  # softmax(Z) is the 'liar'
