"""KServe V2 (Open Inference Protocol) tensors: JSON data and the binary tensor data extension.

Binary extension: the body is a JSON header of `Inference-Header-Content-Length` bytes followed
by the raw little-endian tensors, in input order, each sized by `parameters.binary_data_size`.
Outputs are sent the same way when a request asks for `binary_data` (per output) or
`binary_data_output` (for all).

This is the one implementation of the wire format in the project: the server decodes requests
(`decode`) and encodes responses (`encode`); clients, benchmarks and tests encode requests
(`encode_request`) and decode responses (`decode_response`) with the same code. tritonclient
stays the independent check of all four (tests/service/test_v2codec.py).
"""

from __future__ import annotations

import math
from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from pydantic import ValidationError

from service.errors import InvalidInput
from service.fastjson import validate_json
from service.schemas import V2InferRequest

DTYPES: dict[str, np.dtype[Any]] = {
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "FP16": np.dtype("<f2"),
    "UINT8": np.dtype("u1"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "BOOL": np.dtype("?"),  # one byte per element, as Triton sends it
}
DATATYPE_OF = {dtype: name for name, dtype in DTYPES.items()}
HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class DecodedRequest:
    request: V2InferRequest
    tensors: dict[str, npt.NDArray[Any]]


def dtype_of(datatype: str, field: str) -> np.dtype[Any]:
    """The numpy dtype of a V2 datatype name that the service accepts for pixels."""
    dtype = DTYPES.get(datatype)
    if dtype is None:
        raise InvalidInput(
            f"unsupported datatype {datatype}",
            field=field,
            fix="send FP32 pixels in [0, 1] (or UINT8 0-255)",
        )
    return dtype


# An empty tensor (a zero-length axis) passes the data-size check whatever its other axes say,
# but numpy refuses a shape whose non-zero axes overflow its index type: past this product such
# a shape is refused here, as the client's error. (A non-empty lying shape fails the size check.)
MAX_SHAPE_PRODUCT = 2**40


def element_count(shape: Sequence[int], field: str) -> int:
    if any(d < 0 for d in shape) or len(shape) > 8:
        raise InvalidInput(f"invalid shape {list(shape)}", field=field)
    count = math.prod(shape)
    if count == 0 and math.prod(max(d, 1) for d in shape) > MAX_SHAPE_PRODUCT:
        raise InvalidInput(f"shape {list(shape)} is too large", field=field)
    return count


def from_bytes(
    raw: bytes | memoryview, datatype: str, shape: Sequence[int], field: str
) -> npt.NDArray[Any]:
    """Input `field`'s tensor from raw little-endian bytes (the binary extension, gRPC's
    raw_input_contents); no copy."""
    dtype = dtype_of(datatype, f"{field}.datatype")
    count = element_count(shape, f"{field}.shape")
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(
            f"{len(raw)} bytes of data, shape {list(shape)} of {datatype} needs "
            f"{count * dtype.itemsize}",
            field=field,
        )
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


def from_values(
    values: Sequence[Any], datatype: str, shape: Sequence[int], field: str, data_field: str
) -> npt.NDArray[Any]:
    """Input `field`'s tensor from a flat or nested list of numbers at `data_field` (JSON
    `data`, gRPC typed `contents`)."""
    dtype = dtype_of(datatype, f"{field}.datatype")
    count = element_count(shape, f"{field}.shape")
    try:
        # A number outside the datatype's range (1e10 as FP16) is the client's mistake, not a
        # numpy warning that slips through as inf.
        with np.errstate(over="raise", invalid="raise"):
            arr = np.asarray(values, dtype=dtype).reshape(-1)
    except (ValueError, TypeError, OverflowError, FloatingPointError) as exc:
        raise InvalidInput(f"data is not a list of {datatype} numbers", field=data_field) from exc
    if arr.size != count:
        raise InvalidInput(
            f"data has {arr.size} elements, shape {list(shape)} needs {count}", field=data_field
        )
    return arr.reshape(shape)


def _header_length(raw: str | None, body_len: int) -> int | None:
    if raw is None:
        return None
    try:
        n = int(raw)
    except ValueError as exc:
        raise InvalidInput(
            "Inference-Header-Content-Length is not an integer",
            field="Inference-Header-Content-Length",
        ) from exc
    if not 0 < n <= body_len:
        raise InvalidInput(
            f"Inference-Header-Content-Length {n} is outside the body ({body_len} bytes)",
            field="Inference-Header-Content-Length",
        )
    return n


def decode(body: bytes, header_length: str | None) -> DecodedRequest:
    """Parse a V2 infer request body into its JSON part and numpy tensors."""
    hlen = _header_length(header_length, len(body))
    head, binary = (body, b"") if hlen is None else (body[:hlen], body[hlen:])
    try:
        req = validate_json(V2InferRequest, head)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"])) or "body"
        raise InvalidInput(
            f"invalid inference request: {first['msg']}",
            field=where,
            fix="see the KServe V2 inference request schema",
        ) from exc
    tensors: dict[str, npt.NDArray[Any]] = {}
    offset, view = 0, memoryview(binary)
    for i, t in enumerate(req.inputs):
        field = f"inputs[{i}]"
        dtype = dtype_of(t.datatype, f"{field}.datatype")
        count = element_count(t.shape, f"{field}.shape")
        size = (t.parameters or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size != count * dtype.itemsize:
                raise InvalidInput(
                    f"binary_data_size {size} does not match shape {t.shape} of {t.datatype} "
                    f"({count * dtype.itemsize} bytes)",
                    field=f"{field}.parameters",
                )
            if offset + size > len(binary):
                raise InvalidInput("binary tensor data is shorter than declared", field=field)
            arr = from_bytes(view[offset : offset + size], t.datatype, t.shape, field)
            offset += size
        elif t.data is not None:
            arr = from_values(t.data, t.datatype, t.shape, field, f"{field}.data")
        else:
            raise InvalidInput("input has neither data nor binary_data_size", field=field)
        tensors[t.name] = arr
    if offset != len(binary):
        raise InvalidInput(
            f"{len(binary) - offset} bytes of binary data are not claimed by any input",
            field="body",
        )
    return DecodedRequest(req, tensors)


def _pack(
    tensors: Sequence[tuple[str, npt.NDArray[Any]]], binary: Container[str]
) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Each tensor's JSON entry, with its values as `data` or, when named in `binary`, as a
    little-endian blob after the JSON header."""
    entries, blobs = [], []
    for name, arr in tensors:
        entry: dict[str, Any] = {
            "name": name,
            "datatype": DATATYPE_OF[arr.dtype.newbyteorder("<")],
            "shape": list(arr.shape),
        }
        if name in binary:
            blob = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = arr.reshape(-1).tolist()
        entries.append(entry)
    return entries, blobs


def _frame(header: dict[str, Any], blobs: list[bytes]) -> tuple[bytes, int | None]:
    head = orjson.dumps(header)
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


def encode(
    header: dict[str, Any], outputs: list[tuple[str, npt.NDArray[Any]]], binary: set[str]
) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header's length."""
    entries, blobs = _pack(outputs, binary)
    return _frame({**header, "outputs": entries}, blobs)


def encode_request(
    inputs: Sequence[tuple[str, npt.NDArray[Any]]],
    *,
    outputs: Sequence[str] = (),
    binary_outputs: Container[str] = (),
    binary_inputs: bool = True,
    request_id: str | None = None,
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """An infer request body and its HTTP headers: the inputs as binary data (or JSON `data`),
    the named outputs (all when none), those in `binary_outputs` asked for as binary data."""
    entries, blobs = _pack(inputs, {n for n, _ in inputs} if binary_inputs else ())
    header: dict[str, Any] = {} if request_id is None else {"id": request_id}
    header["inputs"] = entries
    if parameters:
        header["parameters"] = parameters
    if outputs:
        header["outputs"] = [
            {"name": n, "parameters": {"binary_data": True}} if n in binary_outputs else {"name": n}
            for n in outputs
        ]
    body, hlen = _frame(header, blobs)
    if hlen is None:
        return body, {"Content-Type": "application/json"}
    return body, {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(hlen)}


def decode_response(
    body: bytes, header_length: str | int | None
) -> tuple[dict[str, npt.NDArray[Any]], dict[str, Any]]:
    """A response's output tensors by name and its JSON header, from a binary or JSON body.
    ValueError when the body does not hold what its header declares."""
    hlen = None if header_length is None else int(header_length)
    head = body if hlen is None else body[:hlen]
    meta: dict[str, Any] = orjson.loads(head)
    offset, view = len(head), memoryview(body)
    tensors: dict[str, npt.NDArray[Any]] = {}
    for out in meta.get("outputs", []):  # binary outputs follow the header in header order
        dtype, shape = DTYPES[out["datatype"]], list(out["shape"])
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is None:
            tensors[out["name"]] = np.asarray(out["data"], dtype=dtype).reshape(shape)
            continue
        if offset + size > len(body):
            raise ValueError(f"output {out['name']!r} is cut short")
        arr = np.frombuffer(view[offset : offset + size], dtype=dtype).reshape(shape)
        tensors[out["name"]] = arr
        offset += size
    return tensors, meta
