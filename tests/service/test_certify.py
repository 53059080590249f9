"""The per-answer certificate in the service: every answer of a model with a bound graph says
whether its label is certified on the ball of the manifest's radius, identically over the native
API, V2 HTTP and gRPC (real tritonclient clients), counted in the metrics; the decision requires
it where the manifest says so; the bound graph is verified as strictly as the model.

The expected certificates come from the torch bounds (`training.certify.bounds.ibp`), computed
independently of the ONNX bound graph the service runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from fastapi.testclient import TestClient

from service.certify import certified_labels
from service.config import Settings
from service.main import create_app
from service.manifest import CERTIFY_FILE, MANIFEST_FILE, MODEL_FILE, Manifest
from service.scoring import NOT_SURE, Kernel, decide, score_logits
from tests.conftest import LiveServer
from tests.reliability.test_overload import metric
from training.certify.bounds import ibp
from training.certify.graph import export_model
from training.data import synthetic
from training.modelio import load_torch_model

IMAGES = 24


def _torch_certified(model_dir: Path, x: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """(labels, certified) from the torch network and its torch IBP bounds, by hand; certified
    is None (-1) where the smallest margin is within float32 rounding of 0, where the ONNX
    graph, summing in another order, may fall on either side."""
    net, manifest = load_torch_model(model_dir)
    with torch.no_grad():
        xt = torch.from_numpy(x)
        z = net(xt).numpy()
        served = -z if manifest.objective == "rce" else z
        margins = ibp(net, xt, eps, manifest.objective).margins.numpy()
    labels = served.argmax(axis=1)
    n = served.shape[1]
    least = np.array([min(margins[b, c, j] for j in range(n) if j != c)
                      for b, c in enumerate(labels)])  # fmt: skip
    tol = 1e-5 * max(1.0, float(np.abs(margins).max()))
    certified = np.where(np.abs(least) <= tol, -1, least > 0).astype(np.int64)
    return labels, certified


@pytest.fixture(scope="module")
def certified_repo(
    model_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, float]:
    """A copy of the tiny repository whose models have a bound graph, at a radius where some of
    the test images are certified and some are not: tiny-rce reports the certificate, tiny-ce
    requires it."""
    repo = tmp_path_factory.mktemp("certified") / "models"
    shutil.copytree(model_repo, repo)
    x = synthetic(IMAGES, seed=21).x.numpy()
    # The tiny ResNet-8s (BatchNorm, a minute of training) are certified only at tiny radii.
    for eps in (0.01, 1e-3, 1e-4, 1e-5, 3e-6, 1e-6, 3e-7, 1e-7):
        _, cert = _torch_certified(repo / "tiny-rce" / "1", x, eps)
        if (cert == 1).sum() >= 3 and (cert == 0).sum() >= 3:
            break
    else:
        pytest.fail("no radius certifies some but not all of the tiny-rce test images")
    export_model(repo / "tiny-rce" / "1", parity_images=8, eps=eps, required=False)
    export_model(repo / "tiny-ce" / "1", parity_images=8, eps=eps, required=True)
    return repo, eps


def _images() -> np.ndarray:
    return synthetic(IMAGES, seed=21).x.numpy()


def test_every_protocol_carries_the_certificate_the_torch_bounds_give(
    certified_repo: tuple[Path, float],
) -> None:
    repo, eps = certified_repo
    x = _images()
    want_labels, want_cert = _torch_certified(repo / "tiny-rce" / "1", x, eps)
    sure = want_cert >= 0  # the images whose certificate float32 rounding cannot flip
    settings = Settings(model_repository=repo, reveal_not_sure_labels=True)
    with LiveServer(settings) as server:
        r = httpx.post(f"{server.url}/v1/models/tiny-rce/predict",
                       json={"instances": x.tolist()}, timeout=30)  # fmt: skip
        r.raise_for_status()
        body = r.json()
        assert body["certificate_required"] is False
        preds = body["predictions"]
        assert all(p["certify_eps"] == pytest.approx(eps) for p in preds)
        got = np.array([p["certified"] for p in preds])
        assert (got[sure] == want_cert[sure].astype(bool)).all()
        revealed = [p["label"] for p in preds]
        assert revealed == want_labels.tolist()

        http = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
        meta = http.get_model_metadata("tiny-rce")
        assert {"name": "certified", "datatype": "BOOL", "shape": [-1]} in meta["outputs"]
        assert meta["parameters"]["certify_eps"] == pytest.approx(eps)
        config = http.get_model_config("tiny-rce")
        assert {"name": "certified", "data_type": "TYPE_BOOL", "dims": [1],
                "reshape": {"shape": []}, "is_shape_tensor": False} in config["output"]  # fmt: skip
        assert float(config["parameters"]["certify_eps"]["string_value"]) == eps
        inp = triton_http.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        for binary in (True, False):
            res = http.infer("tiny-rce", [inp], outputs=[
                triton_http.InferRequestedOutput("certified", binary_data=binary),
                triton_http.InferRequestedOutput("label", binary_data=binary)])  # fmt: skip
            assert res.as_numpy("certified").dtype == np.bool_
            assert res.as_numpy("certified").tolist() == got.tolist()
            assert res.get_response()["parameters"]["certify_eps"] == pytest.approx(eps)

        grpc = triton_grpc.InferenceServerClient(server.grpc_target)
        ginp = triton_grpc.InferInput("input", list(x.shape), "FP32")
        ginp.set_data_from_numpy(x)
        gres = grpc.infer("tiny-rce", [ginp])
        assert gres.as_numpy("certified").tolist() == got.tolist()
        params = gres.get_response().parameters
        assert params["certify_eps"].double_param == pytest.approx(eps)

        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        labels = {"model": "tiny-rce", "version": "1"}
        n_cert = int(got.sum())
        assert metric(text, "notsure_certificates_total", **labels, certified="true") == 4 * n_cert
        assert metric(text, "notsure_certificates_total", **labels,
                      certified="false") == 4 * (IMAGES - n_cert)  # fmt: skip


def test_a_required_certificate_refuses_what_it_does_not_cover(
    certified_repo: tuple[Path, float],
) -> None:
    repo, eps = certified_repo
    x = _images()
    _, want_cert = _torch_certified(repo / "tiny-ce" / "1", x, eps)
    with LiveServer(Settings(model_repository=repo)) as server:
        body = httpx.post(f"{server.url}/v1/models/tiny-ce/predict",
                          json={"instances": x.tolist()}, timeout=30).json()  # fmt: skip
    assert body["certificate_required"] is True
    t = body["threshold"]
    for p, cert in zip(body["predictions"], want_cert, strict=True):
        if cert >= 0:
            assert p["certified"] == bool(cert)
        assert (p["decision"] == "accepted") == (p["score"] >= t and p["certified"])
    assert any(p["score"] >= t and not p["certified"] for p in body["predictions"])


def test_a_certified_answer_holds_at_random_corners_of_its_ball(
    certified_repo: tuple[Path, float],
) -> None:
    """Soundness at serving time, checked with the model graph alone: every corner tried of the
    ball around a certified input gets the certified label."""
    repo, eps = certified_repo
    folder = repo / "tiny-rce" / "1"
    x = _images()
    labels, cert = _torch_certified(folder, x, eps)
    sess = ort.InferenceSession(str(folder / MODEL_FILE), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for i in np.flatnonzero(cert == 1):
        signs = rng.choice([-1.0, 1.0], size=(64, *x.shape[1:])).astype(np.float32)
        corners = np.clip(x[i] + eps * signs, 0.0, 1.0).astype(np.float32)
        served = sess.run(None, {sess.get_inputs()[0].name: corners})[0]
        assert (served.argmax(axis=1) == labels[i]).all()


def _broken(repo: Path, how: str) -> Path:
    folder = repo / "tiny-rce" / "1"
    if how == "missing":
        (folder / CERTIFY_FILE).unlink()
    else:
        data = bytearray((folder / CERTIFY_FILE).read_bytes())
        data[-1] ^= 0xFF
        (folder / CERTIFY_FILE).write_bytes(bytes(data))
    return repo


@pytest.mark.parametrize(("how", "says"), [("missing", "certify.onnx is missing"),
                                           ("altered", "does not match")])  # fmt: skip
def test_a_bad_bound_graph_keeps_the_version_out(
    certified_repo: tuple[Path, float], tmp_path: Path, how: str, says: str
) -> None:
    repo = tmp_path / "models"
    shutil.copytree(certified_repo[0], repo)
    _broken(repo, how)
    with TestClient(create_app(Settings(model_repository=repo))) as client:
        listed = {(m["name"], m["version"]): m for m in client.get("/v1/models").json()["models"]}
        bad = listed[("tiny-rce", 1)]
        assert bad["ready"] is False and says in bad["error"]
        assert listed[("tiny-ce", 1)]["ready"] is True  # the other model serves on


def test_the_manifest_refuses_an_incomplete_certificate(model_repo: Path) -> None:
    data = json.loads((model_repo / "tiny-rce" / "1" / MANIFEST_FILE).read_text())
    with pytest.raises(ValueError, match="certify_sha256"):
        Manifest.model_validate({**data, "certify_eps": 0.1})
    with pytest.raises(ValueError, match="needs certify_eps"):
        Manifest.model_validate({**data, "certify_required": True})
    with pytest.raises(ValueError, match="greater than 0"):
        Manifest.model_validate({**data, "certify_eps": 0.0, "certify_sha256": "0" * 64})


def test_decide_requires_the_certificate_only_when_asked() -> None:
    logits = np.array([[4.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 0.1]])
    s = score_logits(logits, Kernel(mu=np.log(2), sigma=1.0), "confidence")
    cert = np.array([True, False, True])
    reported = decide(_with(s, cert, required=False), 0.5)
    required = decide(_with(s, cert, required=True), 0.5)
    assert reported.tolist() == [0, 1, NOT_SURE]  # 0.34 < 0.5 refuses the third
    assert required.tolist() == [0, NOT_SURE, NOT_SURE]


def test_certified_labels_by_hand() -> None:
    m = np.zeros((1, 3, 3), np.float32)
    m[0, 0] = [0.0, 0.2, 0.1]  # class 0 beats 1 and 2 everywhere
    m[0, 1] = [-0.3, 0.0, 0.5]  # class 1 does not beat 0
    m[0, 2] = [-0.1, -0.5, 0.0]
    assert certified_labels(m).tolist() == [[True, False, False]]


def _with(s: object, cert: np.ndarray, required: bool) -> object:
    from dataclasses import replace

    return replace(s, certified=cert, certify_eps=0.1, certificate_required=required)  # type: ignore[type-var]


def test_a_model_without_a_bound_graph_says_nothing_of_certificates(client: TestClient) -> None:
    x = _images()[:2]
    body = client.post("/v1/models/tiny-rce/predict", json={"instances": x.tolist()}).json()
    assert "certificate_required" not in body
    assert all("certified" not in p and "certify_eps" not in p for p in body["predictions"])
    meta = client.get("/v2/models/tiny-rce").json()
    assert "certified" not in {o["name"] for o in meta["outputs"]}
    assert "certify_eps" not in meta["parameters"]
