"""Adversarial images crafted on one model to be sent to another (a transfer attack).

torchattacks' PGD on the source's served softmax, all steps, no early stop, so the images sit
deep inside the wrong class of the source; the target never lends a gradient.
"""

from __future__ import annotations

import numpy as np
import torch
import torchattacks
from torch import nn

from training.export import ServedNet
from training.losses import Objective


def craft(
    net: nn.Module, objective: Objective, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int
) -> np.ndarray:
    """(N, C, H, W) PGD images against the source's served softmax, 100 images a batch."""
    served = ServedNet(net, objective).eval()
    torch.manual_seed(0)
    atk = torchattacks.PGD(served, eps=eps, alpha=2.5 * eps / steps, steps=steps)
    n = len(x)
    return np.concatenate([atk(x[i : i + 100], y[i : i + 100]).numpy() for i in range(0, n, 100)])
