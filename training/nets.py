"""Networks of the paper: pre-activation ResNet-(6n+2), the appendix simple CNNs, a 2x100 MLP.

Every network takes pixels in [0, 1]: input normalisation is its first layer. Each exposes
`features(x)` (the final hidden vector, used for t-SNE) and `forward(x)` (the logits Z).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Per-channel mean/std of the training sets; the normalisation is part of the graph.
NORM_STATS: dict[int, tuple[tuple[float, ...], tuple[float, ...]]] = {
    1: ((0.1307,), (0.3081,)),
    3: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}

ARCHITECTURES = ("resnet32", "resnet56", "resnet110", "cnn", "mlp")


class Normalize(nn.Module):
    """(x - mean) / std per channel, with constants stored as buffers (exported to ONNX)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        mean, std = NORM_STATS[channels]
        self.register_buffer("mean", torch.tensor(mean).view(1, channels, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@dataclass(frozen=True)
class ResNetConfig:
    depth: int = 32  # 6n + 2
    in_channels: int = 1
    num_classes: int = 10
    widths: tuple[int, int, int] = (16, 32, 64)


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 with an identity (or 1x1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + skip


class ResNet(nn.Module):
    """Pre-activation ResNet for 28x28x1 or 32x32x3 inputs (He et al. 2016, v2)."""

    def __init__(self, cfg: ResNetConfig) -> None:
        super().__init__()
        if (cfg.depth - 2) % 6 != 0:
            raise ValueError(f"ResNet depth must be 6n+2, got {cfg.depth}")
        n = (cfg.depth - 2) // 6
        self.cfg = cfg
        self.normalize = Normalize(cfg.in_channels)
        self.stem = nn.Conv2d(cfg.in_channels, cfg.widths[0], 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        c_in = cfg.widths[0]
        for stage, width in enumerate(cfg.widths):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(PreActBlock(c_in, width, stride))
                c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c_in)
        self.fc = nn.Linear(c_in, cfg.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, 16, H, W) -> (B, 64, H/4, W/4) -> (B, 64)
        out = self.blocks(self.stem(self.normalize(x)))
        out = torch.relu(self.bn(out))
        return out.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))  # (B, 64) -> (B, L)


@dataclass(frozen=True)
class SimpleCNNConfig:
    """Appendix Table 2: MNIST variant (32/64 filters, 200 units) or CIFAR-10's (64/128, 256)."""

    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    dropout: float = 0.5

    @property
    def filters(self) -> tuple[int, int]:
        return (32, 64) if self.in_channels == 1 else (64, 128)

    @property
    def hidden(self) -> int:
        return 200 if self.in_channels == 1 else 256


class SimpleCNN(nn.Module):
    """TRADES' SmallCNN: two 3x3 convs a block, ReLU, dropout; not the paper's Table 2 net."""

    def __init__(self, cfg: SimpleCNNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        f1, f2 = cfg.filters
        self.normalize = Normalize(cfg.in_channels)
        self.conv = nn.Sequential(
            nn.Conv2d(cfg.in_channels, f1, 3),
            nn.ReLU(),
            nn.Conv2d(f1, f1, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(f1, f2, 3),
            nn.ReLU(),
            nn.Conv2d(f2, f2, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = ((cfg.image_size - 4) // 2 - 4) // 2  # 28 -> 4, 32 -> 5
        self.mlp = nn.Sequential(
            nn.Flatten(),
            nn.Linear(f2 * side * side, cfg.hidden),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.hidden),
            nn.ReLU(),
        )
        self.fc = nn.Linear(cfg.hidden, cfg.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.conv(self.normalize(x)))  # (B, C, H, W) -> (B, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@dataclass(frozen=True)
class MLPConfig:
    in_features: int = 784
    in_channels: int = 1
    hidden: tuple[int, ...] = (100, 100)
    num_classes: int = 10


class MLP(nn.Module):
    """The fully connected 2x100 network of the BNN comparison (paper Fig. 7)."""

    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.normalize = Normalize(cfg.in_channels)
        layers: list[nn.Module] = [nn.Flatten()]
        width = cfg.in_features
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(width, cfg.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))  # (B, C, H, W) -> (B, 100)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def build_net(arch: str, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Build a network by name for inputs of shape (C, H, W)."""
    c, h, w = input_shape
    if arch.startswith("resnet"):
        depth = int(arch.removeprefix("resnet"))
        return ResNet(ResNetConfig(depth=depth, in_channels=c, num_classes=num_classes))
    if arch == "cnn":
        if h != w:
            raise ValueError(f"cnn expects square images, got {h}x{w}")
        return SimpleCNN(SimpleCNNConfig(in_channels=c, image_size=h, num_classes=num_classes))
    if arch == "mlp":
        return MLP(MLPConfig(in_features=c * h * w, in_channels=c, num_classes=num_classes))
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
