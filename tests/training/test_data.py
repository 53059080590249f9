"""Data loaders on small files in the official formats (no ../shared needed)."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from training import data


def write_cifar(folder: Path, n: int = 20) -> np.ndarray:
    """A tiny cifar-10-batches-py/ in the python pickle format of the real release."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    first = None
    for name in data.CIFAR10_FILES:
        if name == "batches.meta":
            meta = {"label_names": data.CLASS_NAMES["cifar10"], "num_cases_per_batch": n}
            (folder / name).write_bytes(pickle.dumps(meta))
            continue
        pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        first = pixels if first is None else first
        batch = {
            b"batch_label": name.encode(),
            b"labels": list(range(10)) * (n // 10),
            b"data": pixels,
            b"filenames": [b"x.png"] * n,
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    assert first is not None
    return first


def test_cifar10_loader_reads_the_pickle_format(tmp_path: Path) -> None:
    first = write_cifar(tmp_path / "cifar-10-batches-py")
    train = data.load("cifar10", tmp_path, train=True)
    test = data.load("cifar10", tmp_path, train=False)
    assert train.x.shape == (100, 3, 32, 32) and test.x.shape == (20, 3, 32, 32)
    # Row-major 3072 = 3 planes of 32x32 (R, G, B), scaled to [0, 1].
    assert torch.allclose(train.x[0, 1, 0, :5], torch.tensor(first[0, 1024:1029] / 255.0).float())
    assert train.y[:10].tolist() == list(range(10))
    assert train.classes[0] == "airplane"


def test_cifar10_loader_refuses_arbitrary_pickles(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar-10-batches-py")

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))

    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(pickle.dumps({"data": Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        data.load("cifar10", tmp_path, train=True)


def write_idx(folder: Path, prefix: str, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    imgs = np.arange(n * 784, dtype=np.uint32).astype(np.uint8).reshape(n, 28, 28)
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, 28, 28) + imgs.tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, n) + bytes([i % 10 for i in range(n)]))


def test_mnist_idx_gz_from_a_read_only_folder(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    write_idx(raw, "train", 30)
    write_idx(raw, "t10k", 10)
    raw.chmod(0o555)
    try:
        splits = data.load_splits("mnist", tmp_path, val_size=5, seed=0)
    finally:
        raw.chmod(0o755)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (25, 5, 10)
    assert splits.test.x.shape == (10, 1, 28, 28)
    assert splits.test.x[0, 0, 0, 1].item() == pytest.approx(1 / 255)
    assert splits.test.y.tolist() == [i % 10 for i in range(10)]
    # train and val partition the training files
    assert sorted(splits.train.y.tolist() + splits.val.y.tolist()) == sorted(
        [i % 10 for i in range(30)]
    )


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("mnist", "MNIST/raw"),
        ("cifar10", "cifar-10-batches-py"),
    ],
)
def test_missing_dataset_says_where_to_put_it(tmp_path: Path, name: str, needle: str) -> None:
    with pytest.raises(data.DatasetMissing, match=needle):
        data.load(name, tmp_path, train=True)


def test_augment_crops_and_flips_but_keeps_shape() -> None:
    x = torch.rand(64, 3, 32, 32)
    out = data.augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert not torch.equal(out, x)
    # Every output is a padded shift of its input, possibly mirrored: same multiset of values
    # wherever no padding shows, so the max never grows.
    assert out.max() <= x.max()
