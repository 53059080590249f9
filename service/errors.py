"""The service's exception tree. One handler (service.api.handlers) maps it to HTTP responses;
the gRPC servicer answers each with its `grpc_code`.

    ServeError                      base; never raised itself              HTTP   gRPC
    ├── ClientError                 the request must change                4xx
    │   ├── InvalidInput            a field is malformed (names the field  422*   INVALID_ARGUMENT
    │   │                           and the fix)
    │   ├── PayloadTooLarge         body or instance count over a limit    413    INVALID_ARGUMENT
    │   ├── Unauthorized            missing or unknown API key             401    UNAUTHENTICATED
    │   ├── ModelNotFound           unknown model name or version          404    NOT_FOUND
    │   ├── ControlDisabled         a model load/unload request under      400    FAILED_
    │   │                           model_control none or poll                    PRECONDITION
    │   └── ModelLoadFailed         a requested load left a version of the 400    FAILED_
    │                               model refused (its files say why)             PRECONDITION
    ├── ModelNotReady               known model that failed to load or is  503    UNAVAILABLE
    │                               not loaded yet
    ├── Overloaded                  the batching queue is full             503    RESOURCE_EXHAUSTED
    │                               (+ Retry-After)
    ├── DeadlineExceeded            waited in the queue past the request   504    DEADLINE_EXCEEDED
    │                               timeout (or the client's gRPC deadline)
    ├── ShuttingDown                the server is draining                 503    UNAVAILABLE
    └── InferenceFailed             onnxruntime raised while running a     500    INTERNAL
                                    batch

* 400 on the KServe V2 routes, as the Open Inference Protocol's REST spec (and Triton) answer.

Error bodies are `{"error": message, "field": ..., "fix": ...}`: "error" is what the KServe V2
protocol (and tritonclient) reads; gRPC statuses carry the same JSON as their details. No stack
traces or file paths ever appear in them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any


class ServeError(Exception):
    """Base of every error the service turns into an HTTP response."""

    status_code = 500
    grpc_code = "INTERNAL"  # a grpc.StatusCode name; errors.py does not import grpc

    def __init__(self, message: str, *, field: str | None = None, fix: str | None = None) -> None:
        super().__init__(message)
        self.message, self.field, self.fix = message, field, fix

    def body(self) -> dict[str, str]:
        out = {"error": self.message}
        if self.field:
            out["field"] = self.field
        if self.fix:
            out["fix"] = self.fix
        return out

    def headers(self) -> dict[str, str]:
        return {}


class ClientError(ServeError):
    status_code = 400


class InvalidInput(ClientError):
    status_code = 422
    grpc_code = "INVALID_ARGUMENT"


class PayloadTooLarge(ClientError):
    status_code = 413
    grpc_code = "INVALID_ARGUMENT"


class Unauthorized(ClientError):
    status_code = 401
    grpc_code = "UNAUTHENTICATED"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="notsure"'}


class ModelNotFound(ClientError):
    status_code = 404
    grpc_code = "NOT_FOUND"


class ControlDisabled(ClientError):
    grpc_code = "FAILED_PRECONDITION"


class ModelLoadFailed(ClientError):
    grpc_code = "FAILED_PRECONDITION"


class ModelNotReady(ServeError):
    status_code = 503
    grpc_code = "UNAVAILABLE"


class Overloaded(ServeError):
    status_code = 503
    grpc_code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, fix=f"retry after {retry_after_s} s or reduce the request rate")
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class DeadlineExceeded(ServeError):
    status_code = 504
    grpc_code = "DEADLINE_EXCEEDED"


class ShuttingDown(ServeError):
    status_code = 503
    grpc_code = "UNAVAILABLE"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1", "Connection": "close"}


class InferenceFailed(ServeError):
    status_code = 500


def invalid_input_from(errors: Sequence[Mapping[str, Any]]) -> InvalidInput:
    """Pydantic's validation errors (FastAPI's or our own parsing) -> one InvalidInput naming
    the first bad field and how to fix it."""
    first: Mapping[str, Any] = errors[0] if errors else {"loc": ("body",), "msg": "invalid"}
    msg = str(first.get("msg", "invalid value"))
    kind = str(first.get("type", ""))
    loc = tuple(first.get("loc", ()))
    if kind == "json_invalid":  # FastAPI's loc is ("body", <character offset>)
        field = "body"
        if len(loc) > 1:
            msg = f"{msg} at character {loc[-1]}"
    else:
        field = ".".join(str(p) for p in loc if p != "body") or "body"
    fix = {
        "json_invalid": "send a valid JSON body",
        "missing": "add this field",
        "extra_forbidden": "remove this field",
    }.get(kind, "see the OpenAPI schema at /docs")
    return InvalidInput(f"{field}: {msg}", field=field, fix=fix)


def v2_status(exc: ServeError) -> int:
    """The status of an error on the Open Inference Protocol (the HTTP V2 routes, and the
    `code` label of gRPC requests): a malformed request is 400 there, as Triton answers; the
    native API keeps FastAPI's 422 (`status_code`)."""
    return 400 if isinstance(exc, InvalidInput) else exc.status_code


def log_level(status: int) -> int:
    """The level a request that ended with this status is logged at, whatever its transport:
    client errors at INFO; sheds and timeouts (503/504: load, not faults) at WARNING, so an
    overload does not flood the error log; other 5xx at ERROR."""
    if status < 500:
        return logging.INFO
    return logging.WARNING if status in (503, 504) else logging.ERROR
