"""KServe V2 over gRPC with the real tritonclient.grpc (and generated stubs) against a live server
on 127.0.0.1: the same answers as over HTTP, both content encodings, every error status, keys,
deadlines, health checking and reflection."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
import grpc  # noqa: E402
import tritonclient.http as tritonclient_http  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc  # noqa: E402
from tritonclient.grpc import service_pb2 as pb  # noqa: E402
from tritonclient.grpc import service_pb2_grpc as pb_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from service.config import Settings  # noqa: E402
from service.manifest import MANIFEST_FILE, MODEL_FILE, Manifest  # noqa: E402
from service.runtime import OnnxModel  # noqa: E402
from service.scoring import Scores, score_logits  # noqa: E402
from tests.conftest import LiveServer  # noqa: E402
from tests.reliability.conftest import RCE, loaded_model, slow_down  # noqa: E402
from tests.reliability.test_overload import metric  # noqa: E402
from training.data import synthetic  # noqa: E402

SERVICE = "inference.GRPCInferenceService"
KEY = "s3cret"


@pytest.fixture(scope="module")
def server(model_repo: Path) -> Iterator[LiveServer]:
    # One inference thread: every batch runs on the session slow_down() patches.
    settings = Settings(model_repository=model_repo, allow_request_threshold=True,
                        inference_threads=1)  # fmt: skip
    with LiveServer(settings) as s:
        yield s


@pytest.fixture
def triton(server: LiveServer) -> Iterator[Any]:
    """tritonclient's gRPC client of the live server."""
    c = tritonclient_grpc.InferenceServerClient(server.grpc_target)
    yield c
    c.close()


@pytest.fixture
def stub(server: LiveServer) -> Iterator[Any]:
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def offline(model_repo: Path, x: np.ndarray) -> tuple[Manifest, Scores]:
    """The expected answer: the ONNX file run directly, then service.scoring."""
    vdir = model_repo / RCE / "1"
    m = Manifest.load(vdir / MANIFEST_FILE)
    logits = OnnxModel(vdir / MODEL_FILE, device="cpu").run(x)
    return m, score_logits(logits, m.kernel.to_kernel())


