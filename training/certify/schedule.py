"""The eps ramp and the kappa schedule of certified training.

IBP training starts from the plain loss and grows the radius slowly: a network trained at the
full eps from the first step learns nothing (Gowal et al. 2018, Sec. 4). Gowal et al.'s MNIST
schedule, in optimiser steps of batch 100: 2,000 warm-up steps at eps 0, then eps ramps up over
10,000 steps to eps_train = 0.4 (for a test eps of 0.3), 60,000 steps in all, Adam at 1e-3
divided by 10 after 15,000 and 25,000 steps; kappa, the weight of the plain loss in
kappa * CE(z, y) + (1 - kappa) * CE(z_worst, y), falls from 1 to 0.5 during the ramp. The
CROWN-IBP code ties kappa to eps the same way, kappa = (eps_max - eps * (1 - kappa_final)) /
eps_max, and offers a "smoothed" ramp (polynomial for the first quarter, then linear) taken
from DeepMind's IBP code; both shapes are here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RampShape = Literal["linear", "smoothed"]


@dataclass(frozen=True)
class Schedule:
    eps: float = 0.4  # the final training radius (pixels in [0, 1])
    warmup_steps: int = 2_000  # steps at eps 0 (plain training)
    ramp_steps: int = 10_000  # steps over which eps grows from 0 to eps
    kappa_final: float = 0.5  # weight of the plain loss once eps is reached
    shape: RampShape = "smoothed"
    mid_point: float = 0.25  # smoothed: the polynomial part's share of the ramp
    beta: float = 4.0  # smoothed: the polynomial's degree

    def eps_at(self, step: int) -> float:
        """The training radius at an optimiser step (0-based)."""
        start, end = self.warmup_steps, self.warmup_steps + self.ramp_steps
        if step < start:
            return 0.0
        if step >= end:
            return self.eps
        if self.shape == "linear":
            return self.eps * (step - start) / (end - start)
        # Smoothed: eps = alpha * t^beta until mid, then the straight line to (end, eps) that
        # continues it with the same slope (alpha chosen so that value and slope match at mid).
        mid = start + int((end - start) * self.mid_point)
        if mid <= start:
            return self.eps * (step - start) / (end - start)
        t = float(mid - start) ** (self.beta - 1.0)
        alpha = self.eps / ((end - mid) * self.beta * t + (mid - start) * t)
        mid_value = alpha * float(mid - start) ** self.beta
        if step < mid:
            return alpha * float(step - start) ** self.beta
        return mid_value + (self.eps - mid_value) * (step - mid) / (end - mid)

    def kappa_at(self, step: int) -> float:
        """Weight of the plain loss: 1 at eps 0, kappa_final at the full eps, linear in eps."""
        if self.eps == 0:
            return 1.0
        return 1.0 - (1.0 - self.kappa_final) * self.eps_at(step) / self.eps
