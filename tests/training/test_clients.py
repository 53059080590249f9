"""The service clients against a live server: the gRPC client gives the same Decisions as the
HTTP client and as the ONNX file scored in-process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from service.config import Settings
from service.manifest import MANIFEST_FILE, Manifest
from tests.conftest import LiveServer, free_port
from training.clients import OUTPUTS, GrpcClient, ServiceError, V2Client, target_of
from training.data import synthetic
from training.validator.scorers import OfflineScorer

RCE = "tiny-rce"
KEY = "k3y"


@pytest.fixture(scope="module")
def server(model_repo: Path) -> Iterator[LiveServer]:
    with LiveServer(Settings(model_repository=model_repo, api_keys=[KEY])) as s:
        yield s


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("127.0.0.1:9001", "127.0.0.1:9001"),
        ("grpc://10.0.0.5:9001", "10.0.0.5:9001"),
        ("http://127.0.0.1:8000", "127.0.0.1:8001"),
        ("https://svc.example", "svc.example:8001"),
        ("grpc://[::1]:9001", "[::1]:9001"),
    ],
)
def test_target_of(url: str, target: str) -> None:
    assert target_of(url) == target


def test_same_decisions_as_http_and_offline(server: LiveServer, model_repo: Path) -> None:
    x = synthetic(40, seed=11).x.numpy()
    g = GrpcClient(f"grpc://{server.grpc_target}", RCE, 1, timeout_s=30, api_key=KEY)
    h = V2Client(server.url, RCE, 1, timeout_s=30, api_key=KEY)
    try:
        g.wait_ready(10)
        meta = g.metadata()
        assert meta["name"] == RCE and meta["inputs"][0]["shape"] == [-1, 1, 28, 28]
        over_grpc, over_http = g.infer(x), h.infer(x)
    finally:
        g.close()
        h.close()
    vdir = model_repo / RCE / "1"
    offline = OfflineScorer(vdir, Manifest.load(vdir / MANIFEST_FILE)).infer(x)
    for name in OUTPUTS:
        np.testing.assert_array_equal(getattr(over_grpc, name), getattr(over_http, name), name)
        np.testing.assert_allclose(getattr(over_grpc, name), getattr(offline, name),
                                   rtol=1e-5, atol=1e-6, err_msg=name)  # fmt: skip
    assert over_grpc.threshold == over_http.threshold == pytest.approx(offline.threshold)
    assert over_grpc.refused.any() or not offline.refused.any()


def test_errors_are_service_errors(server: LiveServer) -> None:
    x = np.zeros((1, 1, 28, 28), np.float32)
    for client, needle in [
        (GrpcClient(server.grpc_target, RCE, retries=0), "UNAUTHENTICATED"),
        (GrpcClient(server.grpc_target, "nope", api_key=KEY, retries=0), "NOT_FOUND"),
    ]:
        with pytest.raises(ServiceError, match=needle):
            client.infer(x)
        client.close()
    dead = GrpcClient(f"127.0.0.1:{free_port()}", RCE, timeout_s=0.5, retries=1)
    with pytest.raises(ServiceError, match="not ready"):
        dead.wait_ready(1.0)
    with pytest.raises(ServiceError, match="UNAVAILABLE"):
        dead.infer(x)
    dead.close()
