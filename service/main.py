"""Builds the FastAPI app: `create_app(settings)`; models load in the lifespan, not at import."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from notsure import __version__
from service.api.deps import AppState
from service.api.routes import health, native, v2
from service.batching import ArrivalTracker
from service.config import Settings, get_settings
from service.errors import ServeError, invalid_input_from
from service.metrics import Metrics
from service.middleware import ServiceMiddleware
from service.repository import Repository
from service.schemas import PredictRequest, V2InferRequest, component_schemas
from service.security import KeyRing

log = logging.getLogger(__name__)


def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's request validation -> one message naming the field and the fix."""
    assert isinstance(exc, RequestValidationError)
    err = invalid_input_from(exc.errors())
    return JSONResponse(err.body(), status_code=err.status_code)


def _serve_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServeError)
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers())


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own errors (unknown path, wrong method, a body json.loads cannot parse, e.g.
    nested deeper than its recursion limit) in the same {"error", "field", "fix"} shape."""
    assert isinstance(exc, HTTPException)
    body = {"error": str(exc.detail), "fix": "see the OpenAPI schema at /docs"}
    if exc.status_code == 400:
        body.update(field="body", fix="send valid JSON nested no deeper than the schema")
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


def _client_gone(request: Request, exc: Exception) -> Response:
    """The client hung up before its body arrived: no one to answer, and not our bug. 499
    (nginx's "client closed request") keeps it out of the 5xx rate, the alert and the error log."""
    return Response(status_code=499)


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    rid = request.scope.get("notsure.request_id", "")
    log.exception("unhandled error (request id %s)", rid)
    return JSONResponse(
        {"error": "internal error; this is a bug in notsure", "request_id": rid}, status_code=500
    )


def _publish_body_schemas(app: FastAPI) -> None:
    """Routes that parse their own bodies reference nested models as components: add them."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(
                component_schemas(PredictRequest, V2InferRequest)
            )
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings | None = None) -> FastAPI:
    """The ASGI app for these settings (get_settings() when None)."""
    settings = settings or get_settings()
    metrics = Metrics()
    executor = ThreadPoolExecutor(settings.inference_threads, thread_name_prefix="infer")
    arrivals = ArrivalTracker()
    state = AppState(
        settings=settings,
        metrics=metrics,
        repository=Repository(settings, metrics, executor, arrivals),
        keys=KeyRing(settings.api_keys, settings.api_keys_file),
        arrivals=arrivals,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(state.repository.load_all)
        yield
        # uvicorn has stopped accepting connections and let in-flight requests finish; drain
        # whatever is still queued before the process exits.
        state.draining = True
        await state.repository.close()
        executor.shutdown(wait=True)

    app = FastAPI(
        title="notsure",
        version=__version__,
        summary="Image classification that answers NOT SURE when the J-score is below T.",
        lifespan=lifespan,
        # FastAPI's built-in OpenTelemetry hooks look up the global providers on every request;
        # the service reports through Prometheus, so they stay off unless asked for.
        telemetry={
            "tracing": settings.opentelemetry,
            "metrics": settings.opentelemetry,
            "logs": settings.opentelemetry,
        },
    )
    app.state.notsure = state
    _publish_body_schemas(app)
    app.include_router(health.router)
    app.include_router(native.router)
    app.include_router(v2.router)
    app.add_exception_handler(ServeError, _serve_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _unexpected)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
        )
    app.add_middleware(ServiceMiddleware, state=state)
    return app
