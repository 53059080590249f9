"""Access logs as JSON lines with the request id, over HTTP and gRPC (`access_log` setting)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.config import Settings
from tests.conftest import LiveServer

ROOT = Path(__file__).resolve().parents[2]
MODEL = "mnist-resnet32-rce"


def lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "notsure.access"]


def test_every_request_is_one_json_line(caplog: pytest.LogCaptureFixture) -> None:
    import tritonclient.grpc as grpcclient

    caplog.set_level(logging.INFO, logger="notsure.access")
    settings = Settings(model_repository=ROOT / "models", models=[MODEL], device="cpu",
                        access_log=True)  # fmt: skip
    x = np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)
    with LiveServer(settings) as server:
        ok = httpx.post(f"{server.url}/v1/models/{MODEL}/predict", headers={"x-request-id": "a-1"},
                        json={"instances": x[:, 0].tolist()})  # fmt: skip
        missing = httpx.post(f"{server.url}/v1/models/nope/predict", json={"instances": []})
        client = grpcclient.InferenceServerClient(server.grpc_target)
        inp = grpcclient.InferInput("input", [1, 1, 28, 28], "FP32")
        inp.set_data_from_numpy(x)
        client.infer(MODEL, [inp], headers={"x-request-id": "g-7"})
        client.close()
    assert ok.status_code == 200 and missing.status_code == 404
    got = lines(caplog)
    by_id = {str(line["request_id"]): line for line in got}
    assert by_id["a-1"]["status"] == 200 and by_id["a-1"]["protocol"] == "http"
    assert by_id["a-1"]["path"] == f"/v1/models/{MODEL}/predict"
    assert by_id["a-1"]["model"] == MODEL and by_id["a-1"]["version"] == "1"
    assert float(by_id["a-1"]["duration_ms"]) > 0  # type: ignore[arg-type]
    (gone,) = [line for line in got if line["status"] == 404]
    assert gone["request_id"] == missing.headers["x-request-id"] and gone["model"] is None
    g = by_id["g-7"]
    assert (g["protocol"], g["status"], g["model"]) == ("grpc", 200, MODEL)
    assert g["path"] == "/inference.GRPCInferenceService/ModelInfer"
