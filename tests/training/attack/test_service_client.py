"""The attack tool's V2 codec against the service's codec (an independent implementation)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service import v2codec
from training.attack.service_client import HEADER, OUTPUTS, decode_response, encode_request


def test_request_is_what_the_service_decodes() -> None:
    x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    body, head_len = encode_request(x)
    decoded = v2codec.decode(body, str(head_len))
    np.testing.assert_array_equal(decoded.tensors["input"], x)
    assert [o.name for o in decoded.request.outputs or []] == list(OUTPUTS)
    assert all((o.parameters or {}).get("binary_data") for o in decoded.request.outputs or [])


@pytest.mark.parametrize("binary", [True, False])
def test_response_from_the_service_codec_decodes(binary: bool) -> None:
    rng = np.random.default_rng(1)
    outputs = [
        ("label", np.array([3, -1, 7], np.int64)),
        ("j_score", rng.random(3, dtype=np.float32)),
        ("confidence", rng.random(3, dtype=np.float32)),
        ("non_me", rng.random(3, dtype=np.float32)),
        ("probabilities", rng.random((3, 10), dtype=np.float32)),
    ]
    header = {"model_name": "m", "model_version": "1", "parameters": {"threshold": 0.25}}
    body, hlen = v2codec.encode(header, outputs, {n for n, _ in outputs} if binary else set())
    assert (hlen is not None) == binary
    tensors, meta = decode_response(body, hlen)
    assert meta["parameters"]["threshold"] == 0.25
    for name, arr in outputs:
        np.testing.assert_array_equal(tensors[name], arr)
        assert tensors[name].dtype == arr.dtype


def test_header_name_is_the_protocol_one() -> None:
    # KServe V2 binary extension; HTTP header names are case-insensitive.
    assert HEADER.lower() == "inference-header-content-length"
    body, hlen = encode_request(np.zeros((1, 1, 2, 2), np.float32))
    assert json.loads(body[:hlen])["inputs"][0]["parameters"]["binary_data_size"] == 16
