"""The inference fast path answers exactly as the FastAPI routes do, request for request.

Each case is sent to two apps over the same repository, one with the fast path and one
without (FastAPI routing and dependencies: the reference), and the answers are compared.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app
from training.data import synthetic

RCE = "tiny-rce"
KEY = "k" * 32
PIXELS = (synthetic(2, seed=3).x.numpy()[:, 0] * 255).round().astype(int).tolist()
NATIVE = {"instances": PIXELS}
V2 = {
    "inputs": [
        {
            "name": "input",
            "shape": [2, 1, 28, 28],
            "datatype": "FP32",
            "data": (np.asarray(PIXELS, np.float32) / 255).ravel().tolist(),
        }
    ]
}
# (method, path, json body, headers)
CASES = [
    ("POST", f"/v1/models/{RCE}/predict", NATIVE, {}),
    ("POST", f"/v1/models/{RCE}/versions/1/predict", NATIVE, {}),
    ("POST", f"/v2/models/{RCE}/infer", V2, {}),
    ("POST", f"/v2/models/{RCE}/versions/1/infer", V2, {}),
    ("POST", f"/v1/models/{RCE}/predict", NATIVE, {"Authorization": f"Bearer {KEY}"}),
    ("POST", f"/v1/models/{RCE}/predict", NATIVE, {"X-API-Key": KEY}),
    ("POST", f"/v1/models/{RCE}/predict", NATIVE, {"Authorization": "Bearer wrong"}),
    ("POST", f"/v2/models/{RCE}/infer", V2, {"X-API-Key": "wrong"}),
    ("POST", "/v1/models/nope/predict", NATIVE, {"X-API-Key": KEY}),
    ("POST", f"/v1/models/{RCE}/versions/7/predict", NATIVE, {"X-API-Key": KEY}),
    ("POST", f"/v1/models/{RCE}/versions/0/predict", NATIVE, {"X-API-Key": KEY}),
    ("POST", f"/v1/models/{RCE}/versions/01/predict", NATIVE, {"X-API-Key": KEY}),
    ("POST", f"/v1/models/{RCE}/versions/1000001/predict", NATIVE, {"X-API-Key": KEY}),
    ("POST", "/v1/models/Bad_Name/predict", NATIVE, {"X-API-Key": KEY}),
    ("POST", "/v1/models/abc%0A/predict", NATIVE, {"X-API-Key": KEY}),
    ("POST", f"/v1/models/{RCE}/predict/", NATIVE, {"X-API-Key": KEY}),
    ("POST", f"/v1/models/{RCE}/infer", V2, {"X-API-Key": KEY}),
    ("POST", f"/v2/models/{RCE}/predict", NATIVE, {"X-API-Key": KEY}),
    ("GET", f"/v1/models/{RCE}/predict", None, {"X-API-Key": KEY}),
    ("POST", f"/v1/models/{RCE}/predict", {"instances": [[[300]]]}, {"X-API-Key": KEY}),
    ("POST", f"/v1/models/{RCE}/predict", {"wrong": 1}, {"X-API-Key": KEY}),
    ("POST", f"/v2/models/{RCE}/infer", {"inputs": []}, {"X-API-Key": KEY}),
]


def _client(repo: Path, fast: bool, keys: list[str]) -> TestClient:
    return TestClient(create_app(Settings(model_repository=repo, fast_path=fast, api_keys=keys)))


@pytest.fixture(params=[[], [KEY]], ids=["open", "keys"])
def pair(model_repo: Path, request: pytest.FixtureRequest) -> Iterator[tuple[TestClient, ...]]:
    with (
        _client(model_repo, True, request.param) as fast,
        _client(model_repo, False, request.param) as ref,
    ):
        yield fast, ref


def _answer(c: TestClient, method: str, path: str, body: object, headers: dict[str, str]):  # type: ignore[no-untyped-def]
    r = c.request(method, path, json=body, headers=headers)
    try:
        payload = r.json()
    except json.JSONDecodeError:
        payload = r.text
    kept = {k: v for k, v in r.headers.items() if k in ("content-type", "retry-after", "allow")}
    return r.status_code, payload, kept


@pytest.mark.parametrize(("method", "path", "body", "headers"), CASES)
def test_fast_path_answers_like_the_fastapi_routes(
    pair: tuple[TestClient, TestClient],
    method: str,
    path: str,
    body: object,
    headers: dict[str, str],
) -> None:
    fast, ref = pair
    assert _answer(fast, method, path, body, headers) == _answer(ref, method, path, body, headers)


def _requests_total(c: TestClient) -> dict[str, float]:
    out = {}
    for line in c.get("/metrics").text.splitlines():
        if line.startswith("notsure_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            out[labels] = float(value)
    return out


def test_fast_path_requests_carry_the_route_labels(model_repo: Path) -> None:
    with _client(model_repo, True, []) as fast, _client(model_repo, False, []) as ref:
        for c in (fast, ref):
            assert c.post(f"/v1/models/{RCE}/versions/1/predict", json=NATIVE).status_code == 200
            assert c.post(f"/v2/models/{RCE}/infer", json=V2).status_code == 200
            assert c.post("/v1/models/nope/predict", json=NATIVE).status_code == 404
        assert _requests_total(fast) == _requests_total(ref)
        labels = "".join(_requests_total(fast))
        assert 'endpoint="/v1/models/{name}/versions/{version}/predict"' in labels
        assert 'endpoint="/v2/models/{name}/infer"' in labels


@pytest.mark.parametrize(
    ("method", "path", "fast"),
    [
        ("POST", f"/v1/models/{RCE}/predict", True),
        ("POST", f"/v1/models/{RCE}/versions/12/predict", True),
        ("POST", f"/v2/models/{RCE}/infer", True),
        ("POST", f"/v2/models/{RCE}/versions/1000000/infer", True),
        ("POST", f"/v1/models/{RCE}/predict/files", True),
        ("POST", f"/v2/models/{RCE}/versions/1000001/infer", False),
        ("POST", f"/v1/models/{RCE}/versions/0/predict", False),
        ("POST", f"/v1/models/{RCE}/versions/01/predict", False),
        ("POST", "/v1/models/Bad_Name/predict", False),
        ("POST", "/v1/models/abc%0A/predict", False),
    ],
)
def test_which_requests_take_the_fast_path(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch, method: str, path: str, fast: bool
) -> None:
    """FastAPI's own handling runs only for the requests whose path parameters it would
    refuse or read differently."""
    from fastapi.routing import APIRoute

    from service.api.routing import InferenceRoute

    handled_by_fastapi = []
    original = APIRoute.handle

    async def spy(self: APIRoute, scope, receive, send):  # type: ignore[no-untyped-def]
        if isinstance(self, InferenceRoute):
            handled_by_fastapi.append(scope["path"])
        await original(self, scope, receive, send)

    monkeypatch.setattr(APIRoute, "handle", spy)
    with _client(model_repo, True, []) as c:
        r = c.request(method, path, json=NATIVE)
    assert r.status_code != 405  # it reached an inference route
    assert (not handled_by_fastapi) == fast, r.text


def _png(pixels: list[list[int]]) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


UPLOADS = [  # (query, files)
    ("", [("files", ("a.png", _png(PIXELS[0]), "image/png"))]),
    ("?resize=true&version=1", [("files", ("a.png", _png(PIXELS[1]), "image/png"))] * 2),
    ("?version=abc", [("files", ("a.png", _png(PIXELS[0]), "image/png"))]),
    ("?version=0", [("files", ("a.png", _png(PIXELS[0]), "image/png"))]),
    ("?threshold=0.5", [("files", ("a.png", _png(PIXELS[0]), "image/png"))]),
    ("?threshold=x", [("files", ("a.png", _png(PIXELS[0]), "image/png"))]),
    ("", [("files", ("a.png", b"", "image/png"))]),
    ("", [("files", ("a.png", b"not an image", "image/png"))]),
    ("", [("other", ("a.png", _png(PIXELS[0]), "image/png"))]),
]


@pytest.mark.parametrize(("query", "files"), UPLOADS)
def test_uploads_answer_like_the_fastapi_route(
    pair: tuple[TestClient, TestClient], query: str, files: list[object]
) -> None:
    fast, ref = pair
    headers = {"X-API-Key": KEY}
    path = f"/v1/models/{RCE}/predict/files{query}"
    a = fast.post(path, files=files, headers=headers)
    b = ref.post(path, files=files, headers=headers)
    assert (a.status_code, a.json()) == (b.status_code, b.json())


def test_uploads_take_a_per_request_threshold_where_allowed(model_repo: Path) -> None:
    files = [("files", ("a.png", _png(PIXELS[0]), "image/png"))]
    path = f"/v1/models/{RCE}/predict/files"
    settings = Settings(model_repository=model_repo, allow_request_threshold=True)
    with TestClient(create_app(settings)) as c:
        low = c.post(f"{path}?threshold=0", files=files).json()
        high = c.post(f"{path}?threshold=1", files=files).json()
        bad = c.post(f"{path}?threshold=2", files=files)
    # J is in (0, 1): everything passes T = 0, nothing passes T = 1 (as the JSON body's field).
    assert low["threshold"] == 0 and low["predictions"][0]["decision"] == "accepted"
    assert high["threshold"] == 1 and high["predictions"][0]["decision"] == "not_sure"
    assert bad.status_code == 422 and bad.json()["field"] == "threshold"
