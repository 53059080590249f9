"""Data sets as in-memory tensors: MNIST, Fashion-MNIST, CIFAR-10 and a tiny synthetic set.

Images are float32 in [0, 1], shape (N, C, H, W); labels int64 (N,). Nothing is downloaded:
a missing data set is an error that says which files to put where.
"""

from __future__ import annotations

import gzip
import io
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATASETS = ("mnist", "fashion-mnist", "cifar10", "synthetic")

MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
# Debian's dataset-fashion-mnist package installs the four official files here.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")

CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "fashion-mnist": [
        "t-shirt/top",
        "trouser",
        "pullover",
        "dress",
        "coat",
        "sandal",
        "shirt",
        "sneaker",
        "bag",
        "ankle boot",
    ],
    "cifar10": [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ],
    "synthetic": [f"class{i}" for i in range(10)],
}


class DatasetMissing(FileNotFoundError):
    """A data set's files are not where they were looked for."""


@dataclass(frozen=True)
class TensorData:
    x: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    y: torch.Tensor  # (N,) int64
    classes: tuple[str, ...]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x.shape[1:]
        return (int(c), int(h), int(w))

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx: torch.Tensor | slice) -> TensorData:
        return TensorData(self.x[idx], self.y[idx], self.classes)


@dataclass(frozen=True)
class Splits:
    train: TensorData
    val: TensorData  # held out from the training files, for choosing the threshold
    test: TensorData


def _idx_dir(name: str, data_dir: Path) -> Path:
    folder = data_dir / ("MNIST" if name == "mnist" else "FashionMNIST") / "raw"
    if all((folder / f).exists() or (folder / f[:-3]).exists() for f in MNIST_FILES):
        return folder
    if name == "fashion-mnist" and all((DEBIAN_FASHION_MNIST / f).exists() for f in MNIST_FILES):
        return DEBIAN_FASHION_MNIST
    hint = "apt-get install dataset-fashion-mnist, or " if name == "fashion-mnist" else ""
    raise DatasetMissing(
        f"{name} not found: {hint}place {', '.join(MNIST_FILES)} in {folder}/ "
        "(torchvision's layout; this machine cannot download them)"
    )


def _load_idx(name: str, data_dir: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the official IDX files with torchvision's readers, from .gz or extracted files.

    torchvision's own MNIST class insists on extracting next to the archives, which fails on a
    read-only folder, so the archives are decompressed into a temporary buffer instead.
    """
    from torchvision.datasets.mnist import read_image_file, read_label_file

    folder = _idx_dir(name, data_dir)
    prefix = "train" if train else "t10k"
    out = []
    for kind, reader in (("images-idx3", read_image_file), ("labels-idx1", read_label_file)):
        plain = folder / f"{prefix}-{kind}-ubyte"
        if plain.exists():
            out.append(reader(str(plain)))
            continue
        import tempfile

        with tempfile.NamedTemporaryFile(suffix="-ubyte") as tmp:
            with gzip.open(folder / f"{prefix}-{kind}-ubyte.gz", "rb") as src:
                shutil.copyfileobj(src, tmp)
            tmp.flush()
            out.append(reader(tmp.name))
    images, labels = out
    return images[:, None].float().div_(255.0), labels.long()  # (N, 28, 28) -> (N, 1, 28, 28)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR-10 python batches contain: dicts, lists, numpy arrays."""

    _ALLOWED: frozenset[tuple[str, str]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # protocol-2 pickles rebuild bytes with it (str -> bytes only)
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _read_cifar_batch(path: Path) -> dict[str, object]:
    raw = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    # Python 2 pickles (the official release) give str keys under latin1; bytes keys also occur.
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in raw.items()}


def _load_cifar10(data_dir: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    folder = data_dir / "cifar-10-batches-py"
    missing = [f for f in CIFAR10_FILES if not (folder / f).exists()]
    if missing:
        raise DatasetMissing(
            f"cifar10 not found: place the python version of CIFAR-10 ({', '.join(CIFAR10_FILES)})"
            f" in {folder}/; missing {', '.join(missing)}"
        )
    names = CIFAR10_FILES[:5] if train else ("test_batch",)
    xs, ys = [], []
    for n in names:
        batch = _read_cifar_batch(folder / n)
        xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch["labels"], dtype=np.int64))
    x = torch.from_numpy(np.concatenate(xs)).float().div_(255.0)
    return x, torch.from_numpy(np.concatenate(ys))


def synthetic(n: int, seed: int = 0, shape: tuple[int, int, int] = (1, 28, 28)) -> TensorData:
    """A learnable toy set: class k is a bright horizontal band at row block k, plus noise."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.rand((n, c, h, w), generator=g) * 0.3
    band = max(h // 10, 1)
    for k in range(10):
        rows = slice(k * band, (k + 1) * band)
        x[y == k, :, rows, :] += 0.7
    return TensorData(x.clamp_(0.0, 1.0), y, tuple(CLASS_NAMES["synthetic"]))


def load(name: str, data_dir: Path, train: bool) -> TensorData:
    """One split of a data set as tensors."""
    if name in ("mnist", "fashion-mnist"):
        x, y = _load_idx(name, data_dir, train)
    elif name == "cifar10":
        x, y = _load_cifar10(data_dir, train)
    elif name == "synthetic":
        return synthetic(512 if train else 256, seed=0 if train else 1)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return TensorData(x, y, tuple(CLASS_NAMES[name]))


def load_splits(name: str, data_dir: Path, val_size: int, seed: int = 0) -> Splits:
    """Train/val/test; val is a seeded random subset of the training files, held out."""
    full = load(name, data_dir, train=True)
    if not 0 <= val_size < len(full):
        raise ValueError(f"val_size must be in [0, {len(full)}), got {val_size}")
    perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))
    return Splits(
        train=full.subset(perm[val_size:]),
        val=full.subset(perm[:val_size]),
        test=load(name, data_dir, train=False),
    )


def run_splits(name: str, data_dir: Path, val_size: int, seed: int, dry_run: bool) -> Splits:
    """The splits a training run uses; calibration calls it with the run's settings, so T is
    chosen on exactly the images the run held out."""
    if dry_run or name == "synthetic":
        return Splits(
            synthetic(512, seed=seed), synthetic(128, seed=seed + 1), synthetic(256, seed=seed + 2)
        )
    return load_splits(name, data_dir, val_size, seed=seed)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """CIFAR-10 augmentation on a batch: random crop with 4-pixel padding, horizontal flip."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (b,), generator=generator)
    dx = torch.randint(0, 9, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]  # (B, 1, 1, W)
    batch_idx = torch.arange(b)[:, None, None, None]
    chan_idx = torch.arange(x.shape[1])[None, :, None, None]
    out = padded[batch_idx, chan_idx, rows, cols]
    flip = torch.rand(b, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out
