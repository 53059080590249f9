"""SGNHT samples known posteriors: moments of Gaussians, with exact and with noisy gradients.

Each test runs many independent chains at once (one tensor, one shared thermostat: the target
is the product of the per-chain posteriors) and compares sample moments with the closed form.
"""

from __future__ import annotations

import pytest
import torch

from training.sgnht import SGNHT


def _run(
    theta: torch.Tensor,
    grad_u: object,
    opt: SGNHT,
    burn_in: int,
    keep: int,
) -> torch.Tensor:
    """Step the sampler with a hand-set gradient; return the kept draws (keep, *theta.shape)."""
    draws = []
    for t in range(burn_in + keep):
        theta.grad = grad_u(theta.detach())  # type: ignore[operator]
        opt.step()
        if t >= burn_in:
            draws.append(theta.detach().clone())
    return torch.stack(draws)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_samples_a_1d_gaussian_from_a_far_start() -> None:
    mean, sd = 1.5, 0.5
    theta = torch.full((2000,), mean + 6 * sd, requires_grad=True)  # 6 sd away from the mode
    opt = SGNHT([theta], lr=0.05, generator=torch.Generator().manual_seed(0))
    draws = _run(theta, lambda th: (th - mean) / sd**2, opt, burn_in=1000, keep=2000)
    assert draws.mean().item() == pytest.approx(mean, abs=0.02)
    assert draws.var().item() == pytest.approx(sd**2, rel=0.05)


def test_thermostat_absorbs_gradient_noise() -> None:
    """Noise of variance B on grad U must raise xi to about A + h B / 2, not heat the chain."""
    mean, sd, noise_sd, h = -1.0, 1.0, 4.0, 0.05
    gen = torch.Generator().manual_seed(1)
    theta = torch.zeros(2000, requires_grad=True)
    opt = SGNHT([theta], lr=h, diffusion=1.0, generator=torch.Generator().manual_seed(2))

    def noisy(th: torch.Tensor) -> torch.Tensor:
        return (th - mean) / sd**2 + noise_sd * torch.randn(th.shape, generator=gen)

    draws = _run(theta, noisy, opt, burn_in=1500, keep=2500)
    # Without the thermostat's adaptation the variance would be (A + hB/2) / A = 1.4x too big.
    assert draws.var().item() == pytest.approx(sd**2, rel=0.08)
    assert draws.mean().item() == pytest.approx(mean, abs=0.05)
    assert opt.param_groups[0]["xi"] == pytest.approx(1.0 + h * noise_sd**2 / 2, rel=0.15)


def test_samples_a_correlated_2d_gaussian() -> None:
    mean = torch.tensor([0.5, -2.0])
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.5]])
    precision = torch.linalg.inv(cov)
    theta = torch.zeros(1000, 2, requires_grad=True)  # (chains, 2)
    opt = SGNHT([theta], lr=0.04, generator=torch.Generator().manual_seed(3))
    draws = _run(theta, lambda th: (th - mean) @ precision, opt, burn_in=1500, keep=2500)
    flat = draws.reshape(-1, 2)  # (keep * chains, 2)
    assert torch.allclose(flat.mean(0), mean, atol=0.03)
    assert torch.allclose(torch.cov(flat.T), cov, atol=0.05)


def test_minibatch_loss_with_num_data_and_prior_gives_the_conjugate_posterior() -> None:
    """x_i ~ N(mu, 1), mu ~ N(0, 1/lam): posterior N(sum x / (N + lam), 1 / (N + lam))."""
    n, lam, batch = 200, 4.0, 20
    data = 2.0 + torch.randn(n, generator=torch.Generator().manual_seed(4))
    post_mean = (data.sum() / (n + lam)).item()
    post_var = 1.0 / (n + lam)
    chains = 500
    # Start at the maximum-likelihood estimate: from far away the initial transient would push
    # xi up, and xi relaxes by at most h per step (that start is covered by the 1-D test).
    mu = torch.full((chains,), data.mean().item(), requires_grad=True)
    opt = SGNHT([mu], lr=0.005, num_data=n, prior_precision=lam,
                generator=torch.Generator().manual_seed(5))  # fmt: skip
    pick = torch.Generator().manual_seed(6)
    draws = []
    for t in range(5000):
        idx = torch.randint(0, n, (chains, batch), generator=pick)  # a minibatch per chain
        # The mean minibatch NLL of each chain, summed over the independent chains.
        loss = (0.5 * (data[idx] - mu[:, None]) ** 2).mean(dim=1).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if t >= 2000:
            draws.append(mu.detach().clone())
    stacked = torch.stack(draws)
    assert stacked.mean().item() == pytest.approx(post_mean, abs=0.01)
    assert stacked.var().item() == pytest.approx(post_var, rel=0.1)


def test_thermostat_survives_a_state_dict_round_trip() -> None:
    theta = torch.zeros(10, requires_grad=True)
    opt = SGNHT([theta], lr=0.1, diffusion=0.5, generator=torch.Generator().manual_seed(7))
    _run(theta, lambda th: th, opt, burn_in=0, keep=20)
    xi = opt.param_groups[0]["xi"]
    assert xi != 0.5  # it has moved
    other = SGNHT([theta], lr=0.1, diffusion=0.5)
    other.load_state_dict(opt.state_dict())
    assert other.param_groups[0]["xi"] == xi
    assert torch.equal(other.state[theta]["momentum"], opt.state[theta]["momentum"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"lr": 0.0}, "lr"), ({"lr": 0.1, "num_data": 0}, "num_data"),
     ({"lr": 0.1, "diffusion": -1.0}, "diffusion")],
)  # fmt: skip
def test_rejects_bad_settings(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SGNHT([torch.zeros(1, requires_grad=True)], **kwargs)  # type: ignore[arg-type]
