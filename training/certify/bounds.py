"""Interval bound propagation (IBP, Gowal et al. 2018) through the bundled networks.

For an image x and an L-inf radius eps, the box [max(x - eps, 0), min(x + eps, 1)] (pixels stay
in [0, 1]) is pushed through the network layer by layer; every layer maps a box to a box that
contains the image of every point of the input box. Affine layers (Normalize, Conv2d, Linear,
BatchNorm in eval mode) use the centre/radius form: centre' = W c + b, radius' = |W| r. Monotone
layers (ReLU, MaxPool2d, Flatten, Dropout in eval mode) map the two corners.

The last linear layer is not bounded on its own: the margins of the *served* logits
s = sign * (W h + b) (sign -1 for RCE, whose served logits are -Z) are bounded directly, with
the rows differenced first, s_c - s_j = sign * (W_c - W_j) h + sign * (b_c - b_j) (the
"elision" of Gowal et al., Sec. 3: tighter than differencing the logit bounds). A lower bound
above 0 for every j != c proves that every point of the ball is labelled c.

Everything here is differentiable in the weights, so the same code trains (see train.py) and is
exported to ONNX (see graph.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training.losses import Objective
from training.nets import MLP, Normalize, PreActBlock, ResNet, SimpleCNN

Box = tuple[torch.Tensor, torch.Tensor]  # (lower, upper), the same shape, lower <= upper


class UnsupportedLayer(TypeError):
    """A network holds a layer that interval bound propagation does not know."""


@dataclass(frozen=True)
class Bounds:
    """Bounds that hold for every point of the ball, on the served logits s."""

    margins: torch.Tensor  # (B, L, L): [b, c, j] is a lower bound of s_c - s_j; 0 on c == j
    lower: torch.Tensor  # (B, L): lower bound of each served logit
    upper: torch.Tensor  # (B, L): upper bound of each served logit

    def margin_of(self, label: torch.Tensor) -> torch.Tensor:
        """Lower bounds of s_y - s_j for the given class y of each image: (B,) -> (B, L)."""
        idx = label.view(-1, 1, 1).expand(-1, 1, self.margins.shape[2])
        return self.margins.gather(1, idx)[:, 0]

    def certified(self, label: torch.Tensor) -> torch.Tensor:
        """True where every point of the ball is labelled y (bool, (B,))."""
        m = self.margin_of(label)
        others = torch.ones_like(m, dtype=torch.bool).scatter(1, label.view(-1, 1), False)
        return torch.where(others, m, torch.full_like(m, float("inf"))).amin(1) > 0


def input_box(x: torch.Tensor, eps: float | torch.Tensor) -> Box:
    """The L-inf ball of radius eps around x, cut to the pixel range [0, 1].

    eps is a number or a tensor with one radius per image, shape (B,)."""
    if isinstance(eps, torch.Tensor):
        eps = eps.reshape(-1, *([1] * (x.dim() - 1)))  # (B,) -> (B, 1, 1, 1)
    return (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)


# Affine layers take u + l and u - l (twice the centre and the radius) and halve the weights
# instead: W/2 and |W|/2 are constants that onnxruntime folds once, which saves two divisions a
# layer in the exported graph. Halving is exact in floating point.


def _conv(m: nn.Conv2d, box: Box) -> Box:
    lower, upper = box
    centre = F.conv2d(upper + lower, m.weight * 0.5, m.bias, m.stride, m.padding, m.dilation,
                      m.groups)  # fmt: skip
    radius = F.conv2d(upper - lower, m.weight.abs() * 0.5, None, m.stride, m.padding,
                      m.dilation, m.groups)  # fmt: skip
    return centre - radius, centre + radius


def _linear(m: nn.Linear, box: Box) -> Box:
    lower, upper = box
    centre = F.linear(upper + lower, m.weight * 0.5, m.bias)
    radius = F.linear(upper - lower, m.weight.abs() * 0.5)
    return centre - radius, centre + radius


def _batchnorm(m: nn.BatchNorm2d, box: Box) -> Box:
    """BN in eval mode is a per-channel affine map y = scale * x + shift (scale may be < 0)."""
    if m.training or m.running_var is None or m.running_mean is None:
        raise UnsupportedLayer(
            "BatchNorm in training mode normalises with the batch's own statistics, which no "
            "box bounds; call net.eval() before computing bounds"
        )
    scale = m.running_var.add(m.eps).rsqrt()
    if m.weight is not None:
        scale = scale * m.weight
    shift = -m.running_mean * scale
    if m.bias is not None:
        shift = shift + m.bias
    lower, upper = box
    centre, radius = (upper + lower) / 2, (upper - lower) / 2
    c = centre * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    r = radius * scale.abs().view(1, -1, 1, 1)
    return c - r, c + r


def _dropout(m: nn.Dropout, box: Box) -> Box:
    """Identity in eval mode; in training one mask (scaled by 1/(1-p)) for both corners."""
    lower, upper = box
    if not m.training or m.p == 0:
        return box
    mask = F.dropout(torch.ones_like(lower), m.p, training=True)
    return lower * mask, upper * mask


def _preact_block(m: PreActBlock, box: Box) -> Box:
    out = propagate(m.bn1, box)
    out = (out[0].relu(), out[1].relu())
    skip = propagate(m.shortcut, out) if m.shortcut is not None else box
    out = propagate(m.conv1, out)
    out = propagate(m.bn2, out)
    out = propagate(m.conv2, (out[0].relu(), out[1].relu()))
    return out[0] + skip[0], out[1] + skip[1]


def propagate(module: nn.Module, box: Box) -> Box:
    """Bounds of module(x) for every x in the box."""
    lower, upper = box
    if isinstance(module, nn.Sequential):
        for child in module:
            box = propagate(child, box)
        return box
    if isinstance(module, Normalize):
        return module(lower), module(upper)  # std > 0: monotone increasing
    if isinstance(module, nn.Conv2d):
        return _conv(module, box)
    if isinstance(module, nn.Linear):
        return _linear(module, box)
    if isinstance(module, nn.BatchNorm2d):
        return _batchnorm(module, box)
    if isinstance(module, (nn.ReLU, nn.MaxPool2d, nn.Flatten)):
        return module(lower), module(upper)  # monotone increasing
    if isinstance(module, nn.Dropout):
        return _dropout(module, box)
    if isinstance(module, PreActBlock):
        return _preact_block(module, box)
    raise UnsupportedLayer(
        f"interval bounds through {type(module).__name__} are not implemented; supported: "
        "Normalize, Conv2d, Linear, BatchNorm2d (eval), ReLU, MaxPool2d, Flatten, Dropout, "
        "and the pre-activation ResNet block"
    )


def feature_box(net: nn.Module, box: Box) -> Box:
    """Bounds of net.features(x), the input of the last linear layer: (B, C, H, W) -> (B, D)."""
    if isinstance(net, SimpleCNN):
        return propagate(nn.Sequential(net.normalize, net.conv, net.mlp), box)
    if isinstance(net, MLP):
        return propagate(nn.Sequential(net.normalize, net.body), box)
    if isinstance(net, ResNet):
        lower, upper = propagate(nn.Sequential(net.normalize, net.stem, net.blocks, net.bn), box)
        # ReLU then the global average pool: both monotone. (B, C, h, w) -> (B, C)
        return lower.relu().mean(dim=(2, 3)), upper.relu().mean(dim=(2, 3))
    raise UnsupportedLayer(
        f"no interval bounds for {type(net).__name__}; supported: cnn, mlp, resnet*"
    )


def served_sign(objective: Objective) -> float:
    """The service feeds -Z to the softmax for RCE nets, Z for CE nets (training.losses)."""
    return -1.0 if objective == "rce" else 1.0


def head_bounds(fc: nn.Linear, box: Box, sign: float) -> Bounds:
    """Margin and logit bounds of the served logits s = sign * (W h + b) over the box of h."""
    lower, upper = box
    centre2, radius2 = upper + lower, upper - lower  # (B, D), twice the centre and radius
    weight, bias = fc.weight, fc.bias  # (L, D), (L,)
    n = weight.shape[0]
    # Rows differenced before the interval step: (L, 1, D) - (1, L, D) -> (L*L, D)
    diff_w = (sign * 0.5 * (weight[:, None, :] - weight[None, :, :])).reshape(n * n, -1)
    diff_b = (sign * (bias[:, None] - bias[None, :])).reshape(n * n)
    margins = centre2 @ diff_w.T + diff_b - radius2 @ diff_w.abs().T  # (B, L*L)
    half = weight * 0.5
    z_centre, z_radius = centre2 @ half.T + bias, radius2 @ half.abs().T  # (B, L)
    s_centre = sign * z_centre
    return Bounds(
        margins=margins.reshape(-1, n, n), lower=s_centre - z_radius, upper=s_centre + z_radius
    )


def interval_bounds(net: nn.Module, box: Box, objective: Objective) -> Bounds:
    """IBP bounds of the served logits of net over an input box."""
    fc = net.fc
    if not isinstance(fc, nn.Linear):
        raise UnsupportedLayer(f"the last layer must be nn.Linear, got {type(fc).__name__}")
    return head_bounds(fc, feature_box(net, box), served_sign(objective))


def ibp(net: nn.Module, x: torch.Tensor, eps: float | torch.Tensor, objective: Objective) -> Bounds:
    """IBP bounds of the served logits over the L-inf ball of radius eps around x (in [0, 1])."""
    return interval_bounds(net, input_box(x, eps), objective)


class BoundNet(nn.Module):
    """(x, eps) -> (margins, lower, upper): what the exported certificate graph computes."""

    def __init__(self, net: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.net, self.objective = net, objective

    def forward(
        self, x: torch.Tensor, eps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = ibp(self.net, x, eps, self.objective)  # x (B, C, H, W), eps (B,)
        return b.margins, b.lower, b.upper  # (B, L, L), (B, L), (B, L)
