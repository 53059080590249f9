"""Held-out images for calibrating an imported model: an ImageFolder tree or an `.npz`.

Images in a folder are decoded and resized by the service's own code (`service.imaging`), so
calibration sees each image exactly as the service will when it is uploaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from service.errors import InvalidInput
from service.imaging import ResizeMode, check_batch, decode, open_image
from training.progress import progress_bar

F32 = npt.NDArray[np.float32]
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
# Held-out photos may be large; the service's own limit is a setting, this is only a guard.
_MAX_PIXELS = 100_000_000


class HeldoutError(ValueError):
    """The held-out data cannot be read; the message says what to change."""


@dataclass(frozen=True)
class Heldout:
    """(N, C, H, W) float32 pixels in [0, 1], their labels when known, and the class names the
    folder tree gives (None for an `.npz` or a flat folder)."""

    x: F32
    y: npt.NDArray[np.int64] | None
    folder_classes: list[str] | None

    def __len__(self) -> int:
        return int(self.x.shape[0])


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _read_image(path: Path, shape: tuple[int, int, int], resize: ResizeMode) -> F32:
    try:
        img = open_image(path.read_bytes(), shape, path.name, resize=resize, max_pixels=_MAX_PIXELS)
        return decode(img, shape)
    except InvalidInput as exc:
        raise HeldoutError(f"{path}: {exc.message}; {exc.fix}") from exc


def load_folder(root: Path, shape: tuple[int, int, int], resize: ResizeMode) -> Heldout:
    """An ImageFolder tree (root/<class>/<image>, classes in sorted order, as torchvision's
    ImageFolder numbers them) or a flat folder of images (unlabelled)."""
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not subdirs:
        files = _images_in(root)
        if not files:
            raise HeldoutError(f"{root} holds no PNG or JPEG images and no class folders")
        x = np.stack([_read_image(p, shape, resize) for p in files])
        return Heldout(x, None, None)
    files = [(label, p) for label, sub in enumerate(subdirs) for p in _images_in(sub)]
    xs, ys = [], []
    with progress_bar("reading held-out images", len(files)) as bar:
        for label, p in files:
            xs.append(_read_image(p, shape, resize))
            ys.append(label)
            bar.advance()
    if not xs:
        raise HeldoutError(f"the class folders under {root} hold no PNG or JPEG images")
    return Heldout(np.stack(xs), np.asarray(ys, np.int64), [p.name for p in subdirs])


def load_npz(path: Path, shape: tuple[int, int, int]) -> Heldout:
    """`x`: (N, H, W) for one channel or (N, C, H, W), integers 0-255 or floats in [0, 1];
    `y` (N,) integer labels, optional."""
    with np.load(path, allow_pickle=False) as f:
        if "x" not in f:
            raise HeldoutError(f"{path} has no array named 'x' (it has {', '.join(f.files)})")
        raw, y = f["x"], f.get("y")
    try:
        x = check_batch(raw, shape, "x")
    except InvalidInput as exc:
        raise HeldoutError(f"{path}: {exc.message}; {exc.fix}") from exc
    if y is not None:
        y = np.asarray(y)
        if y.shape != (x.shape[0],) or y.dtype.kind not in "iu":
            raise HeldoutError(
                f"{path}: 'y' must hold one integer label per image, got {y.dtype} {y.shape} "
                f"for {x.shape[0]} images"
            )
        y = y.astype(np.int64)
    return Heldout(x, y, None)


def load_heldout(path: Path, shape: tuple[int, int, int], resize: ResizeMode) -> Heldout:
    """The held-out data at `path`, as the model's (C, H, W) input."""
    if path.is_dir():
        return load_folder(path, shape, resize)
    if path.suffix == ".npz" and path.is_file():
        return load_npz(path, shape)
    raise HeldoutError(
        f"{path} is neither a folder of images (one sub-folder per class, or none) nor an .npz"
    )
