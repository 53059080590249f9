"""The torch mirror of the thresholding test equals `service.scoring` and `service.kdensity`,
and its gradients are right."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from service.kdensity import DEFAULT_SIGMA2, KernelSet, log_k_density
from service.scoring import Kernel, kernel_mu, score_logits
from training.torch_scoring import (
    SCORES,
    KernelTensors,
    log_k_density_at,
    log_score_at,
    log_threshold,
    non_me_at,
    served,
    served_kind,
    service_name,
)

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


def _kernel_set(seed: int, classes: int = 4, per_class: int = 50, dim: int = 8) -> KernelSet:
    g = np.random.default_rng(seed)
    feats = g.normal(size=(classes, per_class, dim)).astype(np.float32)
    return KernelSet(features=feats, sigma2=DEFAULT_SIGMA2["rce"])


def test_k_density_mirror_equals_the_service_on_near_and_far_features() -> None:
    kset = _kernel_set(5)
    g = np.random.default_rng(6)
    # Features next to a kernel point, inside the cloud, and far away (KD underflows to 0 in
    # linear space: both compare in log space).
    near = kset.features[2, :5] + 0.01 * g.normal(size=(5, 8)).astype(np.float32)
    far = 40.0 * g.normal(size=(5, 8)).astype(np.float32)
    feats = np.concatenate([near, g.normal(size=(10, 8)).astype(np.float32), far])
    labels = np.r_[np.full(5, 2), g.integers(0, 4, size=15)]
    ref = log_k_density(feats, labels, kset)
    assert (ref[-5:] < -1000).all()  # far away indeed
    got = log_k_density_at(
        torch.from_numpy(feats), torch.from_numpy(labels), KernelTensors.of(kset)
    ).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-8)


def test_k_density_with_one_kernel_point_is_the_gaussian_exponent() -> None:
    """Hand-computed: with N = 1, log KD = -||f - f_1||^2 / sigma^2."""
    kset = KernelTensors(torch.tensor([[[1.0, 2.0]], [[0.0, 0.0]]], dtype=torch.float64), 0.5)
    f = torch.tensor([[1.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    got = log_k_density_at(f, torch.tensor([0, 1]), kset)
    torch.testing.assert_close(got, torch.tensor([-4.0 / 0.5, -25.0 / 0.5], dtype=torch.float64))


def test_log_k_density_gradient_matches_finite_differences() -> None:
    kset = KernelTensors.of(_kernel_set(7))
    f = torch.randn(6, 8, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    f.requires_grad_(True)
    cls = torch.tensor([0, 1, 2, 3, 0, 1])
    assert torch.autograd.gradcheck(
        lambda v: log_k_density_at(v, cls, kset), (f,), eps=1e-6, atol=1e-5
    )  # type: ignore[arg-type]


def test_k_density_is_not_a_function_of_the_logits() -> None:
    with pytest.raises(ValueError, match="features"):
        log_score_at(_logits("plain", seed=9), torch.zeros(64, dtype=torch.long), KERNELS[0],
                      "k_density")  # fmt: skip


def test_served_kind_knows_every_score_the_mirror_covers() -> None:
    assert [served_kind(service_name(k)) for k in SCORES] == list(SCORES)
    with pytest.raises(ValueError, match="entropy"):
        served_kind("entropy")


def test_energy_mirror_equals_the_service_and_t_is_taken_as_it_is() -> None:
    z = _logits("ce", seed=5)
    ref = score_logits(z.numpy(), KERNELS[0], "energy")
    got = served(z, KERNELS[0], "energy")
    np.testing.assert_array_equal(got.label.numpy(), ref.label)
    np.testing.assert_allclose(got.log_score.numpy(), ref.energy, rtol=1e-12)
    # The energy is a logarithm already: T is compared as it is (and may be negative).
    assert log_threshold("energy", -2.5) == -2.5
    assert log_threshold("confidence", 0.5) == pytest.approx(math.log(0.5))
    assert log_threshold("j", 0.0) == -math.inf
