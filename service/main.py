"""Builds the FastAPI app: `create_app(settings)`; models load in the lifespan, not at import."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from service.api import handlers
from service.api.routes import health, native, repository, ui, v2
from service.batch_plan import ArrivalTracker
from service.config import Settings, get_settings
from service.errors import ServeError
from service.metrics import Metrics
from service.middleware import ServiceMiddleware
from service.model_control import ModelControl
from service.monitor import Monitor
from service.repository import Repository
from service.runtime import single_threaded_blas
from service.schemas import PredictRequest, V2InferRequest, component_schemas
from service.security import KeyRing
from service.state import AppState
from service.tracing import Tracing
from service.version import service_version

log = logging.getLogger(__name__)


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
    metrics = Metrics(multiprocess_dir=settings.metrics_dir)
    executor = ThreadPoolExecutor(settings.inference_threads, thread_name_prefix="infer")
    arrivals = ArrivalTracker()
    repo = Repository(settings, metrics, executor, arrivals)
    monitor = Monitor(settings, metrics)
    state = AppState(
        settings=settings,
        metrics=metrics,
        repository=repo,
        control=ModelControl(settings, repo, monitor),
        keys=KeyRing(settings.api_keys, settings.api_keys_file),
        arrivals=arrivals,
        monitor=monitor,
        tracing=Tracing() if settings.tracing else None,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        single_threaded_blas()
        await asyncio.to_thread(state.repository.load_all)
        state.monitor.start(state.repository)
        state.control.start()
        yield
        # uvicorn has stopped accepting connections and let in-flight requests finish; drain
        # whatever is still queued before the process exits.
        state.draining = True
        await state.control.close()
        await state.repository.close()
        await state.monitor.close()
        executor.shutdown(wait=True)

    app = FastAPI(
        title="notsure",
        version=service_version(),
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
    # The inference routes are the app's own routes, tried first: matching a request against an
    # included router took 130-240 us (FastAPI builds each included route's context), against
    # the routes themselves 37-50 us (contended CPU).
    app.router.routes[:0] = [*native.inference.routes, *v2.inference.routes]
    app.include_router(health.router)
    app.include_router(native.router)
    app.include_router(v2.router)
    app.include_router(repository.router)
    app.include_router(ui.router)
    app.include_router(ui.page)
    app.add_exception_handler(ServeError, handlers.serve_error)
    app.add_exception_handler(RequestValidationError, handlers.validation_error)
    app.add_exception_handler(HTTPException, handlers.http_error)
    app.add_exception_handler(ClientDisconnect, handlers.client_gone)
    app.add_exception_handler(Exception, handlers.unexpected)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
        )
    app.add_middleware(ServiceMiddleware, state=state)
    return app
