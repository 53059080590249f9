"""The page at /ui in a real browser (Debian's chromium via Playwright) against a live service
on the bundled models: what it shows is checked against what the service answers to the same
input sent by httpx."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Route, expect

from tests.conftest import LiveServer
from tests.ui.conftest import DEFAULT, Page, open_page, serve

pytestmark = pytest.mark.integration

DIGIT = Path("docs/examples/digit.png")
SCREENSHOT = Path("docs/ui.png")


def by(tab: Page, testid: str):  # type: ignore[no-untyped-def]
    return tab.page.get_by_test_id(testid)


def upload(tab: Page, name: str, data: bytes, mime: str = "image/png") -> None:
    by(tab, "file-input").set_input_files({"name": name, "mimeType": mime, "buffer": data})


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def service_answer(server: LiveServer, model: str, name: str, data: bytes) -> httpx.Response:
    """What the service answers to the same file, asked directly."""
    return httpx.post(
        f"{server.url}/v1/models/{model}/predict/files",
        params={"resize": "true"},
        files={"files": (name, data)},
        timeout=30,
    )


def mnist_reference(intensity: np.ndarray) -> np.ndarray:
    """MNIST's preprocessing in numpy: bounding box, area-averaged to fit 20x20 (aspect kept),
    placed in 28x28 so that the centre of mass lands on pixel (14, 14), rounded."""
    ys, xs = np.nonzero(intensity > 0)
    crop = intensity[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = crop.shape
    scale = 20 / max(h, w)
    oh, ow = max(1, round(h * scale)), max(1, round(w * scale))

    def weights(n: int, m: int) -> np.ndarray:  # (n, m): overlap of output and source pixels
        lo = np.arange(n)[:, None] * m / n
        src = np.arange(m)[None, :]
        overlap = np.clip(np.minimum(lo + m / n, src + 1) - np.maximum(lo, src), 0, None)
        return overlap / (m / n)

    box = weights(oh, h) @ crop @ weights(ow, w).T
    jj, ii = np.indices(box.shape)
    dy = round(14 - (jj * box).sum() / box.sum())
    dx = round(14 - (ii * box).sum() / box.sum())
    out = np.zeros((28, 28))
    out[dy : dy + oh, dx : dx + ow] = np.minimum(box, 1)  # the test stroke stays inside
    return out


# --- answers ---------------------------------------------------------------------------------


def test_the_test_digit_is_answered_7_and_the_page_is_photographed(
    tab: Page, server: LiveServer
) -> None:
    expect(by(tab, "model-select")).to_have_value(DEFAULT)
    upload(tab, "digit.png", DIGIT.read_bytes())
    expect(by(tab, "result-decision")).to_have_text("accepted")
    expect(by(tab, "result-label")).to_have_text("7")
    direct = service_answer(server, DEFAULT, "digit.png", DIGIT.read_bytes()).json()
    shown = float(by(tab, "result-score").inner_text())
    assert shown == pytest.approx(direct["predictions"][0]["score"], rel=1e-3)
    # The probabilities are drawn (ten bars) and the live panel has counted the answer.
    assert tab.page.locator("#probs rect").count() == 10
    expect(by(tab, "live-accepted")).not_to_have_text("0")
    expect(by(tab, "certificate")).to_be_hidden()  # no bundled model is certified
    expect(by(tab, "gallery-item").first).to_be_visible()
    tab.page.wait_for_timeout(300)  # the refuse rate of the what-if panel
    expect(by(tab, "whatif-refuse")).to_have_text(re.compile(r"\d+\.\d\d%"))
    SCREENSHOT.parent.mkdir(exist_ok=True)
    tab.page.screenshot(path=str(SCREENSHOT), full_page=True)


def test_uniform_noise_is_not_sure_on_the_default_model(tab: Page) -> None:
    noise = np.random.default_rng(0).random((28, 28))
    upload(tab, "noise.png", png((noise * 255).round().astype(np.uint8)))
    expect(by(tab, "result-decision")).to_have_text("not_sure")
    expect(by(tab, "result-label")).to_have_text("NOT SURE")


def test_a_stroke_drawn_on_the_canvas_is_preprocessed_as_mnist_and_answered(tab: Page) -> None:
    canvas = by(tab, "canvas")
    box = canvas.bounding_box()
    assert box is not None
    mouse = tab.page.mouse
    # A "7": a bar across the top, then a slanted stroke down, off-centre in the canvas.
    points = [(60, 50), (200, 50), (180, 110), (150, 190), (130, 250)]
    mouse.move(box["x"] + points[0][0], box["y"] + points[0][1])
    mouse.down()
    for x, y in points[1:]:
        mouse.move(box["x"] + x, box["y"] + y, steps=8)
    mouse.up()
    rgba = tab.page.evaluate(
        "Array.from(document.getElementById('canvas').getContext('2d')"
        ".getImageData(0, 0, 280, 280).data)"
    )
    intensity = np.asarray(rgba, dtype=np.float64).reshape(280, 280, 4)[..., 0] / 255
    with tab.page.expect_request(lambda r: r.url.endswith(f"/{DEFAULT}/predict")) as sent:
        by(tab, "send-drawing").click()
    body = json.loads(sent.value.post_data or "{}")
    x = np.asarray(body["instances"][0], dtype=np.float64)
    assert x.shape == (28, 28) and x.min() >= 0 and x.max() <= 1
    np.testing.assert_allclose(x, mnist_reference(intensity), atol=1e-9)
    ys, xs = np.nonzero(x > 0)
    assert ys.max() - ys.min() + 1 <= 20 and xs.max() - xs.min() + 1 <= 20
    assert max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 == 20  # the longer side fills it
    jj, ii = np.indices(x.shape)
    assert abs((jj * x).sum() / x.sum() - 14) <= 0.5
    assert abs((ii * x).sum() / x.sum() - 14) <= 0.5
    expect(by(tab, "result-decision")).to_have_text(re.compile(r"^(accepted|not_sure)$"))
    float(by(tab, "result-score").inner_text())  # a number, not a placeholder


def test_the_slider_shows_the_decision_and_refuse_rate_at_another_threshold(
    tab: Page, server: LiveServer
) -> None:
    upload(tab, "digit.png", DIGIT.read_bytes())
    expect(by(tab, "result-decision")).to_have_text("accepted")
    score = float(by(tab, "result-score").inner_text())
    slider = by(tab, "threshold-slider")
    expect(by(tab, "whatif-decision")).to_have_text("accepted")  # at the served T
    above = min(1.0, score + 0.02)
    slider.fill(str(above))
    expect(by(tab, "whatif-decision")).to_have_text("not_sure")
    # The refuse rate shown is the service's for the slider's T.
    t = float(slider.input_value())
    calib = httpx.get(f"{server.url}/v1/models/{DEFAULT}/calibration", params={"threshold": t})
    expected = f"{100 * calib.json()['refuse_rate']:.2f}%"
    expect(by(tab, "whatif-refuse")).to_have_text(expected)
    slider.fill(str(score - 0.05))
    expect(by(tab, "whatif-decision")).to_have_text("accepted")
    expect(by(tab, "result-decision")).to_have_text("accepted")  # the answer itself stays


def test_a_gallery_example_gets_the_live_service_answer(tab: Page, server: LiveServer) -> None:
    item = by(tab, "gallery-item").first
    expect(item).to_be_visible()
    index = json.loads(httpx.get(f"{server.url}/ui/gallery/index.json").text)
    served = {
        e["file"]: e
        for e in index["examples"]
        if e["model"] in ("mnist-resnet32-rce", "mnist-cnn-ce-at")
    }
    src = item.locator("img").get_attribute("src") or ""
    example = served[src.rsplit("/", 1)[-1]]
    item.click()
    expect(by(tab, "model-select")).to_have_value(example["model"])
    data = httpx.get(f"{server.url}{src}").content
    direct = service_answer(server, example["model"], example["file"], data).json()
    p = direct["predictions"][0]
    expect(by(tab, "result-decision")).to_have_text(p["decision"])
    label = str(p["label"]) if p["decision"] == "accepted" else "NOT SURE"
    expect(by(tab, "result-label")).to_have_text(re.compile(rf"^{label}"))
    assert float(by(tab, "result-score").inner_text()) == pytest.approx(p["score"], rel=1e-3)


def test_a_certificate_is_shown_when_a_prediction_carries_one(tab: Page) -> None:
    # No bundled model is certified: the service's real answer gets the two fields added.
    def certified(route: Route) -> None:
        body = route.fetch().json()
        body["predictions"][0] |= {"certified": True, "certify_eps": 0.1}
        route.fulfill(json=body)

    tab.page.route("**/predict/files*", certified)
    upload(tab, "digit.png", DIGIT.read_bytes())
    expect(by(tab, "certificate")).to_be_visible()
    expect(by(tab, "certificate")).to_contain_text("0.1")


# --- bad input -------------------------------------------------------------------------------


def test_a_text_file_shows_the_service_error(tab: Page, server: LiveServer) -> None:
    text = b"this is not an image\n"
    upload(tab, "notes.txt", text, "text/plain")
    direct = service_answer(server, DEFAULT, "notes.txt", text)
    assert direct.status_code == 422
    expect(by(tab, "error")).to_be_visible()
    expect(by(tab, "error")).to_contain_text(direct.json()["error"])
    expect(by(tab, "error")).to_contain_text("422")
    expect(by(tab, "result-label")).to_have_text("–")


def test_a_50_mb_image_shows_the_service_error(tab: Page, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    path = tmp_path / "huge.png"  # incompressible pixels, stored uncompressed: about 50 MB
    Image.fromarray(rng.integers(0, 256, (4096, 4096, 3), dtype=np.uint8)).save(
        path, "PNG", compress_level=0
    )
    assert path.stat().st_size > 50_000_000
    by(tab, "file-input").set_input_files(path)
    expect(by(tab, "error")).to_be_visible()
    expect(by(tab, "error")).to_contain_text("413")
    expect(by(tab, "error")).to_contain_text("the limit is")


def test_an_empty_canvas_says_so_and_sends_nothing(tab: Page) -> None:
    by(tab, "clear").click()
    by(tab, "send-drawing").click()
    expect(by(tab, "error")).to_contain_text("the canvas is empty")
    assert not [r for r in tab.requests if "/predict" in r.url]


# --- API keys --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed() -> Iterator[LiveServer]:
    with serve(api_keys=["s3cret-key"]) as s:
        yield s


def test_with_api_keys_the_page_asks_for_one_and_sends_it(
    browser: Browser, keyed: LiveServer
) -> None:
    for tab in open_page(browser, keyed.url):
        tab.page.goto(f"{keyed.url}/ui")
        expect(by(tab, "api-key")).to_be_visible()
        expect(by(tab, "error")).to_contain_text("401")
        by(tab, "api-key").fill("s3cret-key")
        by(tab, "api-key-submit").click()
        expect(by(tab, "model-select").locator("option")).to_have_count(2)
        by(tab, "model-select").select_option(DEFAULT)
        expect(tab.page.locator("body")).to_have_attribute("data-model", DEFAULT)
        upload(tab, "digit.png", DIGIT.read_bytes())
        expect(by(tab, "result-label")).to_have_text("7")
        api = [r for r in tab.requests if "/v1/" in r.url]
        assert any(r.headers.get("authorization") == "Bearer s3cret-key" for r in api)
        # Kept in the tab's memory only: nothing in storage, no cookie, not in the input.
        stored = tab.page.evaluate("[localStorage.length, sessionStorage.length, document.cookie]")
        assert stored == [0, 0, ""]
        assert tab.page.context.cookies() == []
        expect(by(tab, "api-key")).to_have_value("")
