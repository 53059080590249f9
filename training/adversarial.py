"""Adversarial training: PGD-AT (Madry et al. 2018), TRADES (Zhang et al. 2019) and fast FGSM with
a random start (Wong, Rice & Kolter 2020), for CE and RCE nets, with a guard against
catastrophic overfitting.

TRADES trains on the natural loss of the clean batch plus beta times the KL divergence between
the served softmax of the clean and of the adversarial image; its inner attack maximises that
KL divergence (from a start 0.001 * N(0, 1) around the image, with the net in eval mode, as the
authors' `trades.py` does). For RCE nets the natural loss is RCE (Eq. 4) and the KL divergence
is between the served softmax(-Z) vectors.

The inner attack maximises the loss of what the model serves: cross-entropy of the served
softmax (softmax(Z) for CE nets, softmax(-Z) for RCE nets) against the true label, inside an
L-inf ball of radius eps around the image, pixels kept in [0, 1].

Fast FGSM can "catastrophically overfit": within a few steps the net becomes robust to its own
one-step attack and to nothing else (PGD accuracy falls to ~0 while FGSM accuracy rises). The
guard measures PGD accuracy on held-out images at regular steps; when it drops far below the
best value seen, training goes back to the weights of the last good check and either stops or
goes on with a smaller FGSM step (Wong et al.: a smaller step avoids the collapse).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from training.data import TensorData
from training.losses import Objective, objective_loss, served_logits

log = logging.getLogger(__name__)

AdversarialKind = Literal["none", "pgd", "trades", "fgsm-rs"]
ADVERSARIAL_KINDS: tuple[str, ...] = ("none", "pgd", "trades", "fgsm-rs")
GuardAction = Literal["backoff", "stop", "off"]


@dataclass(frozen=True)
class AdversarialConfig:
    kind: AdversarialKind = "none"
    eps: float = 0.3  # L-inf radius in pixel units ([0, 1] images); 0.3 is MNIST's standard
    steps: int = 10  # PGD iterations K of the inner attack (fgsm-rs: one step)
    # 0: 2.5 * eps / K for pgd and trades (Madry et al.), 1.25 * eps for fgsm-rs
    step_size: float = 0.0
    beta: float = 6.0  # trades: weight of the KL term (the authors' MNIST model: 1/lambda = 6)
    ramp_steps: int = 0  # eps grows linearly from 0 to eps over this many optimiser steps
    guard: GuardAction = "backoff"
    guard_every: int = 0  # optimiser steps between checks; 0: once an epoch
    guard_images: int = 500  # held-out images the check attacks
    guard_steps: int = 10  # PGD steps of the check
    guard_drop: float = 0.2  # collapse: check accuracy this far below the best one seen
    max_backoffs: int = 3  # after this many collapses, stop

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    def default_step_size(self) -> float:
        if self.step_size > 0:
            return self.step_size
        return 1.25 * self.eps if self.kind == "fgsm-rs" else 2.5 * self.eps / self.steps

    def eps_at(self, step: int) -> float:
        if self.ramp_steps <= 0 or step >= self.ramp_steps:
            return self.eps
        return self.eps * (step + 1) / self.ramp_steps

    def describe(self) -> str:
        """One line for manifests and logs, e.g. 'fgsm-rs eps 0.3 step 0.375'."""
        if not self.enabled:
            return ""
        steps = f" steps {self.steps}" if self.kind in ("pgd", "trades") else ""
        beta = f" beta {self.beta:g}" if self.kind == "trades" else ""
        ramp = f" ramp {self.ramp_steps}" if self.ramp_steps else ""
        return (
            f"{self.kind} eps {self.eps:g}{steps} step {self.default_step_size():.4g}{beta}{ramp}, "
            f"guard {self.guard} (PGD-{self.guard_steps} on {self.guard_images} held-out)"
        )


def served_loss(objective: Objective, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the served softmax against the true labels: (B, L), (B,) -> ()."""
    return F.cross_entropy(served_logits(objective, logits), target)


