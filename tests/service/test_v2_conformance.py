"""The HTTP routes against the Open Inference Protocol's REST specification
(kserve/open-inference-protocol, open_inference_rest.yaml), where it differs from FastAPI's
defaults: the response `id` is a string (absent when the request had none), malformed requests
are 400 (Triton's answer too), `/v2` is the server metadata, inputs are the model's own.
The native /v1 API keeps its own conventions (422 for a malformed field)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from notsure import __version__
from tests.reliability.conftest import RCE, pixels, v2_binary

INFER = f"/v2/models/{RCE}/infer"


def _json_body(x: np.ndarray, name: str = "input", **extra: object) -> dict[str, object]:
    tensor = {"name": name, "shape": list(x.shape), "datatype": "FP32"}
    return {"inputs": [{**tensor, "data": x.reshape(-1).tolist()}], **extra}


def test_response_has_no_id_when_the_request_had_none(client: TestClient) -> None:
    x = pixels(2)
    r = client.post(INFER, json=_json_body(x))
    assert r.status_code == 200, r.text
    assert "id" not in r.json()
    body, headers = v2_binary(x)  # no id in the binary request's header either
    r = client.post(INFER, content=body, headers=headers)
    assert r.status_code == 200 and "id" not in r.json()
    # ...and echoes it, a string, when there was one.
    r = client.post(INFER, json=_json_body(x, id="req-1"))
    assert r.json()["id"] == "req-1"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"inputs": [{"name": "input", "shape": [1, 1, 28, 28]}]}, "inputs.0.datatype"),
        ({"inputs": "not a list"}, "inputs"),
        (_json_body(pixels(1)) | {"parameters": {"threshold": "high"}}, "parameters.threshold"),
        (
            {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, 1, 28, 28],
                        "datatype": "FP16",
                        "data": [1e10] * 784,
                    }
                ]
            },
            "inputs[0].data",  # outside FP16's range
        ),
    ],
)
def test_malformed_v2_requests_are_400_native_stays_422(
    client: TestClient, body: dict[str, object], field: str
) -> None:
    r = client.post(INFER, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["field"] == field and r.json()["error"]
    # The same kind of mistake on the native API: FastAPI's 422, as before.
    r = client.post(f"/v1/models/{RCE}/predict", json={"instances": "not a list"})
    assert r.status_code == 422


def test_v2_path_errors_are_400(client: TestClient) -> None:
    # A model name outside the allowed pattern fails FastAPI's path validation. The protocol
    # answers a failed metadata or inference request with an HTTP error status, "typically
    # 400", and a body holding "error".
    for path in ("/v2/models/UPPER", "/v2/models/UPPER/ready", "/v2/models/UPPER/versions/1"):
        r = client.get(path)
        assert r.status_code == 400, (path, r.status_code)
        assert r.json()["field"] == "path.name" and r.json()["error"]
    # The native API keeps its own conventions: FastAPI's 422 for the same bad name, and 404
    # for a path it does not have (it has no per-model GET route).
    assert client.post("/v1/models/UPPER/predict", json={"instances": []}).status_code == 422
    assert client.get("/v1/models/UPPER").status_code == 404


def test_v2_slash_is_the_server_metadata(client: TestClient) -> None:
    want = {
        "name": "notsure",
        "version": __version__,
        "extensions": [
            "binary_tensor_data",
            "model_repository",
            "model_configuration",
            "statistics",
        ],
    }
    for path in ("/v2", "/v2/"):
        r = client.get(path, follow_redirects=False)
        assert r.status_code == 200, (path, r.status_code)
        assert r.json() == want


def test_unknown_input_name_is_400_naming_the_field(client: TestClient) -> None:
    r = client.post(INFER, json=_json_body(pixels(1), name="images"))
    assert r.status_code == 400, r.text
    assert r.json()["field"] == "inputs[0].name"
    assert "'images'" in r.json()["error"] and '"input"' in r.json()["fix"]
    # Binary requests go through the same check.
    body, headers = v2_binary(pixels(1))
    head_len = int(headers["Inference-Header-Content-Length"])
    head = json.loads(body[:head_len])
    head["inputs"][0]["name"] = "x"
    raw = json.dumps(head).encode()
    r = client.post(
        INFER,
        content=raw + body[head_len:],
        headers={**headers, "Inference-Header-Content-Length": str(len(raw))},
    )
    assert r.status_code == 400 and r.json()["field"] == "inputs[0].name"
