"""The torch mirror of the thresholding test equals `service.scoring`, and its gradient is right."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.scoring import Kernel, kernel_mu, score_logits
from training.attack.score import log_score_at, non_me_at, served

# An RCE-like kernel (narrow, near log 9) and a CE-like one (wide): the bundled models' shapes.
KERNELS = [Kernel(kernel_mu(10), 0.0048), Kernel(kernel_mu(10), 0.99, eta=2.0)]


def _logits(kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(64, 10, generator=g, dtype=torch.float64)
    if kind == "rce":  # non-maximal logits nearly equal, one clear winner: J near 1
        z = 0.01 * z
        z[:, 3] += 6.0
    elif kind == "ce":  # large logits: non-maximal probabilities underflow float32
        z = 25.0 * z
    return z


@pytest.mark.parametrize("kind", ["rce", "ce", "plain"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_mirror_equals_service_scoring(kind: str, kernel: Kernel) -> None:
    z = _logits(kind, seed=1)
    ref = score_logits(z.numpy(), kernel)
    got = served(z, kernel, "j")
    np.testing.assert_array_equal(got.label.numpy(), ref.label)
    log_j = got.log_score.numpy()
    # Where the service's J underflows (to 0 or to a denormal that has lost digits), the
    # mirror's log J must be below log(tiny): the same number, only representable in log space.
    tiny = np.finfo(np.float64).tiny
    zero = ref.j_score < tiny
    assert (log_j[zero] < np.log(tiny) + 1e-6).all()
    np.testing.assert_allclose(log_j[~zero], np.log(ref.j_score[~zero]), rtol=1e-9, atol=1e-9)
    conf = served(z, kernel, "confidence").log_score.exp().numpy()
    np.testing.assert_allclose(conf, ref.confidence, rtol=1e-12)
    np.testing.assert_allclose(
        non_me_at(torch.log_softmax(z, -1), got.label).numpy(), ref.non_me, rtol=1e-9, atol=1e-12
    )


def test_float32_logits_are_scored_in_float64() -> None:
    """The service scores float32 logits in float64; the mirror must not lose them to float32."""
    z = _logits("ce", seed=2).float()
    kernel = KERNELS[1]
    ref = score_logits(z.numpy(), kernel)
    assert (ref.j_score > 0).all()
    np.testing.assert_allclose(served(z, kernel).log_score.numpy(), np.log(ref.j_score), rtol=1e-9)


def test_non_me_at_another_class_is_the_non_me_if_that_class_were_the_top() -> None:
    """Hand-computed: excluding class c, the rest renormalised, then their entropy."""
    z = _logits("plain", seed=3)[:5]
    cls = torch.tensor([0, 4, 9, 2, 2])
    p = torch.softmax(z, -1)
    expected = []
    for row, c in zip(p, cls, strict=True):
        q = torch.cat([row[:c], row[c + 1 :]])
        q = q / q.sum()
        expected.append(-(q * q.log()).sum())
    torch.testing.assert_close(non_me_at(torch.log_softmax(z, -1), cls), torch.stack(expected))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kind", ["j", "confidence"])
def test_log_score_gradient_matches_finite_differences(kernel: Kernel, kind: str) -> None:
    z = _logits("plain", seed=4)[:6].clone().requires_grad_(True)
    cls = z.detach().argmax(-1)
    assert torch.autograd.gradcheck(
        lambda v: log_score_at(v, cls, kernel, kind), (z,), eps=1e-6, atol=1e-5
    )  # type: ignore[arg-type]


def test_gradient_is_finite_when_probabilities_underflow() -> None:
    z = torch.tensor(
        [[800.0, 0.0, -5.0, 1.0, 2.0, 0.0, 0.0, 3.0, 0.0, -900.0]], dtype=torch.float64
    )
    z.requires_grad_(True)
    log_score_at(z, torch.tensor([0]), KERNELS[1]).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
