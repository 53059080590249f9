"""Server metadata, liveness, readiness (KServe V2 paths) and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service import v2infer
from service.api.deps import StateDep, require_key_for_health, require_key_for_metrics
from service.schemas import V2ServerMetadata

router = APIRouter(tags=["health"])


# The Open Inference Protocol's REST spec names the server metadata `GET /v2/`; Triton and
# tritonclient use `/v2`. Both answer (FastAPI would send a 307 redirect for one of them).
@router.get("/v2", response_model=V2ServerMetadata, dependencies=[Depends(require_key_for_health)])
@router.get(
    "/v2/",
    response_model=V2ServerMetadata,
    dependencies=[Depends(require_key_for_health)],
    include_in_schema=False,
)
async def server_metadata() -> dict[str, Any]:
    return v2infer.server_metadata()


# Liveness and readiness answer with a status and no body: response_class=Response documents
# exactly that (FastAPI's default would promise a JSON body in the OpenAPI schema).
@router.get(
    "/v2/health/live", dependencies=[Depends(require_key_for_health)], response_class=Response
)
async def live() -> Response:
    """200 while the process serves HTTP."""
    return Response(status_code=200)


@router.get(
    "/v2/health/ready",
    dependencies=[Depends(require_key_for_health)],
    response_class=Response,
    responses={503: {"description": "a model failed to load, or the server is draining"}},
)
async def ready(state: StateDep) -> Response:
    """200 when every model version in the repository is loaded and the server is not draining."""
    if state.repository.ready and not state.draining:
        return Response(status_code=200)
    failed = {
        f"{found.name}/{found.version}": found.error or "not loaded"
        for found in state.repository.all()
        if not found.ready
    }
    body: dict[str, Any] = {"error": "not ready", "models": failed}
    if state.draining:
        body["error"] = "shutting down"
    elif not state.repository.versions:
        body["error"] = "no models in the repository"
    return JSONResponse(body, status_code=503)


@router.get("/metrics", dependencies=[Depends(require_key_for_metrics)], response_class=Response)
async def metrics(state: StateDep) -> Response:
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
