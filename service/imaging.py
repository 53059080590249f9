"""Turn request instances (encoded images, pixel arrays) into model input tensors.

Every failure is an InvalidInput that names the field and says what to send instead. The pixel
limit is checked from the image header, before any pixel is decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

from service.errors import InvalidInput

F32 = npt.NDArray[np.float32]
Shape = tuple[int, int, int]
# How an image of another size becomes the model's H x W (the manifest's `resize`).
ResizeMode = Literal["stretch", "center_crop"]
# ImageNet's evaluation transform: shorter side to H / 0.875 (256 for 224), centre crop H x W.
CROP_FRACTION = 0.875
# Modes whose convert("L"/"RGB") keeps the picture. Pillow converts 16/32-bit ("I;16", "I", "F")
# by clipping at 255, not scaling, so a 16-bit PNG would be classified as a white square.
_8BIT_MODES = frozenset(
    {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"}
)


def describe(shape: Shape) -> str:
    c, h, w = shape
    return f"{c}x{h}x{w} float32 in [0, 1] (or {h}x{w} for one channel), or integers 0-255"


def _b64decode(text: str, field: str) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(
            "not valid base64", field=field, fix="send the file bytes base64-encoded (RFC 4648)"
        ) from exc


@dataclass(frozen=True, slots=True)
class EncodedImage:
    """A PNG/JPEG whose header has been read and checked (pixel limit, format, size, mode);
    its pixels are not decoded yet (`decode`)."""

    img: Image.Image
    field: str  # where the request carried it, for the errors of the decode
    resize_mode: ResizeMode = "stretch"  # how `decode` resizes it when its size differs

    @property
    def pixels(self) -> int:
        """Width x height, as the header declares."""
        return int(self.img.width * self.img.height)


@contextmanager
def _pillow_errors(field: str, shape: Shape) -> Iterator[None]:
    """Pillow's failures while opening or decoding an image, as InvalidInput for `field`."""
    _, h, w = shape
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except InvalidInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's guard in Image.open fired before our limit (over 2x Image.MAX_IMAGE_PIXELS).
        raise InvalidInput(
            "image declares more pixels than allowed (decompression bomb guard)",
            field=field,
            fix=f"send a {w}x{h} image",
        ) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InvalidInput(
            "not a readable PNG or JPEG image",
            field=field,
            fix="send a complete PNG or JPEG file, base64-encoded",
        ) from exc


def open_image(
    data: bytes, shape: Shape, field: str, *, resize: bool | ResizeMode, max_pixels: int
) -> EncodedImage:
    """PNG/JPEG bytes, opened and checked from the header for a model of input shape (C, H, W):
    a huge, foreign or wrongly sized image is refused before any pixel is decoded. `resize`:
    False refuses another size; True or a mode resizes it (True: stretch)."""
    _, h, w = shape
    with _pillow_errors(field, shape):
        img: Image.Image = Image.open(io.BytesIO(data))  # reads the header only
        if img.width * img.height > max_pixels:
            raise InvalidInput(
                f"image is {img.width}x{img.height} pixels, over the limit of {max_pixels}",
                field=field,
                fix=f"send a {w}x{h} image",
            )
        if img.format not in ("PNG", "JPEG"):
            raise InvalidInput(
                f"unsupported image format {img.format}", field=field, fix="send PNG or JPEG"
            )
        if img.size != (w, h) and not resize:  # refused from the header, never decoded
            raise InvalidInput(
                f"image is {img.width}x{img.height}, the model expects {w}x{h}",
                field=field,
                fix=f'send {w}x{h} images, or set "resize": true to resize them',
            )
        if img.mode not in _8BIT_MODES:
            raise InvalidInput(
                f"image mode {img.mode} is not supported",
                field=field,
                fix="send an 8-bit grayscale or RGB image",
            )
    return EncodedImage(img, field, resize if isinstance(resize, str) else "stretch")


def decode(image: EncodedImage, shape: Shape) -> F32:
    """An opened image's pixels -> (C, H, W) float32 in [0, 1], resized when it was allowed
    to differ in size."""
    c, h, w = shape
    with _pillow_errors(image.field, shape):
        img = image.img.convert("L" if c == 1 else "RGB")
    if img.size != (w, h):
        img = resized(img, (h, w), image.resize_mode)
    arr = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    out: F32 = arr[None] if c == 1 else np.ascontiguousarray(arr.transpose(2, 0, 1))
    return out


