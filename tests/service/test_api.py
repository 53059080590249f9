"""Every endpoint and every client error, in-process, on real ONNX models."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.config import Settings
from service.kdensity import KernelSet
from service.main import create_app
from service.manifest import MANIFEST_FILE, MODEL_FILE, Manifest
from service.runtime import OnnxModel
from service.scoring import score_logits
from training.data import synthetic

RCE = "tiny-rce"


def make_client(settings: Settings) -> TestClient:
    return TestClient(create_app(settings))


def images(n: int, seed: int = 5) -> np.ndarray:
    return synthetic(n, seed=seed).x.numpy()  # (n, 1, 28, 28) in [0, 1]


def png_b64(pixels: np.ndarray, fmt: str = "PNG", mode: str = "L") -> str:
    img = Image.fromarray((pixels * 255).round().astype(np.uint8))
    if mode != "L":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


def offline(model_repo: Path, name: str, x: np.ndarray):  # type: ignore[no-untyped-def]
    """The expected scores: the ONNX file run directly, outside the service, on the manifest's
    score (K-density from the kernel set file next to it)."""
    vdir = model_repo / name / "1"
    m = Manifest.load(vdir / MANIFEST_FILE)
    logits, feats = OnnxModel(vdir / MODEL_FILE, device="cpu").run_with_features(x)
    kset = None
    if m.k_density is not None:
        kset = KernelSet(np.load(vdir / m.k_density.file), m.k_density.sigma2)
    return m, score_logits(logits, m.kernel.to_kernel(), m.score, feats, kset)


# --- health and metadata ---------------------------------------------------------------------


def test_health_and_server_metadata(client: TestClient) -> None:
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    meta = client.get("/v2").json()
    assert meta["name"] == "notsure" and "binary_tensor_data" in meta["extensions"]


def test_the_model_list_names_the_default_model_only_when_it_is_served(model_repo: Path) -> None:
    listed = {}
    for default in ("tiny-rce", "mnist-resnet32-rce"):  # the second is not in this repository
        settings = Settings(model_repository=model_repo, default_model=default)
        with TestClient(create_app(settings)) as c:
            listed[default] = c.get("/v1/models").json()["default_model"]
    assert listed == {"tiny-rce": "tiny-rce", "mnist-resnet32-rce": None}


def test_model_list_and_v2_metadata(client: TestClient) -> None:
    models = {(m["name"], m["version"]): m for m in client.get("/v1/models").json()["models"]}
    assert set(models) == {("tiny-ce", 1), ("tiny-rce", 1)}
    assert models[("tiny-rce", 1)]["ready"] and models[("tiny-rce", 1)]["provider"]
    meta = client.get(f"/v2/models/{RCE}").json()
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert [o["name"] for o in meta["outputs"]] == [
        "label",
        "j_score",
        "confidence",
        "non_me",
        "probabilities",
        "score",
        "energy",
        "k_density",
    ]
    assert client.get(f"/v2/models/{RCE}/versions/1").json() == meta
    assert client.get(f"/v2/models/{RCE}/ready").status_code == 200
    assert client.get(f"/v2/models/{RCE}/versions/1/ready").status_code == 200
    assert client.get(f"/v2/models/{RCE}/versions/2/ready").status_code == 404


# --- native predict --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-rce", "tiny-ce"])
def test_predict_matches_offline_onnx_scores(
    client: TestClient, model_repo: Path, name: str
) -> None:
    x = images(6)
    r = client.post(f"/v1/models/{name}/predict", json={"instances": x[:, 0].tolist(), "id": "q1"})
    assert r.status_code == 200, r.text
    body = r.json()
    manifest, want = offline(model_repo, name, x)
    assert body["id"] == "q1" and body["model"] == name and body["version"] == 1
    assert body["threshold"] == pytest.approx(manifest.threshold)
    for i, p in enumerate(body["predictions"]):
        assert p["j_score"] == pytest.approx(want.j_score[i], rel=1e-5)
        assert p["confidence"] == pytest.approx(want.confidence[i], rel=1e-5)
        assert p["non_me"] == pytest.approx(want.non_me[i], rel=1e-5)
        assert p["score_name"] == manifest.score
        assert p["score"] == pytest.approx(float(want.score[i]), rel=1e-5)
        accepted = bool(want.score[i] >= manifest.threshold)
        assert p["decision"] == ("accepted" if accepted else "not_sure")
        if accepted:
            assert p["label"] == int(want.label[i])
            assert p["class_name"] == manifest.classes[p["label"]]
        else:
            assert p["label"] is None and p["class_name"] is None


def test_every_instance_encoding_gives_the_same_answer(client: TestClient) -> None:
    x = images(1)[0, 0]
    q = (x * 255).round() / 255  # what survives 8-bit PNG encoding
    forms = [
        q.tolist(),
        [q.tolist()],  # CxHxW
        (q * 255).round().astype(int).tolist(),  # integers 0-255
        png_b64(q),
        "data:image/png;base64," + png_b64(q),
        {"b64": png_b64(q)},
        png_b64(q, mode="RGB"),  # converted to grayscale
    ]
    scores = []
    for form in forms:
        r = client.post(f"/v1/models/{RCE}/predict", json={"instances": [form]})
        assert r.status_code == 200, (form if isinstance(form, str) else "array", r.text)
        scores.append(r.json()["predictions"][0]["j_score"])
    assert np.allclose(scores, scores[0], rtol=1e-4)


def test_jpeg_is_accepted(client: TestClient) -> None:
    r = client.post(
        f"/v1/models/{RCE}/predict", json={"instances": [png_b64(images(1)[0, 0], fmt="JPEG")]}
    )
    assert r.status_code == 200 and len(r.json()["predictions"]) == 1


def test_resize_only_when_asked(client: TestClient) -> None:
    big = png_b64(np.zeros((56, 56)))
    r = client.post(f"/v1/models/{RCE}/predict", json={"instances": [big]})
    assert r.status_code == 422 and "expects 28x28" in r.json()["error"]
    assert "resize" in r.json()["fix"]
    r = client.post(f"/v1/models/{RCE}/predict", json={"instances": [big], "resize": True})
    assert r.status_code == 200


def test_multipart_upload(client: TestClient) -> None:
    x = images(2)
    files = [
        ("files", (f"{i}.png", base64.b64decode(png_b64(x[i, 0])), "image/png")) for i in range(2)
    ]
    r = client.post(f"/v1/models/{RCE}/predict/files", files=files)
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 2


def test_threshold_override_from_settings_and_reveal(model_repo: Path) -> None:
    x = images(4)[:, 0].tolist()
    with make_client(
        Settings(model_repository=model_repo, thresholds={RCE: 1.0}, reveal_not_sure_labels=True)
    ) as c:
        body = c.post(f"/v1/models/{RCE}/predict", json={"instances": x}).json()
    assert body["threshold"] == 1.0
    assert {p["decision"] for p in body["predictions"]} == {"not_sure"}
    assert all(isinstance(p["label"], int) for p in body["predictions"])  # revealed


def test_request_threshold_only_when_allowed(client: TestClient, model_repo: Path) -> None:
    x = images(3)[:, 0].tolist()
    r = client.post(f"/v1/models/{RCE}/predict", json={"instances": x, "threshold": 0.0})
    assert r.status_code == 422 and r.json()["field"] == "threshold"
    with make_client(Settings(model_repository=model_repo, allow_request_threshold=True)) as c:
        body = c.post(f"/v1/models/{RCE}/predict", json={"instances": x, "threshold": 0.0}).json()
    assert body["threshold"] == 0.0
    assert {p["decision"] for p in body["predictions"]} == {"accepted"}


def test_versioned_predict(client: TestClient) -> None:
    r = client.post(
        f"/v1/models/{RCE}/versions/1/predict", json={"instances": images(1)[:, 0].tolist()}
    )
    assert r.status_code == 200 and r.json()["version"] == 1


# --- KServe V2 infer -------------------------------------------------------------------------


def test_v2_json_infer(client: TestClient, model_repo: Path) -> None:
    x = images(3)
    req = {
        "id": "r7",
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.reshape(-1).tolist(),
            }
        ],
    }
    r = client.post(f"/v2/models/{RCE}/infer", json=req)
    assert r.status_code == 200, r.text
    body = r.json()
    manifest, want = offline(model_repo, RCE, x)
    outs = {o["name"]: o for o in body["outputs"]}
    assert body["id"] == "r7" and body["model_version"] == "1"
    assert body["parameters"]["threshold"] == pytest.approx(manifest.threshold)
    expected_labels = np.where(want.score >= manifest.threshold, want.label, -1).tolist()
    assert outs["label"]["data"] == expected_labels and outs["label"]["datatype"] == "INT64"
    assert np.allclose(outs["j_score"]["data"], want.j_score, rtol=1e-5)
    assert outs["probabilities"]["shape"] == [3, 10]
    assert np.allclose(
        np.array(outs["probabilities"]["data"]).reshape(3, 10), want.probabilities, atol=1e-6
    )


def test_v2_binary_infer_by_hand(client: TestClient, model_repo: Path) -> None:
    x = images(2)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [2, 1, 28, 28],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [
                {"name": "j_score", "parameters": {"binary_data": True}},
                {"name": "label"},
            ],
        }
    ).encode()
    r = client.post(
        f"/v2/models/{RCE}/infer",
        content=header + x.tobytes(),
        headers={
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
        },
    )
    assert r.status_code == 200, r.text
    hlen = int(r.headers["Inference-Header-Content-Length"])
    head = json.loads(r.content[:hlen])
    j = np.frombuffer(r.content[hlen:], dtype="<f4")
    _, want = offline(model_repo, RCE, x)
    assert [o["name"] for o in head["outputs"]] == ["j_score", "label"]
    assert head["outputs"][0]["parameters"]["binary_data_size"] == 8
    assert np.allclose(j, want.j_score, rtol=1e-5)
    assert "data" in head["outputs"][1]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"inputs": []}, "inputs"),
        (
            {
                "inputs": [
                    {"name": "input", "shape": [1, 1, 28, 28], "datatype": "BYTES", "data": ["a"]}
                ]
            },
            "inputs[0].datatype",
        ),
        (
            {
                "inputs": [
                    {"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.5]}
                ]
            },
            "inputs[0].data",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, 3, 28, 28],
                        "datatype": "FP32",
                        "data": [0.5] * 2352,
                    }
                ]
            },
            "inputs[0]",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, 1, 28, 28],
                        "datatype": "FP32",
                        "data": [2.0] * 784,
                    }
                ]
            },
            "inputs[0]",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, 1, 28, 28],
                        "datatype": "FP32",
                        "data": [0.5] * 784,
                    }
                ],
                "outputs": [{"name": "nope"}],
            },
            "outputs",
        ),
    ],
)
def test_v2_errors_name_the_field(client: TestClient, body: dict[str, object], field: str) -> None:
    r = client.post(f"/v2/models/{RCE}/infer", json=body)
    assert r.status_code == 400, r.text  # the Open Inference Protocol's (and Triton's) status
    assert r.json()["field"] == field
    assert r.json()["error"]  # the V2 protocol's error key


def test_v2_binary_size_mismatch(client: TestClient) -> None:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 1, 28, 28],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 3136},
                }
            ]
        }
    ).encode()
    r = client.post(
        f"/v2/models/{RCE}/infer",
        content=header + b"\0" * 100,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert r.status_code == 400 and "shorter" in r.json()["error"]


# --- client mistakes on the native API --------------------------------------------------------


@pytest.mark.parametrize(
    ("instance", "needle"),
    [
        ("!!!not base64!!!", "not valid base64"),
        (base64.b64encode(b"hello, not an image").decode(), "not a readable PNG or JPEG"),
        (
            base64.b64encode(base64.b64decode(png_b64(np.zeros((28, 28))))[:40]).decode(),
            "not a readable PNG or JPEG",
        ),
        ([[0.5] * 28] * 27, "expected 1x28x28, got 27x28"),
        ([[[0.5] * 28] * 28] * 3, "expected 1x28x28, got 3x28x28"),
        ([[1.5] * 28] * 28, "float pixels must be in [0, 1]"),
        ([[-1] * 28] * 28, "integer pixels must be in 0-255"),
        ([[0.5] * 28] * 27 + [[0.5] * 5], "ragged"),
        ([["a"] * 28] * 28, "non-numeric"),
    ],
)
def test_bad_instances_are_422_naming_the_field(
    client: TestClient, instance: object, needle: str
) -> None:
    good = images(1)[0, 0].tolist()
    r = client.post(f"/v1/models/{RCE}/predict", json={"instances": [good, instance]})
    assert r.status_code == 422, r.text
    body = r.json()
    assert needle in body["error"]
    assert body["field"].startswith("instances[1]")
    assert body["fix"]


def test_nan_pixels_are_rejected(client: TestClient) -> None:
    row = "[" + ",".join(["NaN"] + ["0.5"] * 27) + "]"
    raw = '{"instances": [[' + ",".join([row] * 28) + "]]}"
    r = client.post(
        f"/v1/models/{RCE}/predict", content=raw, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 422 and "NaN" in r.json()["error"]


def test_unknown_model_and_version(client: TestClient) -> None:
    x = {"instances": images(1)[:, 0].tolist()}
    r = client.post("/v1/models/nope/predict", json=x)
    assert r.status_code == 404 and "tiny-rce" in r.json()["fix"]
    r = client.post(f"/v1/models/{RCE}/versions/9/predict", json=x)
    assert r.status_code == 404 and r.json()["field"] == "version"
    assert client.post("/v1/models/..%2F..%2Fetc/predict", json=x).status_code in (404, 422)
    assert client.post("/v1/models/UPPER/predict", json=x).status_code == 422


def test_limits_on_instances_and_body(model_repo: Path) -> None:
    with make_client(
        Settings(model_repository=model_repo, max_instances=2, max_body_bytes=200_000)
    ) as c:
        r = c.post(f"/v1/models/{RCE}/predict", json={"instances": images(3)[:, 0].tolist()})
        assert r.status_code == 413 and r.json()["field"] == "instances"
        r = c.post(
            f"/v1/models/{RCE}/predict",
            content=b"[" + b"0," * 200_000 + b"0]",
            headers={"Content-Type": "application/json"},
        )
        assert r.status_code == 413 and r.json()["field"] == "body"


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"{not json", "body"),
        (b'{"instances": []}', "instances"),
        (b'{"instances": [[0]], "extra": 1}', "extra"),
        (b"[]", "body"),
    ],
)
def test_malformed_bodies(client: TestClient, raw: bytes, field: str) -> None:
    r = client.post(
        f"/v1/models/{RCE}/predict", content=raw, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 422, r.text
    assert r.json()["field"].startswith(field)


def test_error_bodies_carry_no_paths_or_traces(client: TestClient, model_repo: Path) -> None:
    r = client.post("/v1/models/nope/predict", json={"instances": [[0]]})
    text = r.text
    assert str(model_repo) not in text and "Traceback" not in text
    assert r.headers["x-request-id"]


# --- metrics ---------------------------------------------------------------------------------


def test_metrics_count_decisions(model_repo: Path) -> None:
    x = images(5)[:, 0].tolist()
    with make_client(
        Settings(model_repository=model_repo, thresholds={"tiny-ce": 1.0, "tiny-rce": 0.0})
    ) as c:
        assert c.post("/v1/models/tiny-rce/predict", json={"instances": x}).status_code == 200
        assert c.post("/v1/models/tiny-ce/predict", json={"instances": x[:3]}).status_code == 200
        assert c.post("/v1/models/nope/predict", json={"instances": x}).status_code == 404
        text = c.get("/metrics").text
    from prometheus_client.parser import text_string_to_metric_families

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }

    def get(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert get("notsure_predictions_total", model="tiny-rce", version="1", decision="accepted") == 5
    assert get("notsure_predictions_total", model="tiny-ce", version="1", decision="not_sure") == 3
    assert get("notsure_j_score_count", model="tiny-rce", version="1") == 5
    assert (
        get(
            "notsure_requests_total",
            model="tiny-rce",
            version="1",
            endpoint="/v1/models/{name}/predict",
            code="200",
            protocol="http",
        )
        == 1
    )
    assert (
        get(
            "notsure_requests_total",
            model="",
            version="",
            endpoint="/v1/models/{name}/predict",
            code="404",
            protocol="http",
        )
        == 1
    )
    assert get("notsure_batch_size_count", model="tiny-ce", version="1") >= 1
    assert get("notsure_model_ready", model="tiny-rce", version="1") == 1


def test_openapi_documents_every_route(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for p in [
        "/v1/models/{name}/predict",
        "/v1/models/{name}/versions/{version}/predict",
        "/v1/models/{name}/predict/files",
        "/v2/models/{name}/infer",
        "/v2/models/{name}/versions/{version}/infer",
        "/v2/health/ready",
        "/metrics",
    ]:
        assert p in paths, p
    predict = paths["/v1/models/{name}/predict"]["post"]
    assert {"200", "404", "422", "503"} <= set(predict["responses"])
    assert "PredictResponse" in json.dumps(predict["responses"]["200"])
    infer = paths["/v2/models/{name}/infer"]["post"]
    assert "application/octet-stream" in infer["requestBody"]["content"]


def test_generated_request_ids_are_unique_32_hex() -> None:
    from service.middleware import RequestIds

    a, b = RequestIds(), RequestIds()
    ids = [a.next() for _ in range(1000)] + [b.next() for _ in range(1000)]
    assert len(set(ids)) == 2000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_sheds_and_timeouts_log_as_warnings_not_errors() -> None:
    import logging

    from service.errors import log_level

    assert [log_level(c) for c in (200, 404, 422, 500, 503, 504)] == [
        logging.INFO,
        logging.INFO,
        logging.INFO,
        logging.ERROR,
        logging.WARNING,
        logging.WARNING,
    ]


def test_images_are_opened_from_the_header_and_decoded_later(
    image_loads: list[tuple[int, int]],
) -> None:
    """Opening reads the header (the size that decides where the decode runs) and decodes no
    pixel; the decode gives the pixels of the image sent."""
    from types import SimpleNamespace

    from service.imaging import EncodedImage, decode, open_instance

    loads = image_loads
    pixels = np.arange(600, dtype=np.float64).reshape(20, 30) % 256 / 255  # 30 wide, 20 high
    b64 = png_b64(pixels)
    shape, opts = (1, 28, 28), {"resize": True, "max_pixels": 10**6}
    for inst, field in [
        (b64, "instances[0]"),
        ("data:image/png;base64," + b64, "instances[0]"),
        (SimpleNamespace(b64=b64), "instances[0].b64"),
    ]:
        opened = open_instance(inst, shape, "instances[0]", **opts)
        assert isinstance(opened, EncodedImage)
        assert (opened.pixels, opened.field) == (600, field)
    assert loads == []  # no pixel decoded yet
    got = decode(open_instance(b64, (1, 20, 30), "x", resize=False, max_pixels=600), (1, 20, 30))
    np.testing.assert_allclose(got[0], np.round(pixels * 255) / 255, atol=1e-6)
    assert loads and set(loads) == {(30, 20)}  # decoded now (convert calls load again)
    # Pixel arrays need no decode: they come back as the tensor.
    arr = open_instance([[0.5] * 28] * 28, shape, "instances[0]", **opts)
    assert isinstance(arr, np.ndarray) and arr.shape == shape and float(arr.max()) == 0.5


def test_v2_infer_returns_the_models_own_score(client: TestClient, model_repo: Path) -> None:
    # The CE model is thresholded on confidence; every score is an output.
    x = images(4)
    req = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                       "data": x.reshape(-1).tolist()}]}  # fmt: skip
    body = client.post("/v2/models/tiny-ce/infer", json=req).json()
    manifest, want = offline(model_repo, "tiny-ce", x)
    assert manifest.score == "confidence" and body["parameters"]["score"] == "confidence"
    outs = {o["name"]: np.array(o["data"]) for o in body["outputs"]}
    assert np.allclose(outs["score"], want.confidence, rtol=1e-5)
    assert np.allclose(outs["energy"], want.energy, rtol=1e-5)
    assert np.allclose(outs["k_density"], want.k_density, rtol=1e-4, atol=1e-12)
    assert outs["label"].tolist() == np.where(want.confidence >= manifest.threshold,
                                              want.label, -1).tolist()  # fmt: skip


def test_a_misspelt_query_parameter_is_refused_naming_the_right_ones(client: TestClient) -> None:
    r = client.get("/v1/models/tiny-rce/recent?second=5")
    assert r.status_code == 422
    assert r.json() == {"error": "unknown query parameter 'second'", "field": "query.second",
                        "fix": "use seconds"}  # fmt: skip
    assert client.get("/v1/models/tiny-rce/recent?seconds=5").status_code == 200
    r = client.get("/v1/models/tiny-rce/calibration?treshold=0.5")
    assert r.status_code == 422 and r.json()["fix"] == "use threshold, version"
    png = client.post("/v1/models/tiny-rce/predict/files?probabilites=true",
                      files={"files": ("a.png", b"\x89PNG", "image/png")})  # fmt: skip
    assert png.status_code == 422 and "probabilites" in png.text
