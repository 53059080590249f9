"""The gRPC messages of the Open Inference Protocol, to and from what the HTTP route's steps
take: request tensors (raw or typed contents) through the same decoder as HTTP, infer
responses as raw little-endian outputs, request bytes that do not parse kept as `Malformed`
(the client's mistake, not an INTERNAL error), and the repository requests' name check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb

from service import v2codec, v2infer
from service.errors import InvalidInput

# Typed `contents` field of each datatype the decoder accepts; FP16 travels only as raw bytes.
CONTENTS = {
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
}


@dataclass(frozen=True)
class Malformed:
    """A request whose bytes do not parse as the method's message (see `register`)."""

    reason: str


def lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """The generated parser, returning Malformed instead of raising: grpc answers a parser
    exception with INTERNAL, but bytes that are not the message are the client's mistake."""

    def parse_or_mark(raw: bytes) -> Any:
        try:
            return parse(raw)
        except (DecodeError, ValueError, RuntimeError) as exc:
            return Malformed(str(exc) or type(exc).__name__)

    return parse_or_mark


class Captured:
    """Stands in for a server to receive the generated method table."""

    handlers: dict[str, Any]

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.handlers = handlers


def check_parsed(request: Any, method: str) -> None:
    if isinstance(request, Malformed):
        raise InvalidInput(
            f"the request is not a valid {method}Request message: {request.reason}",
            field="message",
            fix=f"send a serialized inference.{method}Request (grpc_service.proto)",
        )


def param(p: Any) -> Any:
    """An InferParameter's value (its oneof)."""
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def inputs(req: Any) -> list[tuple[str, npt.NDArray[Any]]]:
    """The request's tensors, from `raw_input_contents` (one blob per input) or typed
    `contents`, through the same decoder as the HTTP route."""
    raw = req.raw_input_contents
    if raw and len(raw) != len(req.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(req.inputs)} inputs",
            field="raw_input_contents",
            fix="send one raw blob per input, or typed contents for every input",
        )
    out = []
    for i, t in enumerate(req.inputs):
        field, shape = f"inputs[{i}]", list(t.shape)
        if raw:
            arr = v2codec.from_bytes(raw[i], t.datatype, shape, field)
        else:
            v2codec.dtype_of(t.datatype, f"{field}.datatype")
            values = getattr(t.contents, CONTENTS.get(t.datatype, "fp32_contents"))
            arr = v2codec.from_values(values, t.datatype, shape, field, f"{field}.contents")
        out.append((t.name, arr))
    return out


def infer_response(model_name: str, version: int, req: Any, answer: v2infer.Answer) -> Any:
    """Outputs as raw little-endian bytes (as Triton answers; tritonclient reads only those)."""
    resp = pb.ModelInferResponse(model_name=model_name, model_version=str(version), id=req.id)
    resp.parameters["threshold"].double_param = answer.threshold
    resp.parameters["score"].string_param = answer.score
    resp.parameters["calibrated"].bool_param = answer.calibrated
    if answer.certify_eps is not None:
        resp.parameters["certify_eps"].double_param = answer.certify_eps
    for name, arr in answer.outputs:
        resp.outputs.add(name=name, datatype=v2codec.DATATYPE_OF[arr.dtype], shape=list(arr.shape))
        resp.raw_output_contents.append(
            np.ascontiguousarray(arr, arr.dtype.newbyteorder("<")).tobytes()
        )
    return resp


def one_repository(name: str) -> None:
    """The server has one repository, unnamed: a request may name none."""
    if name:
        raise InvalidInput(
            f"no repository named {name!r}: this server has one model repository",
            field="repository_name",
            fix="leave repository_name empty",
        )
