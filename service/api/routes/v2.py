"""KServe V2 / Open Inference Protocol: metadata, readiness and infer (JSON or binary)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from service import v2codec
from service.api.deps import NAME, VERSION, AppState, StateDep, require_key
from service.errors import InvalidInput, PayloadTooLarge
from service.imaging import check_batch
from service.inference import infer, resolve, shed_early, threshold_for
from service.repository import ModelVersion
from service.schemas import (
    API_ERRORS,
    V2InferRequest,
    V2InferResponse,
    V2ModelMetadata,
    body_schema,
)

router = APIRouter(
    prefix="/v2", tags=["kserve-v2"], dependencies=[Depends(require_key)], responses=API_ERRORS
)

OUTPUTS = ("label", "j_score", "confidence", "non_me", "probabilities", "score", "energy")
# Only for models whose graph has a features output and whose manifest has a kernel set.
KD_OUTPUT = "k_density"
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


def outputs_of(mv: ModelVersion) -> tuple[str, ...]:
    """The output tensors this model version can answer with, in metadata order."""
    return (*OUTPUTS, KD_OUTPUT) if mv.kernel_set is not None else OUTPUTS


def _metadata(mv: ModelVersion, state: AppState) -> dict[str, Any]:
    assert mv.manifest is not None
    c, h, w = mv.manifest.input_shape
    n = mv.manifest.num_classes
    versions = sorted(state.repository.versions.get(mv.name, {}))
    return {
        "name": mv.name,
        "versions": [str(v) for v in versions],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, c, h, w]}],
        "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]}]
        + [{"name": o, "datatype": "FP32", "shape": [-1]} for o in OUTPUTS[1:4]]
        + [{"name": "probabilities", "datatype": "FP32", "shape": [-1, n]}]
        + [{"name": o, "datatype": "FP32", "shape": [-1]} for o in outputs_of(mv)[5:]],
    }


@router.get("/models/{name}", response_model=V2ModelMetadata)
async def model_metadata(name: NAME, request: Request, state: StateDep) -> dict[str, Any]:
    return _metadata(resolve(state, request, name, None), state)


@router.get("/models/{name}/versions/{version}", response_model=V2ModelMetadata)
async def version_metadata(
    name: NAME, version: VERSION, request: Request, state: StateDep
) -> dict[str, Any]:
    return _metadata(resolve(state, request, name, version), state)


@router.get("/models/{name}/ready", response_class=Response)
async def model_ready(name: NAME, request: Request, state: StateDep) -> Response:
    resolve(state, request, name, None)  # raises 404/503 when not ready
    return Response(status_code=200)


@router.get("/models/{name}/versions/{version}/ready", response_class=Response)
async def version_ready(
    name: NAME, version: VERSION, request: Request, state: StateDep
) -> Response:
    resolve(state, request, name, version)
    return Response(status_code=200)


async def handle_infer(
    state: AppState, request: Request, name: str, version: int | None
) -> Response:
    mv = resolve(state, request, name, version)
    shed_early(state, mv)
    body = await request.body()
    decoded = v2codec.decode(body, request.headers.get("inference-header-content-length"))
    req = decoded.request
    if len(req.inputs) != 1:
        raise InvalidInput(
            f"expected exactly one input, got {len(req.inputs)}",
            field="inputs",
            fix='send one tensor named "input" of shape [B, C, H, W]',
        )
    assert mv.manifest is not None
    x = check_batch(decoded.tensors[req.inputs[0].name], mv.manifest.input_shape, "inputs[0]")
    if x.shape[0] > state.settings.max_instances:
        raise PayloadTooLarge(
            f"{x.shape[0]} images, the limit is {state.settings.max_instances}",
            field="inputs[0].shape",
        )
    params = req.parameters or {}
    requested = params.get("threshold")
    if requested is not None and not isinstance(requested, int | float):
        raise InvalidInput("threshold must be a number", field="parameters.threshold")
    threshold = threshold_for(state, mv, requested)
    outcome = await infer(state, request, mv, x, threshold)

    s = outcome.scores
    values: dict[str, npt.NDArray[Any]] = {
        "label": np.where(outcome.accepted, s.label, -1).astype(np.int64),
        "j_score": s.j_score.astype(np.float32),
        "confidence": s.confidence.astype(np.float32),
        "non_me": s.non_me.astype(np.float32),
        "probabilities": s.probabilities.astype(np.float32),
        "score": s.score.astype(np.float32),
        "energy": s.energy.astype(np.float32),
    }
    if s.k_density is not None:
        values[KD_OUTPUT] = s.k_density.astype(np.float32)
    all_binary = bool(params.get("binary_data_output", False))
    available = outputs_of(mv)
    wanted = [o.name for o in req.outputs] if req.outputs else list(available)
    unknown = [w for w in wanted if w not in values]
    if unknown:
        raise InvalidInput(
            f"unknown output {unknown[0]!r}",
            field="outputs",
            fix=f"choose from {', '.join(available)}",
        )
    binary = {o.name for o in req.outputs or [] if (o.parameters or {}).get("binary_data")}
    if all_binary:
        binary = set(wanted)
    header = {
        "model_name": mv.name,
        "model_version": str(mv.version),
        "id": req.id,
        "parameters": {"threshold": threshold, "score": s.score_name},
    }
    content, hlen = v2codec.encode(header, [(w, values[w]) for w in wanted], binary)
    if hlen is None:
        return Response(content, media_type="application/json")
    return Response(
        content,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(hlen)},
    )


@router.post("/models/{name}/infer", response_model=V2InferResponse, openapi_extra=INFER_BODY)
async def model_infer(name: NAME, request: Request, state: StateDep) -> Response:
    """Inference with the latest ready version; label is -1 for NOT SURE."""
    return await handle_infer(state, request, name, None)


@router.post(
    "/models/{name}/versions/{version}/infer",
    response_model=V2InferResponse,
    openapi_extra=INFER_BODY,
)
async def version_infer(
    name: NAME, version: VERSION, request: Request, state: StateDep
) -> Response:
    return await handle_infer(state, request, name, version)