def resized(img: Image.Image, size: tuple[int, int], mode: ResizeMode) -> Image.Image:
    """The image at size (H, W): stretched, or its shorter side scaled to H / CROP_FRACTION
    (W for a wide model) and the centre cut out, as ImageNet models are evaluated."""
    h, w = size
    if mode == "stretch":
        return img.resize((w, h), Image.Resampling.BILINEAR)
    scale = max(h / img.height, w / img.width) / CROP_FRACTION
    sw, sh = max(w, round(img.width * scale)), max(h, round(img.height * scale))
    img = img.resize((sw, sh), Image.Resampling.BILINEAR)
    left, top = (sw - w) // 2, (sh - h) // 2
    return img.crop((left, top, left + w, top + h))


def pixels_to_tensor(values: Any, shape: Shape, field: str) -> F32:
    """A nested list (HxW or CxHxW) -> (C, H, W) float32 in [0, 1]."""
    try:
        arr = np.asarray(values)
    except (ValueError, TypeError) as exc:
        raise InvalidInput("pixel array is ragged", field=field, fix=describe(shape)) from exc
    return check_pixels(arr, shape, field)


def check_pixels(arr: npt.NDArray[Any], shape: Shape, field: str) -> F32:
    """Validate one image array (HxW or CxHxW) and scale it to (C, H, W) float32 in [0, 1]."""
    got = "x".join(map(str, arr.shape))
    if arr.ndim == 2 and shape[0] == 1:
        arr = arr[None]
    if arr.shape != shape:
        c, h, w = shape
        raise InvalidInput(f"expected {c}x{h}x{w}, got {got}", field=field, fix=describe(shape))
    one: F32 = check_batch(arr[None], shape, field)[0]
    return one


def check_batch(arr: npt.NDArray[Any], shape: Shape, field: str) -> F32:
    """Validate a batch (B, C, H, W) (or (B, H, W) for one channel) -> (B, C, H, W) float32."""
    c, h, w = shape
    if arr.dtype.kind not in "iuf" or arr.dtype == np.bool_:
        raise InvalidInput(
            f"pixel array has non-numeric values ({arr.dtype})", field=field, fix=describe(shape)
        )
    if arr.ndim == 3 and c == 1:
        arr = arr[:, None]
    if arr.ndim != 4 or arr.shape[1:] != shape:
        got = "x".join(map(str, arr.shape))
        raise InvalidInput(f"expected Bx{c}x{h}x{w}, got {got}", field=field, fix=describe(shape))
    if arr.size == 0:
        raise InvalidInput("empty batch", field=field, fix="send at least one image")
    if arr.dtype.kind in "iu":
        if arr.min() < 0 or arr.max() > 255:
            raise InvalidInput("integer pixels must be in 0-255", field=field, fix=describe(shape))
        return arr.astype(np.float32) / np.float32(255.0)
    out = arr.astype(np.float32, copy=False)
    lo, hi = float(out.min()), float(out.max())  # NaN propagates into min/max
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise InvalidInput(
            "pixel array has NaN or infinite values", field=field, fix=describe(shape)
        )
    if lo < 0.0 or hi > 1.0:
        raise InvalidInput(
            f"float pixels must be in [0, 1], got [{lo:.4g}, {hi:.4g}]",
            field=field,
            fix=describe(shape),
        )
    return out


def open_instance(
    instance: object, shape: Shape, field: str, *, resize: bool | ResizeMode, max_pixels: int
) -> EncodedImage | F32:
    """One native-API instance: a base64 image (a string or {'b64': ...}) opened and checked
    from its header, or a pixel list as (C, H, W) float32."""
    if isinstance(instance, str):
        return open_image(
            _b64decode(instance, field), shape, field, resize=resize, max_pixels=max_pixels
        )
    b64 = getattr(instance, "b64", None)
    if isinstance(b64, str):
        where = f"{field}.b64"
        return open_image(
            _b64decode(b64, where), shape, where, resize=resize, max_pixels=max_pixels
        )
    if isinstance(instance, list):
        return pixels_to_tensor(instance, shape, field)
    raise InvalidInput("unsupported instance type", field=field, fix=describe(shape))


def batch_bytes(shape: Shape, n: int) -> int:
    return n * math.prod(shape) * 4
