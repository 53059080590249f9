"""K-density on the final hidden vector: the second detector of the RCE paper's NeurIPS version.

For an image with features f (the network's last hidden vector) and predicted class c,

    KD(f) = (1 / N) * sum_i exp(-||f - f_i||^2 / sigma^2),

the mean Gaussian kernel over N training features f_i of class c (the official code keeps
1,000 per class and uses sigma^2 = 0.1 / 0.26 for RCE, 1.0 / 0.26 for CE networks). A high
density means the image lies where the training images of its class lie. Computed in log space
(log-mean-exp) in float64, so that far-away images give a tiny density instead of 0 / 0.

This module is numpy only: the service scores with it, and the attack code imports it.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
Array = npt.NDArray[np.floating]

# sigma^2 of the official implementation, by training objective.
DEFAULT_SIGMA2 = {"rce": 0.1 / 0.26, "ce": 1.0 / 0.26}


@dataclass(frozen=True)
class KernelSet:
    """Training features per class, (L, N, D), and the kernel bandwidth sigma^2."""

    features: npt.NDArray[np.float32]
    sigma2: float

    def __post_init__(self) -> None:
        if self.features.ndim != 3 or self.features.shape[1] < 1:
            raise ValueError(
                f"kernel set must be (classes, per_class >= 1, dim), got {self.features.shape}"
            )
        if not self.sigma2 > 0:
            raise ValueError(f"sigma2 must be > 0, got {self.sigma2}")

    @property
    def num_classes(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[2])

    @cached_property
    def reference(self) -> tuple[F64, F64]:
        """The features in float64, (L, N, D), and their squared norms, (L, N): computed once,
        not per request (for a batch of one image they cost more than the distances)."""
        ref = self.features.astype(np.float64)
        return ref, (ref**2).sum(axis=2)


def read_kernel_array(raw: bytes) -> npt.NDArray[np.float32]:
    """A (L, N, D) little-endian float32 array from the bytes of a .npy file.

    Parsed by hand (numpy's header reader, then `frombuffer`) rather than with `np.load`: the
    service has no pickle-capable loader at all. ValueError when it is not such an array.
    """
    from numpy.lib import format as npy

    f = io.BytesIO(raw)
    try:
        version = npy.read_magic(f)
        read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
    except ValueError as exc:
        raise ValueError(f"not a .npy array: {exc}") from exc
    if dtype != np.dtype("<f4") or fortran or len(shape) != 3:
        raise ValueError(f"expected a C-ordered float32 (L, N, D) array, got {dtype} {shape}")
    count = int(np.prod(shape))
    data = raw[f.tell() :]
    if len(data) != 4 * count:
        raise ValueError(f"{len(data)} data bytes for shape {shape} ({4 * count} expected)")
    return np.frombuffer(data, dtype="<f4").reshape(shape).astype(np.float32)


def log_k_density(features: Array, labels: npt.NDArray[np.integer], kset: KernelSet) -> F64:
    """log KD for each of B images.

    Args:
        features: (B, D) final hidden vectors of the images.
        labels: (B,) the class whose kernel set each image is compared with (the predicted one
            at test time; an attacker may pass its target class).
        kset: the per-class training features and sigma^2.

    Returns:
        (B,) float64 log of the mean kernel value, <= 0.
    """
    f = np.asarray(features, dtype=np.float64)
    lab = np.asarray(labels, dtype=np.int64)
    if f.ndim != 2 or f.shape[1] != kset.dim or lab.shape != (f.shape[0],):
        raise ValueError(
            f"expected features (B, {kset.dim}) and labels (B,), got {f.shape} and {lab.shape}"
        )
    out = np.empty(f.shape[0], dtype=np.float64)
    n = kset.features.shape[1]
    refs, norms = kset.reference
    for c in np.unique(lab):  # one distance matrix per class present in the batch
        rows = lab == c
        ref = refs[int(c)]  # (N, D)
        # ||f - f_i||^2 = |f|^2 - 2 f.f_i + |f_i|^2, clipped at 0 against rounding.
        d2 = (f[rows] ** 2).sum(1)[:, None] - 2.0 * f[rows] @ ref.T + norms[int(c)][None, :]
        z = -np.maximum(d2, 0.0) / kset.sigma2  # (b, N)
        m = z.max(axis=1, keepdims=True)
        out[rows] = m[:, 0] + np.log(np.exp(z - m).sum(axis=1)) - math.log(n)
    return out


def k_density(features: Array, labels: npt.NDArray[np.integer], kset: KernelSet) -> F64:
    """KD in [0, 1] for each of B images: exp of `log_k_density`."""
    return np.exp(log_k_density(features, labels, kset))


def build_kernel_set(
    features: Array,
    labels: npt.NDArray[np.integer],
    num_classes: int,
    per_class: int,
    sigma2: float,
) -> KernelSet:
    """The first `per_class` feature vectors of each class, in order.

    Raises ValueError when a class has no example; classes with fewer than `per_class` are
    padded by repeating their examples (the mean kernel value is unchanged only for whole
    repetitions, so the caller should pass enough data; the tiny test sets are the exception).
    """
    f = np.asarray(features, dtype=np.float32)
    lab = np.asarray(labels, dtype=np.int64)
    out = np.empty((num_classes, per_class, f.shape[1]), dtype=np.float32)
    for c in range(num_classes):
        idx = np.flatnonzero(lab == c)
        if idx.size == 0:
            raise ValueError(f"class {c} has no training example to build its kernel set from")
        out[c] = f[np.resize(idx, per_class) if idx.size < per_class else idx[:per_class]]
    return KernelSet(features=out, sigma2=sigma2)
