"""HTTP answers for exceptions: the service's one mapping of errors to responses.

`service.main` registers these with FastAPI; they answer every route's errors, the inference
routes' (`service.api.routing`) included.
"""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from service.api.deps import CALL_KEY
from service.errors import ServeError, invalid_input_from, v2_status

log = logging.getLogger(__name__)
V2_PREFIX = "/v2"


def http_status(exc: ServeError, path: str) -> int:
    """The status of an error on this path: the Open Inference Protocol's on the V2 routes
    (400 for a malformed request), the error's own on the native API (FastAPI's 422)."""
    return v2_status(exc) if path.startswith(V2_PREFIX) else exc.status_code


def validation_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's request validation -> one message naming the field and the fix."""
    assert isinstance(exc, RequestValidationError)
    err = invalid_input_from(exc.errors())
    return JSONResponse(err.body(), status_code=http_status(err, request.url.path))


def serve_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServeError)
    return JSONResponse(
        exc.body(), status_code=http_status(exc, request.url.path), headers=exc.headers()
    )


def http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own errors (unknown path, wrong method, a body json.loads cannot parse, e.g.
    nested deeper than its recursion limit) in the same {"error", "field", "fix"} shape."""
    assert isinstance(exc, HTTPException)
    body = {"error": str(exc.detail), "fix": "see the OpenAPI schema at /docs"}
    if exc.status_code == 400:
        body.update(field="body", fix="send valid JSON nested no deeper than the schema")
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


def client_gone(request: Request, exc: Exception) -> Response:
    """The client hung up before its body arrived: no one to answer, and not our bug. 499
    (nginx's "client closed request") keeps it out of the 5xx rate, the alert and the error log."""
    return Response(status_code=499)


def unexpected(request: Request, exc: Exception) -> JSONResponse:
    call = request.scope.get(CALL_KEY)
    rid = call.request_id if call is not None else ""
    log.exception("unhandled error (request id %s)", rid)
    return JSONResponse(
        {"error": "internal error; this is a bug in notsure", "request_id": rid}, status_code=500
    )
