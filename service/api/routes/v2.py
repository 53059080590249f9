"""KServe V2 / Open Inference Protocol: metadata, readiness and infer (JSON or binary), and
Triton's model configuration and statistics extensions."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from service import v2codec, v2extensions, v2infer
from service.api.deps import NAME, VERSION, CallDep, StateDep, require_key
from service.api.routing import add_inference_route
from service.call import Call
from service.inference import admit, resolve
from service.schemas import (
    API_ERRORS,
    V2InferRequest,
    V2InferResponse,
    V2ModelMetadata,
    V2Statistics,
    body_schema,
)
from service.state import AppState

router = APIRouter(
    prefix="/v2", tags=["kserve-v2"], dependencies=[Depends(require_key)], responses=API_ERRORS
)
# The inference routes, with the same prefix, tags and guard; the app puts them first among
# its own routes (service.main).
inference = APIRouter(
    prefix="/v2", tags=["kserve-v2"], dependencies=[Depends(require_key)], responses=API_ERRORS
)

INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": body_schema(V2InferRequest)},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "binary tensor data extension: a JSON header of "
                "Inference-Header-Content-Length bytes, then the raw tensors",
            },
        },
    }
}


# Before /models/{name}: "stats" here is not a model name.
@router.get("/models/stats", response_model=V2Statistics)
async def all_stats(call: CallDep, state: StateDep) -> dict[str, Any]:
    """Statistics of every ready version of every model (Triton's statistics extension)."""
    return v2extensions.model_statistics(v2extensions.stats_versions(state, call, None, None))


@router.get("/models/{name}", response_model=V2ModelMetadata)
async def model_metadata(name: NAME, call: CallDep, state: StateDep) -> dict[str, Any]:
    return v2infer.metadata(resolve(state, call, name, None), state)


@router.get("/models/{name}/versions/{version}", response_model=V2ModelMetadata)
async def version_metadata(
    name: NAME, version: VERSION, call: CallDep, state: StateDep
) -> dict[str, Any]:
    return v2infer.metadata(resolve(state, call, name, version), state)


@router.get("/models/{name}/ready", response_class=Response)
async def model_ready(name: NAME, call: CallDep, state: StateDep) -> Response:
    resolve(state, call, name, None)  # raises 404/503 when not ready
    return Response(status_code=200)


@router.get("/models/{name}/versions/{version}/ready", response_class=Response)
async def version_ready(name: NAME, version: VERSION, call: CallDep, state: StateDep) -> Response:
    resolve(state, call, name, version)
    return Response(status_code=200)


@router.get("/models/{name}/config")
async def model_config(name: NAME, call: CallDep, state: StateDep) -> dict[str, Any]:
    """The latest ready version's configuration in Triton's terms (model_config.proto)."""
    return v2extensions.model_config(resolve(state, call, name, None), state.settings)


@router.get("/models/{name}/versions/{version}/config")
async def version_config(
    name: NAME, version: VERSION, call: CallDep, state: StateDep
) -> dict[str, Any]:
    return v2extensions.model_config(resolve(state, call, name, version), state.settings)


@router.get("/models/{name}/stats", response_model=V2Statistics)
async def model_stats(name: NAME, call: CallDep, state: StateDep) -> dict[str, Any]:
    """Statistics of every ready version of the model."""
    return v2extensions.model_statistics(v2extensions.stats_versions(state, call, name, None))


@router.get("/models/{name}/versions/{version}/stats", response_model=V2Statistics)
async def version_stats(
    name: NAME, version: VERSION, call: CallDep, state: StateDep
) -> dict[str, Any]:
    return v2extensions.model_statistics(v2extensions.stats_versions(state, call, name, version))


async def handle_infer(
    state: AppState, call: Call, request: Request, name: str, version: int | None
) -> Response:
    model = admit(state, call, name, version)
    body = await request.body()
    decoded = v2codec.decode(body, request.headers.get("inference-header-content-length"))
    req = decoded.request
    params = req.parameters or {}
    answer = await v2infer.run(
        state,
        call,
        model,
        [(t.name, decoded.tensors[t.name]) for t in req.inputs],
        params,
        [o.name for o in req.outputs or []],
    )
    binary = {o.name for o in req.outputs or [] if (o.parameters or {}).get("binary_data")}
    if params.get("binary_data_output", False):
        binary = {n for n, _ in answer.outputs}
    header: dict[str, Any] = {"model_name": model.name, "model_version": str(model.version)}
    if req.id is not None:  # the protocol's id is a string: absent, not null, when not sent
        header["id"] = req.id
    header["parameters"] = {
        "threshold": answer.threshold,
        "score": answer.score,
        "calibrated": answer.calibrated,
    }
    if answer.certify_eps is not None:
        header["parameters"]["certify_eps"] = answer.certify_eps
    content, hlen = v2codec.encode(header, answer.outputs, binary)
    if hlen is None:
        return Response(content, media_type="application/json")
    return Response(
        content,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(hlen)},
    )


INFER: dict[str, Any] = {"response_model": V2InferResponse, "openapi_extra": INFER_BODY}
add_inference_route(
    inference, "/models/{name}/infer", handle_infer, name="model_infer",
    description="Inference with the latest ready version; label is -1 for NOT SURE.", **INFER,
)  # fmt: skip
add_inference_route(
    inference, "/models/{name}/versions/{version}/infer", handle_infer, name="version_infer",
    **INFER,
)  # fmt: skip
