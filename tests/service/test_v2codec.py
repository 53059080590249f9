"""The V2 wire format both ways, checked against tritonclient (an independent implementation)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as triton

from service import v2codec
from service.errors import InvalidInput

OUTPUTS = ("label", "j_score", "probabilities")


def _images(n: int = 3) -> np.ndarray:
    return np.random.default_rng(n).random((n, 1, 28, 28), dtype=np.float32)


@pytest.mark.parametrize("binary", [True, False])
def test_request_decodes_like_tritonclients(binary: bool) -> None:
    x = _images()
    ours, headers = v2codec.encode_request(
        [("input", x)], outputs=OUTPUTS, binary_outputs=("j_score",), binary_inputs=binary,
        request_id="r1",
    )  # fmt: skip
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outs = [triton.InferRequestedOutput(n, binary_data=n == "j_score") for n in OUTPUTS]
    theirs, hlen = triton.InferenceServerClient.generate_request_body([inp], outs, "r1")
    assert (v2codec.HEADER_LENGTH in headers) == binary == (hlen is not None)
    a = v2codec.decode(ours, headers.get(v2codec.HEADER_LENGTH))
    b = v2codec.decode(theirs, None if hlen is None else str(hlen))
    np.testing.assert_array_equal(a.tensors["input"], x)
    np.testing.assert_array_equal(a.tensors["input"], b.tensors["input"])
    assert a.request.id == b.request.id == "r1"

    def asked(d: v2codec.DecodedRequest) -> list[tuple[str, bool]]:
        return [
            (o.name, bool((o.parameters or {}).get("binary_data"))) for o in d.request.outputs or []
        ]

    assert asked(a) == asked(b) == [(n, n == "j_score") for n in OUTPUTS]


@pytest.mark.parametrize("binary", [True, False])
def test_response_reads_the_same_in_tritonclient(binary: bool) -> None:
    rng = np.random.default_rng(1)
    outputs = [
        ("label", np.array([3, -1, 7], np.int64)),
        ("j_score", rng.random(3, dtype=np.float32)),
        ("probabilities", rng.random((3, 10), dtype=np.float32)),
    ]
    header = {"model_name": "m", "model_version": "1", "parameters": {"threshold": 0.25}}
    body, hlen = v2codec.encode(header, outputs, {n for n, _ in outputs} if binary else set())
    assert (hlen is not None) == binary
    theirs = triton.InferResult.from_response_body(body, header_length=hlen)
    tensors, meta = v2codec.decode_response(body, hlen)
    assert meta["parameters"]["threshold"] == theirs.get_response()["parameters"]["threshold"]
    for name, arr in outputs:
        np.testing.assert_array_equal(tensors[name], arr)
        np.testing.assert_array_equal(theirs.as_numpy(name), arr)
        assert tensors[name].dtype == arr.dtype == theirs.as_numpy(name).dtype


def test_binary_request_layout_is_the_protocols() -> None:
    body, headers = v2codec.encode_request([("input", np.zeros((1, 1, 2, 2), np.float32))])
    hlen = int(headers["Inference-Header-Content-Length"])
    assert headers["Content-Type"] == "application/octet-stream"
    assert json.loads(body[:hlen])["inputs"][0]["parameters"]["binary_data_size"] == 16
    assert len(body) == hlen + 16


def test_a_cut_short_response_is_refused() -> None:
    body, hlen = v2codec.encode({}, [("j_score", np.ones(4, np.float32))], {"j_score"})
    with pytest.raises(ValueError, match="cut short"):
        v2codec.decode_response(body[:-1], hlen)


@pytest.mark.parametrize("empty", [[], b""])
def test_an_empty_tensor_with_a_huge_shape_is_the_clients_error(empty: list | bytes) -> None:
    # Zero elements, but numpy cannot even represent the other dimensions' product.
    shape = [0, 1197, 12855149, 74925298]
    with pytest.raises(InvalidInput, match="too large"):
        if isinstance(empty, bytes):
            v2codec.from_bytes(empty, "FP32", shape, "inputs[0]")
        else:
            v2codec.from_values(empty, "FP32", shape, "inputs[0]", "inputs[0].contents")
    # A genuinely empty batch of images is still a well-formed tensor.
    assert v2codec.from_values([], "FP32", [0, 1, 28, 28], "f", "d").shape == (0, 1, 28, 28)
