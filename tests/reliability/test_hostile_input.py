"""Hostile input: a corpus of malformed images and bodies, each answered with a 4xx that names
the field, and the pixel limit checked from the header before a single pixel is decoded."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.config import Settings
from service.main import create_app
from tests.reliability.conftest import RCE, pixels, v2_binary

PREDICT = f"/v1/models/{RCE}/predict"
INFER = f"/v2/models/{RCE}/infer"


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    return _encode(img, "PNG")


def _jpeg(img: Image.Image) -> bytes:
    return _encode(img, "JPEG")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height 8-bit gray pixels over a tiny IDAT: what a
    decompression bomb looks like before it is decoded."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + _chunk(b"IEND", b"")
    )


def zlib_bomb_png(side: int) -> bytes:
    """A real, valid side x side all-black PNG: a few KiB that decode to side^2 bytes."""
    return _png(Image.new("L", (side, side)))


GRAY = Image.fromarray((pixels(1)[0, 0] * 255).astype(np.uint8))  # 28x28, the model's size
CORPUS: dict[str, tuple[bytes, str]] = {
    # name: (file bytes, text the error must contain)
    "truncated_png": (_png(GRAY)[:60], "not a readable"),
    "truncated_jpeg": (_jpeg(GRAY)[: len(_jpeg(GRAY)) // 2], "not a readable"),
    "jpeg_header_only": (_jpeg(GRAY)[:2], "not a readable"),
    "png_bad_crc": (
        _png(GRAY)[:45] + bytes([_png(GRAY)[45] ^ 0xFF]) + _png(GRAY)[46:],
        "not a readable",
    ),  # a flipped byte inside IDAT
    "random_bytes": (np.random.default_rng(3).bytes(2048), "not a readable"),
    "empty": (b"", "not a readable"),
    "bomb_100000x100000": (png_declaring(100_000, 100_000), "decompression bomb"),
    "huge_5000x5000": (png_declaring(5_000, 5_000), "over the limit"),
    "zlib_bomb_3000x3000": (zlib_bomb_png(3_000), "expects 28x28"),
    "wrong_size_28x29": (_png(Image.new("L", (28, 29))), "expects 28x28"),
    "mode_16bit": (_png(Image.fromarray(np.full((28, 28), 40_000, np.uint16))), "mode I;16"),
    "gif": (_encode(GRAY, "GIF"), "format GIF"),
    "bmp": (_encode(GRAY, "BMP"), "format BMP"),
    "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="28" height="28"/>', "not a readable"),
}


@pytest.fixture
def settings(model_repo: Path) -> Settings:
    # A pixel limit below 5000x5000 and above 3000x3000, so both sides of it are exercised.
    return Settings(model_repository=model_repo, max_image_pixels=10_000_000)


def assert_client_error(r: Any, field: str, needle: str, repo: Path) -> None:
    """A 4xx in the house error format, naming the field, without traces or paths."""
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    body = r.json()
    assert needle in body["error"], body
    assert body["field"].startswith(field) and body["fix"], body
    assert "Traceback" not in r.text and str(repo) not in r.text


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_malformed_image_is_a_4xx_on_every_image_route(
    client: TestClient, model_repo: Path, name: str
) -> None:
    data, needle = CORPUS[name]
    good = base64.b64encode(_png(GRAY)).decode()
    bad = base64.b64encode(data).decode()
    r = client.post(PREDICT, json={"instances": [good, bad]})
    assert_client_error(r, "instances[1]", needle, model_repo)
    r = client.post(PREDICT, json={"instances": [{"b64": bad}]})
    assert_client_error(r, "instances[0].b64", needle, model_repo)
    if data:  # an empty upload has its own message
        r = client.post(f"{PREDICT}/files", files=[("files", ("x.png", data, "image/png"))])
        assert_client_error(r, "files[0]", needle, model_repo)
    # ...and the server still answers the next, good request.
    assert client.post(PREDICT, json={"instances": [good]}).status_code == 200


@pytest.mark.parametrize("mode", ["1", "P", "LA", "RGB", "RGBA", "CMYK"])
def test_8bit_modes_are_converted_to_the_same_gray_image(client: TestClient, mode: str) -> None:
    """Not malformed: an 8-bit image in another mode gives the answer of its grayscale form."""
    ref = GRAY.convert(mode).convert("L")  # what the model should see
    want = client.post(PREDICT, json={"instances": [(np.asarray(ref) / 255).tolist()]}).json()
    encode = _jpeg if mode == "CMYK" else _png
    got = client.post(
        PREDICT, json={"instances": [base64.b64encode(encode(GRAY.convert(mode))).decode()]}
    )
    assert got.status_code == 200, got.text
    if mode != "CMYK":  # lossless: exactly the same scores
        assert got.json()["predictions"] == want["predictions"]


def test_pixel_limit_is_checked_before_decoding(
    model_repo: Path, image_loads: list[tuple[int, int]]
) -> None:
    loads = image_loads
    settings = Settings(model_repository=model_repo, max_image_pixels=64 * 64)
    big = base64.b64encode(_png(Image.new("L", (65, 65)))).decode()  # one row over the limit
    with TestClient(create_app(settings)) as c:
        r = c.post(PREDICT, json={"instances": [big], "resize": True})
        assert r.status_code == 422 and "over the limit of 4096" in r.json()["error"]
        assert loads == []  # refused from the header
        ok = base64.b64encode(_png(Image.new("L", (64, 64)))).decode()
        assert c.post(PREDICT, json={"instances": [ok], "resize": True}).status_code == 200
        assert (64, 64) in loads  # the spy sees real decodes


def test_pillow_bomb_guard_fires_even_with_a_huge_configured_limit(model_repo: Path) -> None:
    settings = Settings(model_repository=model_repo, max_image_pixels=10**12)
    bomb = base64.b64encode(png_declaring(100_000, 100_000)).decode()
    with TestClient(create_app(settings)) as c:
        r = c.post(PREDICT, json={"instances": [bomb], "resize": True})
    assert r.status_code == 422 and "decompression bomb" in r.json()["error"]


NONFINITE = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"]


@pytest.mark.parametrize("token", NONFINITE)
def test_non_finite_pixels_are_refused_on_both_apis(client: TestClient, token: str) -> None:
    row = "[" + ",".join([token] + ["0.5"] * 27) + "]"
    raw = '{"instances": [[' + ",".join([row] * 28) + "]]}"
    r = client.post(PREDICT, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "NaN or infinite" in r.json()["error"], r.text
    data = "[" + ",".join([token] + ["0.5"] * 783) + "]"
    raw = (
        '{"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": '
        + data
        + "}]}"
    )
    r = client.post(INFER, content=raw, headers={"Content-Type": "application/json"})
    # 422 on the native API, 400 on the Open Inference Protocol's (as its spec and Triton)
    assert r.status_code == 400 and r.json()["field"].startswith("inputs[0]"), r.text


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_binary_tensors_are_400(client: TestClient, value: float) -> None:
    x = pixels(2)
    x[1, 0, 5, 5] = value
    body, headers = v2_binary(x)
    r = client.post(INFER, content=body, headers=headers)
    assert r.status_code == 400 and "NaN or infinite" in r.json()["error"]


@pytest.mark.parametrize("depth", [1_000, 100_000])
@pytest.mark.parametrize("shape", ["array", "object"])
def test_deeply_nested_json_is_a_4xx_in_the_error_format(
    client: TestClient, depth: int, shape: str
) -> None:
    open_, close = ("[", "]") if shape == "array" else ('{"a":', "}")
    nested = open_ * depth + "0" + close * depth
    for path, raw in [
        (PREDICT, '{"instances": [' + nested + "]}"),
        (PREDICT, '{"id": ' + nested + ', "instances": [[0]]}'),
        (
            INFER,
            '{"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", '
            '"data": ' + nested + "}]}",
        ),
    ]:
        r = client.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, (path, r.status_code, r.text)
        assert r.json()["error"] and r.json()["field"], r.text


@pytest.mark.parametrize(
    ("tensor", "needle"),
    [
        ({"shape": [100_000, 100_000, 100_000], "data": [0.5]}, "needs"),
        ({"shape": [2**62, 2**62], "data": [0.5]}, "needs"),
        ({"shape": [-1, 1, 28, 28], "data": [0.5]}, "invalid shape"),
        ({"shape": [1] * 9, "data": [0.5]}, "invalid shape"),
        ({"shape": [1, 1, 28, 28], "parameters": {"binary_data_size": 2**40}}, "does not match"),
    ],
)
def test_lying_v2_shapes_are_400_without_allocating(
    client: TestClient, tensor: dict[str, object], needle: str
) -> None:
    req = {"inputs": [{"name": "input", "datatype": "FP32", **tensor}]}
    r = client.post(INFER, content=json.dumps(req), headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and needle in r.json()["error"], r.text


def test_decoding_big_images_does_not_stall_other_requests(model_repo: Path) -> None:
    """A request of large (highly compressible) PNGs decodes in a worker thread: health probes
    sent meanwhile are answered at once, not after the decoding."""
    import threading
    import time

    import httpx

    from tests.conftest import LiveServer

    side = 4096
    b64 = base64.b64encode(_png(Image.new("L", (side, side)))).decode()
    body = {"instances": [b64] * 12, "resize": True}
    settings = Settings(model_repository=model_repo, models=[RCE], max_image_pixels=side * side)
    with LiveServer(settings) as server:
        done: dict[str, float] = {}

        def heavy() -> None:
            t0 = time.perf_counter()
            r = httpx.post(f"{server.url}/v1/models/{RCE}/predict", json=body, timeout=60)
            assert r.status_code == 200 and len(r.json()["predictions"]) == 12
            done["s"] = time.perf_counter() - t0

        worker = threading.Thread(target=heavy)
        worker.start()
        probes = []
        with httpx.Client(base_url=server.url, timeout=30) as c:
            time.sleep(0.05)  # the big request is being decoded by now
            while worker.is_alive():
                t0 = time.perf_counter()
                assert c.get("/v2/health/live").status_code == 200
                probes.append(time.perf_counter() - t0)
                time.sleep(0.02)
        worker.join()
    assert done["s"] > 0.3, done  # long enough for the probes to have overlapped it
    assert len(probes) >= 3 and max(probes) < 0.1, (done, probes)