def linf_pgd(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    objective: Objective,
    eps: float,
    steps: int,
    step_size: float,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """L-inf PGD on the served loss, from a uniform random start: (B, C, H, W) -> same shape.

    One step with step_size 1.25 * eps and a random start is Wong et al.'s fast FGSM. The net's
    mode (train/eval) is left as the caller set it; gradients flow to the input only.
    """
    x = x.detach()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        delta = (2 * noise - 1) * eps
    else:
        delta = torch.zeros_like(x)
    delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
    for _ in range(steps):
        loss = served_loss(objective, net(x + delta), y)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta += step_size * grad.sign()
            delta.clamp_(-eps, eps)
            delta.copy_((x + delta).clamp(0, 1) - x)
    return (x + delta).detach()


def trades_kl(served_adv: torch.Tensor, served_clean: torch.Tensor) -> torch.Tensor:
    """KL(p_clean || p_adv) of the served softmaxes, summed over the batch: (B, L), (B, L) -> ()."""
    return F.kl_div(
        F.log_softmax(served_adv, dim=1), F.softmax(served_clean, dim=1), reduction="sum"
    )


def trades_attack(
    net: nn.Module,
    x: torch.Tensor,
    objective: Objective,
    eps: float,
    steps: int,
    step_size: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """TRADES' inner maximisation of the KL term: (B, C, H, W) -> same shape, within eps of x.

    Runs the net as the caller set it (TRADES: eval mode); the clean softmax is a constant."""
    x = x.detach()
    with torch.no_grad():
        served_clean = served_logits(objective, net(x))
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    x_adv = (x + 0.001 * noise).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = trades_kl(served_logits(objective, net(x_adv)), served_clean)
        (grad,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            x_adv = x_adv + step_size * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


@torch.no_grad()
def evaluate(net: nn.Module, ds: TensorData, objective: Objective, device: torch.device) -> float:
    """Accuracy of the served prediction argmax softmax(served logits)."""
    if len(ds) == 0:
        return float("nan")
    net.eval()
    correct = 0
    for i in range(0, len(ds), 500):
        x = ds.x[i : i + 500].to(device)
        pred = served_logits(objective, net(x)).argmax(dim=1).cpu()
        correct += int((pred == ds.y[i : i + 500]).sum())
    return correct / len(ds)


def robust_accuracy(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    objective: Objective,
    eps: float,
    steps: int,
    batch: int = 250,
    seed: int = 0,
) -> float:
    """Accuracy of the served argmax under PGD (random start, step 2.5 eps / steps), eval mode."""
    was_training = net.training
    net.eval()
    gen = torch.Generator().manual_seed(seed)
    correct = 0
    for i in range(0, len(x), batch):
        xb, yb = x[i : i + batch], y[i : i + batch]
        adv = linf_pgd(net, xb, yb, objective, eps, steps, 2.5 * eps / steps, True, gen)
        with torch.no_grad():
            correct += int((served_logits(objective, net(adv)).argmax(1) == yb).sum())
    net.train(was_training)
    return correct / max(len(x), 1)


class Adversary:
    """Makes each training batch adversarial and guards against catastrophic overfitting."""

    def __init__(self, cfg: AdversarialConfig, objective: Objective, seed: int) -> None:
        self.cfg, self.objective = cfg, objective
        self.step_size = cfg.default_step_size()
        self.best = -1.0  # best guard accuracy so far
        self.backoffs = 0
        self.stopped = False
        self.checks: list[dict[str, float]] = []
        self._good: dict[str, Any] | None = None  # net + optimiser state at the last good check
        self._gen = torch.Generator().manual_seed(seed + 7919)

    def _step_at(self, eps: float) -> float:
        """The attack's step at this eps: scaled down with eps while it ramps up."""
        return self.step_size * eps / self.cfg.eps if self.cfg.eps > 0 else 0.0

    def loss(
        self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The training loss of this batch and the logits of its adversarial images (B, L).

        PGD-AT and fast FGSM: the objective's loss on the adversarial batch. TRADES: the
        objective's loss on the clean batch + beta * KL(clean || adversarial) / B."""
        if self.cfg.kind != "trades":
            logits = net(self.perturb(net, x, y, step))
            return objective_loss(self.objective, logits, y), logits
        eps = self.cfg.eps_at(step)
        was_training = net.training
        net.eval()  # the authors attack in eval mode (no dropout noise in the KL gradient)
        x_adv = trades_attack(net, x, self.objective, eps, self.cfg.steps,
                              self._step_at(eps), self._gen)  # fmt: skip
        net.train(was_training)
        both = net(torch.cat([x, x_adv]))  # one pass: (2B, L)
        clean, adv = both[: len(x)], both[len(x) :]
        served_clean = served_logits(self.objective, clean)
        kl = trades_kl(served_logits(self.objective, adv), served_clean) / len(x)
        return objective_loss(self.objective, clean, y) + self.cfg.beta * kl, adv

    def perturb(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        """The batch PGD-AT or fast FGSM trains on this step (in the net's train mode)."""
        eps = self.cfg.eps_at(step)
        if self.cfg.kind == "fgsm-rs":
            return linf_pgd(net, x, y, self.objective, eps, 1, self._step_at(eps),
                            True, self._gen)  # fmt: skip
        step_size = self._step_at(eps)
        return linf_pgd(net, x, y, self.objective, eps, self.cfg.steps, step_size, True, self._gen)

    def check(
        self,
        net: nn.Module,
        opt: torch.optim.Optimizer,
        x_val: torch.Tensor,
        y_val: torch.Tensor,
        step: int,
    ) -> float:
        """PGD accuracy on held-out images; on a collapse, restore the last good weights and
        back off (a smaller FGSM step) or stop. Returns the measured accuracy.

        The check always attacks at the full eps, also while the training eps ramps up, so that
        every check is comparable with the best one (a collapse can happen mid-ramp: seen on
        MNIST, PGD accuracy 0.91 at eps 0.15 and 0.07 at eps 0.3 one epoch later, while the
        FGSM batches were still 88% right)."""
        cfg = self.cfg
        x, y = x_val[: cfg.guard_images], y_val[: cfg.guard_images]
        acc = robust_accuracy(net, x, y, self.objective, cfg.eps, cfg.guard_steps)
        record = {"step": float(step), "guard_pgd_accuracy": acc, "step_size": self.step_size}
        collapsed = cfg.guard != "off" and self.best >= 0 and acc < self.best - cfg.guard_drop
        if collapsed and self._good is not None:
            log.warning("robust accuracy collapsed at step %d: PGD-%d %.3f after %.3f; back to the "
                        "weights of step %d", step, cfg.guard_steps, acc, self.best,
                        self._good["step"])  # fmt: skip
            net.load_state_dict(self._good["model"])
            opt.load_state_dict(self._good["optimizer"])
            self.backoffs += 1
            record["collapsed"] = 1.0
            if cfg.guard == "stop" or self.backoffs > cfg.max_backoffs:
                self.stopped = True
            else:
                self.step_size /= 2
                log.warning("going on with FGSM step %.4g", self.step_size)
        else:
            self.best = max(self.best, acc)
            self._good = {
                "step": step,
                "model": copy.deepcopy(net.state_dict()),
                "optimizer": copy.deepcopy(opt.state_dict()),
            }
        self.checks.append(record)
        return acc

    def state_dict(self) -> dict[str, Any]:
        return {"step_size": self.step_size, "best": self.best, "backoffs": self.backoffs,
                "stopped": self.stopped, "generator": self._gen.get_state()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_size = float(state["step_size"])
        self.best = float(state["best"])
        self.backoffs = int(state["backoffs"])
        self.stopped = bool(state["stopped"])
        self._gen.set_state(state["generator"])
