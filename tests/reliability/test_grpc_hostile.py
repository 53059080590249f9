"""Hostile gRPC clients: bytes that are not protobuf, messages that lie about shapes and types,
oversized messages, and property-based fuzzing of ModelInferRequest. The server never crashes,
never answers INTERNAL/UNKNOWN, and names the problem with the right status code."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from service.config import Settings
from service.v2infer import OUTPUTS
from tests.conftest import LiveServer
from tests.reliability.conftest import RCE

INFER = "/inference.GRPCInferenceService/ModelInfer"
BODY_LIMIT = 256 * 1024
# What a client mistake may be answered with; INTERNAL or UNKNOWN would be a bug here.
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}


@pytest.fixture(scope="module")
def server(model_repo: Path) -> Iterator[LiveServer]:
    settings = Settings(model_repository=model_repo, models=[RCE], max_body_bytes=BODY_LIMIT)
    with LiveServer(settings) as s:
        yield s


@pytest.fixture(scope="module")
def channel(server: LiveServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc_target) as ch:
        yield ch


def _alive(channel: grpc.Channel) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live


def _raw_call(channel: grpc.Channel, method: str, data: bytes) -> grpc.StatusCode:
    """Send bytes as they are (no serializer) and return the status."""
    call = channel.unary_unary(method)  # identity serializers: bytes in, bytes out
    try:
        call(data, timeout=10)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xff\xff\xff",  # a field tag with an invalid wire type
        b"\x0a\xff\xff\xff\xff\x0f",  # a length-delimited field longer than the message
        b"\x0a\x03ab",  # truncated string
        b"\x2a\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",  # varint over 10 bytes
    ],
)
def test_bytes_that_are_not_protobuf_are_invalid_argument(
    channel: grpc.Channel, data: bytes
) -> None:
    call = channel.unary_unary(INFER)
    with pytest.raises(grpc.RpcError) as exc:
        call(data, timeout=10)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    body = json.loads(exc.value.details())
    assert body["field"] == "message" and "ModelInferRequest" in body["fix"]
    _alive(channel)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.binary(max_size=256))
def test_random_bytes_never_crash_the_server(channel: grpc.Channel, data: bytes) -> None:
    for method in (INFER, "/inference.GRPCInferenceService/ModelMetadata"):
        code = _raw_call(channel, method, data)
        # Random bytes may happen to parse (as an empty request, say): then the model named
        # in them is unknown. Either way a client error, never a server fault.
        assert code in CLIENT_ERRORS, (data, code)


def _request(shape: list[int], datatype: str, raw: bytes | None, name: str = "input") -> Any:
    req = pb.ModelInferRequest(model_name=RCE)
    req.inputs.add(name=name, datatype=datatype, shape=shape)
    if raw is not None:
        req.raw_input_contents.append(raw)
    return req


@pytest.mark.parametrize(
    ("req", "field"),
    [
        (_request([1, 1, 28, 28], "FP32", b"\0" * 100), "inputs[0]"),  # fewer bytes than shape
        (_request([2**40, 2**40], "FP32", b"\0" * 4), "inputs[0]"),  # a lying shape
        (_request([-1, 1, 28, 28], "FP32", b""), "inputs[0].shape"),
        (_request([1] * 9, "FP32", b"\0" * 4), "inputs[0].shape"),
        (_request([1, 1, 28, 28], "BYTES", b"\0" * 3136), "inputs[0].datatype"),
        (_request([1, 1, 28, 28], "FP32", None), "inputs[0].contents"),  # no data at all
        (_request([1, 3, 28, 28], "FP32", b"\0" * 9408), "inputs[0]"),  # 3 channels, not 1
    ],
)
def test_lying_shapes_and_datatypes_are_invalid_argument(
    channel: grpc.Channel, req: Any, field: str
) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    with pytest.raises(grpc.RpcError) as exc:
        stub.ModelInfer(req, timeout=10)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.value.details()
    assert json.loads(exc.value.details())["field"] == field


def test_typed_values_outside_the_datatype_are_invalid_argument(channel: grpc.Channel) -> None:
    # Found by the fuzzer below: 1e10 as FP16 overflowed inside numpy (a 500 under -W error).
    req = _request([1, 1, 28, 28], "FP16", None)
    req.inputs[0].contents.fp32_contents.extend([1e10] * 784)
    with pytest.raises(grpc.RpcError) as exc:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=10)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert json.loads(exc.value.details())["field"] == "inputs[0].contents"


def test_two_raw_blobs_for_one_input(channel: grpc.Channel) -> None:
    req = _request([1, 1, 28, 28], "FP32", b"\0" * 3136)
    req.raw_input_contents.append(b"\0" * 3136)
    with pytest.raises(grpc.RpcError) as exc:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=10)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert json.loads(exc.value.details())["field"] == "raw_input_contents"


def test_oversized_message_is_resource_exhausted(channel: grpc.Channel) -> None:
    n = BODY_LIMIT // 3136 + 1  # one image more than the body limit holds
    x = np.zeros((n, 1, 28, 28), np.float32)
    req = _request(list(x.shape), "FP32", x.tobytes())
    with pytest.raises(grpc.RpcError) as exc:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=10)
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    _alive(channel)
    # Just under the limit is served.
    fits = np.zeros((n - 2, 1, 28, 28), np.float32)
    req = _request(list(fits.shape), "FP32", fits.tobytes())
    resp = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=30)
    assert list(resp.outputs[0].shape) == [n - 2]


DATATYPES = st.sampled_from(["FP32", "FP64", "FP16", "UINT8", "INT32", "INT64", "BOOL", "", "X"])


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    shape=st.lists(st.integers(min_value=-2, max_value=2**33), max_size=10),
    datatype=DATATYPES,
    raw=st.one_of(st.none(), st.binary(max_size=4096)),
    floats=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=64),
    name=st.sampled_from(["input", "x", ""]),
    version=st.sampled_from(["", "1", "2", "0", "-1", "abc", "99999999999"]),
    outputs=st.lists(st.sampled_from(["label", "j_score", "nope", ""]), max_size=3),
)
def test_fuzzed_infer_requests_get_a_client_status(
    channel: grpc.Channel,
    shape: list[int],
    datatype: str,
    raw: bytes | None,
    floats: list[float],
    name: str,
    version: str,
    outputs: list[str],
) -> None:
    req = pb.ModelInferRequest(model_name=RCE, model_version=version)
    try:
        t = req.inputs.add(name=name, datatype=datatype, shape=shape)
    except ValueError:  # a dimension outside int64: the client library refuses it already
        return
    if raw is not None:
        req.raw_input_contents.append(raw)
    else:
        t.contents.fp32_contents.extend(floats)
    for o in outputs:
        req.outputs.add(name=o)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    try:
        resp = stub.ModelInfer(req, timeout=30)
    except grpc.RpcError as exc:
        assert exc.code() in CLIENT_ERRORS, (exc.code(), exc.details())
        assert "Traceback" not in (exc.details() or "")
        return
    # Served: then the request really was a valid batch of the model's shape.
    assert shape[1:] == [1, 28, 28] and name == "input" and version in ("", "1")
    assert [o.name for o in resp.outputs] == (outputs or list(OUTPUTS))
