"""What a model needs around its graph: normalisation before it, the output turned into the
vector fed to the softmax after it, a fixed batch filled, and the graph checked against the
manifest that says all this.

The models `notsure train` makes need none of it (pixels in [0, 1] in, logits out, any batch);
imported models (`notsure import`) declare theirs in the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from service.imaging import ResizeMode
from service.manifest import Manifest

F32 = npt.NDArray[np.float32]
Dim = int | str | None
# log(p) of a probability of 0 would be -inf; this floor keeps the scores finite (a class with
# p < 1e-30 is as good as impossible: its softmax share comes back as < 1e-30 too).
_LOG_FLOOR = np.float32(1e-30)


class GraphMismatch(ValueError):
    """The graph does not take or give what the manifest says; the message names the fix."""


@dataclass(frozen=True)
class ModelIO:
    """The manifest's view of the graph's input and output, applied on every run."""

    shape: tuple[int, int, int]  # (C, H, W) of one image, as the service delivers it
    mean: F32 | None = None  # (1, C, 1, 1), pixels in [0, 1] minus this, divided by std
    std: F32 | None = None
    probabilities: bool = False  # the graph ends in a softmax: feed log(p) to the scoring
    output_name: str | None = None  # None: the graph's first output
    batch_size: int | None = None  # the graph's fixed batch; None: any
    flat: bool = False  # the graph takes (B, C*H*W) rows, e.g. scikit-learn models

    @classmethod
    def of(cls, manifest: Manifest) -> ModelIO:
        norm = manifest.normalize
        c = manifest.input_shape[0]
        return cls(
            shape=manifest.input_shape,
            mean=None if norm is None else np.asarray(norm.mean, np.float32).reshape(1, c, 1, 1),
            std=None if norm is None else np.asarray(norm.std, np.float32).reshape(1, c, 1, 1),
            probabilities=manifest.output == "probabilities",
            output_name=manifest.output_name,
            batch_size=manifest.batch_size,
        )

    def graph_input(self, x: F32) -> F32:
        """(B, C, H, W) pixels in [0, 1] -> what the graph takes: normalised, flattened."""
        if self.mean is not None and self.std is not None:
            x = (x - self.mean) / self.std
        if self.flat:
            x = x.reshape(x.shape[0], -1)
        return np.ascontiguousarray(x, dtype=np.float32)

    def softmax_input(self, out: npt.NDArray[np.floating]) -> F32:
        """The graph's (B, L) output -> the vector fed to the softmax: log(p) for probabilities
        (softmax(log p) = p renormalised), the output itself for logits and negated logits."""
        y = np.asarray(out, dtype=np.float32)
        if self.probabilities:
            return np.log(np.maximum(y, _LOG_FLOOR))
        return y


def check_input(io: ModelIO, name: str, dims: tuple[Dim, ...], dtype: str) -> ModelIO:
    """The graph's input against the manifest; returns `io` knowing whether the graph takes
    flat rows. Raises GraphMismatch with the fix."""
    c, h, w = io.shape
    if dtype != "tensor(float)":
        raise GraphMismatch(
            f"graph input {name!r} is {dtype}, not float32; export it with a float32 input "
            "(skl2onnx: FloatTensorType)"
        )
    batch = dims[0] if dims else None
    fixed = batch if isinstance(batch, int) and batch > 0 else None
    if fixed != io.batch_size:
        raise GraphMismatch(
            f"graph input {name!r} has "
            + (f"a fixed batch of {fixed}" if fixed else "a dynamic batch axis")
            + f' but the manifest says batch_size {io.batch_size}; set "batch_size": '
            + (str(fixed) if fixed else "null")
            + " in the manifest (notsure import does it)"
        )
    if len(dims) == 2:  # flat rows: (B, C*H*W)
        want = c * h * w
        if isinstance(dims[1], int) and dims[1] != want:
            raise GraphMismatch(
                f"graph input {name!r} takes rows of {dims[1]} values, but the manifest's "
                f"input_shape {c}x{h}x{w} has {want}; set input_shape to match the graph"
            )
        return ModelIO(**{**io.__dict__, "flat": True})
    if len(dims) != 4:
        raise GraphMismatch(
            f"graph input {name!r} has shape {list(dims)}; an image classifier takes "
            "[batch, channels, height, width] (or [batch, pixels])"
        )
    for axis, got, want_dim in (("channels", dims[1], c), ("height", dims[2], h),
                                ("width", dims[3], w)):  # fmt: skip
        if isinstance(got, int) and got != want_dim:
            raise GraphMismatch(
                f"graph input {name!r} {list(dims)} does not match the manifest's input_shape "
                f"{c}x{h}x{w} ({axis} {got}, not {want_dim}); set input_shape to the graph's"
            )
    return io


def check_output(io: ModelIO, name: str, dims: tuple[Dim, ...], classes: int) -> None:
    """The graph's output against the manifest's class count; raises GraphMismatch."""
    if len(dims) != 2:
        raise GraphMismatch(
            f"graph output {name!r} has shape {list(dims)}; a classifier gives [batch, classes]"
            " (name another output in the manifest's output_name)"
        )
    if isinstance(dims[1], int) and dims[1] != classes:
        raise GraphMismatch(
            f"graph output {name!r} {list(dims)} does not have the manifest's {classes} classes;"
            " list one class name for each output"
        )


def padded_chunks(x: F32, size: int) -> list[F32]:
    """Split (B, ...) into chunks of exactly `size` rows, the last one padded with zeros."""
    chunks = []
    for i in range(0, x.shape[0], size):
        part = x[i : i + size]
        if part.shape[0] < size:
            pad = np.zeros((size - part.shape[0], *part.shape[1:]), part.dtype)
            part = np.concatenate([part, pad])
        chunks.append(part)
    return chunks


def upload_resize(manifest: Manifest, requested: bool) -> ResizeMode | Literal[False]:
    """How an upload of another size is resized for this model, or False to refuse it: the
    request asks ("resize": true), or the manifest resizes every upload."""
    return manifest.resize if requested or manifest.resize_by_default else False
