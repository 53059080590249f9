"""A plain PyTorch classifier for Fashion-MNIST, trained and exported without notsure's help.

Stands for "your own model": cross-entropy, its own loop, normalisation in the data pipeline
(so outside the exported graph: `notsure import --mean/--std` tells the service to apply it).
Writes into --out: fashion_cnn.onnx, classes.txt, heldout.npz (the first 8,000 test images, to
calibrate T on) and fresh.npz (the other 2,000, to check the refuse rate on).

    nice python docs/examples/fashion_cnn.py --out runs/fashion  # reads /usr/share/datasets
    notsure import runs/fashion/fashion_cnn.onnx --name fashion-cnn \
        --data runs/fashion/heldout.npz --mean 0.2860 --std 0.3530 \
        --classes runs/fashion/classes.txt

`--tiny` trains on a few hundred random images instead (what the test suite runs).
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
import torch
from torch import nn

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]  # fmt: skip
MEAN, STD = 0.2860, 0.3530  # of the Fashion-MNIST training pixels, scaled to [0, 1]
HELDOUT = 8000  # test images used for calibration; the rest stay fresh


def read_idx(path: Path) -> np.ndarray:
    """An MNIST-format (idx) file, gzipped or not, as a uint8 array."""
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def load(data: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28) uint8 images and (N,) labels of the train or t10k split."""
    return (read_idx(data / f"{split}-images-idx3-ubyte.gz"),
            read_idx(data / f"{split}-labels-idx1-ubyte.gz"))  # fmt: skip


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 16, 14, 14)
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, 7, 7)
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(),
                                  nn.Linear(128, 10))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, 1, 28, 28) normalised -> (B, 10) logits


def normalise(x: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> (N, 1, 28, 28) float, (x / 255 - MEAN) / STD."""
    return (torch.from_numpy(x).float()[:, None] / 255.0 - MEAN) / STD


def train(net: Net, x: np.ndarray, y: np.ndarray, steps: int, seed: int = 0) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = np.random.default_rng(seed)
    net.train()
    for step in range(steps):
        i = g.integers(0, len(x), 128)
        loss = nn.functional.cross_entropy(net(normalise(x[i])), torch.from_numpy(y[i]).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.3f}")  # noqa: T201
    net.eval()


def export(net: Net, path: Path) -> None:
    """ONNX with a dynamic batch axis; the graph takes normalised pixels (B, 1, 28, 28)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(
        net, (torch.zeros(2, 1, 28, 28),), input_names=["image"], output_names=["logits"],
        dynamic_shapes=({0: batch},), dynamo=True,
    )  # fmt: skip
    assert program is not None
    program.save(str(path), external_data=False)


def main(data: Path | None, out: Path, steps: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if data is None:  # --tiny: random images, a smoke run of the same steps
        g = np.random.default_rng(0)
        x_train, y_train = g.integers(0, 256, (512, 28, 28), np.uint8), g.integers(0, 10, 512)
        x_test, y_test = g.integers(0, 256, (400, 28, 28), np.uint8), g.integers(0, 10, 400)
    else:
        (x_train, y_train), (x_test, y_test) = load(data, "train"), load(data, "t10k")
    net = Net()
    train(net, x_train, y_train, steps)
    with torch.no_grad():
        acc = (net(normalise(x_test)).argmax(1).numpy() == y_test).mean()
    print(f"test accuracy {acc:.4f}")  # noqa: T201
    export(net, out / "fashion_cnn.onnx")
    (out / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    k = HELDOUT if data is not None else len(x_test) * 4 // 5
    np.savez(out / "heldout.npz", x=x_test[:k], y=y_test[:k])
    np.savez(out / "fresh.npz", x=x_test[k:], y=y_test[k:])


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, help="folder with Fashion-MNIST's idx files")
    p.add_argument("--out", type=Path, default=Path("runs/fashion"))
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--tiny", action="store_true", help="random data, 20 steps")
    a = p.parse_args()
    if a.tiny:
        main(None, a.out, 20)
    else:
        main(a.data or Path("/usr/share/datasets/fashion-mnist"), a.out, a.steps)
