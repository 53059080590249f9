"""The service's exception tree. One handler (service.main) maps it to HTTP responses.

    ServeError                      base; never raised itself
    ├── ClientError                 4xx: the request must change
    │   ├── InvalidInput            422: a field is malformed (names the field and the fix)
    │   ├── PayloadTooLarge         413: body or instance count over a limit
    │   ├── Unauthorized            401: missing or unknown API key
    │   └── ModelNotFound           404: unknown model name or version
    ├── ModelNotReady               503: known model that failed to load or is not loaded yet
    ├── Overloaded                  503 + Retry-After: the batching queue is full
    ├── DeadlineExceeded            504: waited in the queue past the request timeout
    ├── ShuttingDown                503: the server is draining
    └── InferenceFailed             500: onnxruntime raised while running a batch

Error bodies are `{"error": message, "field": ..., "fix": ...}`: "error" is what the KServe V2
protocol (and tritonclient) reads; no stack traces or file paths ever appear in them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class ServeError(Exception):
    """Base of every error the service turns into an HTTP response."""

    status_code = 500

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


class PayloadTooLarge(ClientError):
    status_code = 413


class Unauthorized(ClientError):
    status_code = 401

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="notsure"'}


class ModelNotFound(ClientError):
    status_code = 404


class ModelNotReady(ServeError):
    status_code = 503


class Overloaded(ServeError):
    status_code = 503

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, fix=f"retry after {retry_after_s} s or reduce the request rate")
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class DeadlineExceeded(ServeError):
    status_code = 504


class ShuttingDown(ServeError):
    status_code = 503

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
