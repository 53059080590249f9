"""Training objectives: cross-entropy and reverse cross-entropy (Eq. 4), from log_softmax."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Objective = Literal["ce", "rce"]


def ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of softmax(Z) against one-hot labels: (B, L), (B,) -> ()."""
    return F.cross_entropy(logits, target)


def rce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean reverse cross-entropy, Eq. (4): -(1/(L-1)) * sum_{i != t} log softmax(Z)_i.

    This is the cross-entropy of softmax(Z) against the reverse label y_R (0 at t, 1/(L-1)
    elsewhere); at test time the network predicts with softmax(-Z).
    """
    num_classes = logits.shape[-1]
    log_p = F.log_softmax(logits, dim=-1)  # (B, L)
    total = log_p.sum(dim=-1)
    at_target = log_p.gather(-1, target[:, None])[:, 0]
    return (-(total - at_target) / (num_classes - 1)).mean()


def reverse_labels(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The reverse label vectors y_R: (B,) -> (B, L), 0 at t and 1/(L-1) elsewhere."""
    y = torch.full((target.shape[0], num_classes), 1.0 / (num_classes - 1))
    return y.scatter(1, target[:, None], 0.0)


def objective_loss(
    objective: Objective, logits: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    if objective == "ce":
        return ce_loss(logits, target)
    if objective == "rce":
        return rce_loss(logits, target)
    raise ValueError(f"unknown objective {objective!r}; use 'ce' or 'rce'")


def served_logits(objective: Objective, logits: torch.Tensor) -> torch.Tensor:
    """The vector fed to the softmax at test time: -Z for RCE (reverse logits), Z for CE."""
    return -logits if objective == "rce" else logits
