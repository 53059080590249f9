"""The stochastic-gradient Nosé-Hoover thermostat (SGNHT) of Ding et al. 2014 as a torch optimiser.

A sampler, not a minimiser: run long enough, the parameters are draws from the posterior
p(theta | D) ∝ exp(-U(theta)) with U = -log p(D | theta) - log p(theta). The RCE paper's
Bayesian baseline (Fig. 7, its reference [2]) is a 2x100 MLP sampled this way.

Algorithm 2 of Ding et al. (NIPS 2014), with step size h, one thermostat xi per parameter
group of n scalars, and diffusion A:

    p     <- p - xi * p * h - grad U(theta) * h + sqrt(2 A h) * N(0, I)
    theta <- theta + p * h
    xi    <- xi + (p.p / n - 1) * h

The thermostat xi adapts the friction until the mean kinetic energy per dimension is 1/2
(temperature 1), which absorbs the unknown variance of the stochastic gradient: that is what
makes minibatch gradients safe here, unlike in plain Hamiltonian Monte Carlo.

The caller's loss is the *mean* negative log-likelihood of a minibatch (what one would train
with); the optimiser rescales it: grad U = num_data * grad(mean NLL) + prior_precision * theta,
i.e. an unbiased estimate of the full-data U under an isotropic Gaussian prior N(0, 1/lambda).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch


class SGNHT(torch.optim.Optimizer):
    """SG Nosé-Hoover thermostat sampler (Ding et al. 2014, Alg. 2); `step()` is one SDE step."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        num_data: int = 1,
        prior_precision: float = 0.0,
        diffusion: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        """Args:
        lr: the step size h of the discretised dynamics.
        num_data: N, the number of training samples the mean minibatch loss stands for.
        prior_precision: lambda of the Gaussian prior N(0, I / lambda) on every parameter.
        diffusion: A, the injected noise; xi starts at A.
        generator: for reproducible noise (CPU tensors only).
        """
        if lr <= 0:
            raise ValueError(f"lr (step size h) must be > 0, got {lr}")
        if num_data < 1:
            raise ValueError(f"num_data must be >= 1, got {num_data}")
        if prior_precision < 0 or diffusion < 0:
            raise ValueError("prior_precision and diffusion must be >= 0")
        defaults = {"lr": lr, "num_data": num_data, "prior_precision": prior_precision,
                    "diffusion": diffusion, "xi": diffusion}  # fmt: skip
        super().__init__(params, defaults)
        self._generator = generator

    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=self._generator, dtype=like.dtype).to(like.device)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step of Alg. 2 for every parameter group; `closure` re-evaluates the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            h, a, xi = group["lr"], group["diffusion"], group["xi"]
            kinetic, count = 0.0, 0
            for theta in group["params"]:
                if theta.grad is None:
                    continue
                state = self.state[theta]
                if "momentum" not in state:
                    # p_0 ~ N(0, I): the chain starts at the target temperature.
                    state["momentum"] = self._noise(theta)
                p = state["momentum"]
                grad_u = theta.grad * group["num_data"]
                if group["prior_precision"]:
                    grad_u = grad_u + group["prior_precision"] * theta
                # p <- (1 - xi h) p - h grad U + sqrt(2 A h) N(0, I)
                p.mul_(1.0 - xi * h).add_(grad_u, alpha=-h)
                p.add_(self._noise(p), alpha=math.sqrt(2.0 * a * h))
                theta.add_(p, alpha=h)
                kinetic += float(p.square().sum())
                count += p.numel()
            if count:
                # xi <- xi + (p.p / n - 1) h: more friction when too hot, less when too cold.
                group["xi"] = xi + (kinetic / count - 1.0) * h
        return loss