def infer_input(x: np.ndarray, name: str = "input", datatype: str = "FP32") -> Any:
    inp = tritonclient_grpc.InferInput(name, list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return inp


def status_of(exc: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return str(exc.value.status())


def all_outputs(model_repo: Path) -> list[str]:
    """Every output a request that names none gets, in metadata order."""
    names = ["label", "j_score", "confidence", "non_me", "probabilities", "score", "energy"]
    if (model_repo / RCE / "1" / "kernel_set.npy").exists():
        names.append("k_density")  # only for models with a K-density kernel set
    return names


def test_same_answers_as_over_http_and_as_the_onnx_file(
    server: LiveServer, triton: Any, model_repo: Path
) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready(RCE) and triton.is_model_ready(RCE, "1")
    meta = triton.get_model_metadata(RCE, as_json=True)
    assert meta["inputs"][0]["shape"] == ["-1", "1", "28", "28"]
    names = all_outputs(model_repo)
    assert [o["name"] for o in meta["outputs"]] == names
    x = synthetic(16, seed=3).x.numpy()  # MNIST-like 28x28 digits in [0, 1]
    result = triton.infer(RCE, [infer_input(x)], request_id="g1")
    response = result.get_response()
    manifest, want = offline(model_repo, x)
    assert response.id == "g1" and response.model_version == "1"
    assert response.parameters["threshold"].double_param == pytest.approx(manifest.threshold)
    assert response.parameters["score"].string_param == manifest.score == "j_score"
    labels = result.as_numpy("label")
    assert labels.dtype == np.int64
    answered = want.j_score >= manifest.threshold
    np.testing.assert_array_equal(labels, np.where(answered, want.label, -1))
    assert (labels == -1).any() or answered.all()  # -1 is NOT SURE
    np.testing.assert_allclose(result.as_numpy("j_score"), want.j_score, rtol=1e-5)
    np.testing.assert_allclose(result.as_numpy("confidence"), want.confidence, rtol=1e-5)
    np.testing.assert_allclose(result.as_numpy("probabilities"), want.probabilities, atol=1e-6)
    # The HTTP V2 route answers the same images identically.
    http = tritonclient_http.InferenceServerClient(f"127.0.0.1:{server.port}")
    try:
        hin = tritonclient_http.InferInput("input", list(x.shape), "FP32")
        hin.set_data_from_numpy(x)
        h = http.infer(RCE, [hin])
    finally:
        http.close()
    for name in names:
        np.testing.assert_array_equal(result.as_numpy(name), h.as_numpy(name), err_msg=name)


def test_typed_contents_and_requested_outputs(stub: Any, model_repo: Path) -> None:
    x = synthetic(3, seed=4).x.numpy()
    req = pb.ModelInferRequest(model_name=RCE, model_version="1")
    tensor = req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    req.outputs.add(name="j_score")
    req.outputs.add(name="label")
    resp = stub.ModelInfer(req, timeout=30)
    manifest, want = offline(model_repo, x)
    assert [o.name for o in resp.outputs] == ["j_score", "label"]
    assert resp.id == ""  # none sent, none made up
    assert list(resp.outputs[1].shape) == [3]
    j = np.frombuffer(resp.raw_output_contents[0], "<f4")
    label = np.frombuffer(resp.raw_output_contents[1], "<i8")
    np.testing.assert_allclose(j, want.j_score, rtol=1e-5)
    np.testing.assert_array_equal(
        label, np.where(want.j_score >= manifest.threshold, want.label, -1)
    )
    # UINT8 pixels (0-255) in typed uint contents decode like the HTTP route's.
    req8 = pb.ModelInferRequest(model_name=RCE)
    t8 = req8.inputs.add(name="input", datatype="UINT8", shape=[1, 1, 28, 28])
    t8.contents.uint_contents.extend([0] * 784)
    assert len(stub.ModelInfer(req8, timeout=30).outputs) == len(all_outputs(model_repo))


def test_request_threshold_is_applied_and_reported(triton: Any) -> None:
    x = synthetic(4, seed=5).x.numpy()
    r = triton.infer(RCE, [infer_input(x)], parameters={"threshold": 1.0})
    assert r.get_response().parameters["threshold"].double_param == 1.0
    # j_score < 1 for every image, so T = 1 refuses all of them.
    assert (r.as_numpy("j_score") < 1.0).all() and (r.as_numpy("label") == -1).all()


def _details(exc: pytest.ExceptionInfo[InferenceServerException]) -> dict[str, str]:
    body: dict[str, str] = json.loads(exc.value.message())
    assert body["error"]
    return body


@pytest.mark.parametrize(
    ("x", "name", "datatype", "field"),
    [
        (np.zeros((1, 3, 28, 28), np.float32), "input", "FP32", "inputs[0]"),
        (np.zeros((1, 1, 28, 28), np.int16), "input", "INT16", "inputs[0].datatype"),
        (np.zeros((1, 1, 28, 28), np.float32), "pixels", "FP32", "inputs[0].name"),
        (np.full((1, 1, 28, 28), 2.0, np.float32), "input", "FP32", "inputs[0]"),
    ],
)
def test_invalid_argument_names_the_field(
    triton: Any, x: np.ndarray, name: str, datatype: str, field: str
) -> None:
    with pytest.raises(InferenceServerException) as exc:
        triton.infer(RCE, [infer_input(x, name, datatype)])
    assert status_of(exc) == "StatusCode.INVALID_ARGUMENT"
    assert _details(exc)["field"] == field


def test_not_found_and_unknown_version(triton: Any) -> None:
    x = np.zeros((1, 1, 28, 28), np.float32)
    with pytest.raises(InferenceServerException) as exc:
        triton.infer("nope", [infer_input(x)])
    assert status_of(exc) == "StatusCode.NOT_FOUND" and "no model named" in _details(exc)["error"]
    with pytest.raises(InferenceServerException) as exc:
        triton.get_model_metadata(RCE, "7")
    assert status_of(exc) == "StatusCode.NOT_FOUND" and _details(exc)["field"] == "version"
    with pytest.raises(InferenceServerException) as exc:
        triton.is_model_ready("nope")
    assert status_of(exc) == "StatusCode.NOT_FOUND"


def test_instance_limit(model_repo: Path) -> None:
    with LiveServer(Settings(model_repository=model_repo, models=[RCE], max_instances=4)) as s:
        c = tritonclient_grpc.InferenceServerClient(s.grpc_target)
        with pytest.raises(InferenceServerException) as exc:
            c.infer(RCE, [infer_input(np.zeros((5, 1, 28, 28), np.float32))])
        c.close()
    assert status_of(exc) == "StatusCode.INVALID_ARGUMENT"
    assert "the limit is 4" in _details(exc)["error"]


def test_keys_from_metadata(model_repo: Path) -> None:
    x = np.zeros((1, 1, 28, 28), np.float32)
    with LiveServer(Settings(model_repository=model_repo, models=[RCE], api_keys=[KEY])) as s:
        c = tritonclient_grpc.InferenceServerClient(s.grpc_target)
        try:
            for headers in (None, {"authorization": "Bearer wrong"}, {"x-api-key": "nope"}):
                with pytest.raises(InferenceServerException) as exc:
                    c.infer(RCE, [infer_input(x)], headers=headers)
                assert status_of(exc) == "StatusCode.UNAUTHENTICATED"
                assert _details(exc)["fix"].startswith("send 'Authorization: Bearer")
            for headers in ({"authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}):
                assert c.infer(RCE, [infer_input(x)], headers=headers).as_numpy("label").shape == (
                    1,
                )
            # Liveness stays open unless protect_health, as over HTTP.
            assert c.is_server_live()
            with pytest.raises(InferenceServerException) as exc:
                c.get_model_metadata(RCE)
            assert status_of(exc) == "StatusCode.UNAUTHENTICATED"
        finally:
            c.close()


def test_deadline_from_the_client(
    server: LiveServer, triton: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow_down(monkeypatch, loaded_model(server), 1.5)
    x = np.zeros((1, 1, 28, 28), np.float32)
    labels = {"protocol": "grpc", "code": "504", "model": RCE}
    n0 = metric(httpx.get(f"{server.url}/metrics").text, "notsure_requests_total", **labels)
    t0 = time.monotonic()
    with pytest.raises(InferenceServerException) as exc:
        triton.infer(RCE, [infer_input(x)], client_timeout=0.3)
    assert status_of(exc) == "StatusCode.DEADLINE_EXCEEDED"
    assert time.monotonic() - t0 < 1.2  # the client's deadline, not the slow batch
    # The server gave up on the call at the same deadline and counted it as a timeout.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        text = httpx.get(f"{server.url}/metrics").text
        if metric(text, "notsure_requests_total", **labels) == n0 + 1:
            break
        time.sleep(0.05)
    assert metric(text, "notsure_requests_total", **labels) == n0 + 1


def test_queue_full_is_resource_exhausted(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(model_repository=model_repo, models=[RCE], inference_threads=1,
                        max_batch_size=8, max_queue_images=8)  # fmt: skip
    x = np.zeros((8, 1, 28, 28), np.float32)
    with LiveServer(settings) as s:
        slow_down(monkeypatch, loaded_model(s), 1.0)
        codes: list[str] = []

        def call() -> None:
            c = tritonclient_grpc.InferenceServerClient(s.grpc_target)
            try:
                c.infer(RCE, [infer_input(x)], client_timeout=30)
                codes.append("OK")
            except InferenceServerException as exc:
                codes.append(str(exc.status()))
                if "RESOURCE_EXHAUSTED" in str(exc.status()):
                    assert "queue full" in json.loads(exc.message())["error"]
            finally:
                c.close()

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        text = httpx.get(f"{s.url}/metrics").text
    # One batch runs, one request waits in the (full) queue, the others are shed.
    assert codes.count("OK") >= 2 and "StatusCode.RESOURCE_EXHAUSTED" in codes, codes
    shed = metric(text, "notsure_requests_total", protocol="grpc", code="503")
    assert shed == codes.count("StatusCode.RESOURCE_EXHAUSTED")
    assert metric(text, "notsure_shed_requests_total", reason="queue_full") == shed


def test_model_not_ready_is_unavailable(writable_repo: Path) -> None:
    (writable_repo / "tiny-ce" / "1" / MODEL_FILE).unlink()
    with LiveServer(Settings(model_repository=writable_repo)) as s:
        c = tritonclient_grpc.InferenceServerClient(s.grpc_target)
        try:
            assert not c.is_server_ready() and not c.is_model_ready("tiny-ce")
            with pytest.raises(InferenceServerException) as exc:
                c.infer("tiny-ce", [infer_input(np.zeros((1, 1, 28, 28), np.float32))])
            assert status_of(exc) == "StatusCode.UNAVAILABLE"
            assert "no ready version" in _details(exc)["error"]
            with grpc.insecure_channel(s.grpc_target) as ch:
                health = health_pb2_grpc.HealthStub(ch)
                got = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                assert got.status == health_pb2.HealthCheckResponse.NOT_SERVING
        finally:
            c.close()


def test_health_checking_and_reflection(server: LiveServer) -> None:
    with grpc.insecure_channel(server.grpc_target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", SERVICE):
            got = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert got.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as exc:
            health.Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=5)
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        answers = refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for a in answers for s in a.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names


def test_stream_answers_each_request_errors_included(stub: Any, model_repo: Path) -> None:
    x = synthetic(2, seed=6).x.numpy()

    def requests() -> Iterator[Any]:
        for model in (RCE, "nope", RCE):
            req = pb.ModelInferRequest(model_name=model, id=model)
            req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
            req.raw_input_contents.append(x.tobytes())
            yield req

    out = list(stub.ModelStreamInfer(requests(), timeout=30))
    assert len(out) == 3
    assert out[0].infer_response.id == RCE and not out[0].error_message
    assert "no model named" in json.loads(out[1].error_message)["error"]
    assert out[2].infer_response.id == RCE
    assert len(out[2].infer_response.outputs) == len(all_outputs(model_repo))


def test_metrics_label_the_protocol(server: LiveServer, triton: Any) -> None:
    before = httpx.get(f"{server.url}/metrics").text
    labels = {"protocol": "grpc", "endpoint": f"/{SERVICE}/ModelInfer", "model": RCE}
    n0 = metric(before, "notsure_requests_total", code="200", **labels)
    triton.infer(RCE, [infer_input(np.zeros((2, 1, 28, 28), np.float32))])
    after = httpx.get(f"{server.url}/metrics").text
    assert metric(after, "notsure_requests_total", code="200", version="1", **labels) == n0 + 1
    assert metric(after, "notsure_request_duration_seconds_count", **labels) >= 1
    assert metric(after, "notsure_requests_total", protocol="http") >= 1  # the scrapes
