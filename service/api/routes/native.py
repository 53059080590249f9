"""Native API: `POST /v1/models/{name}[/versions/{v}]/predict`, image uploads, model list."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import APIRouter, Depends, File, Query, Request, UploadFile
from fastapi.responses import Response
from pydantic import ValidationError

from service.api.deps import NAME, VERSION, AppState, StateDep, require_key
from service.errors import InvalidInput, PayloadTooLarge, invalid_input_from
from service.imaging import (
    declared_pixels,
    decode_image,
    header_pixels,
    instance_to_tensor,
)
from service.inference import Outcome, infer, resolve, shed_early, threshold_for
from service.repository import ModelVersion
from service.schemas import (
    API_ERRORS,
    ModelList,
    ModelSummary,
    PredictRequest,
    PredictResponse,
    body_schema,
)

T = TypeVar("T")

router = APIRouter(
    prefix="/v1", tags=["native"], dependencies=[Depends(require_key)], responses=API_ERRORS
)


def _response(mv: ModelVersion, outcome: Outcome, request_id: str | None, reveal: bool) -> Response:
    """Build the JSON by hand: the hot path skips response-model re-validation."""
    s = outcome.scores
    classes = mv.manifest.classes if mv.manifest else []
    preds = []
    name = s.score_name
    for label, acc, j, c, nme, v in zip(
        s.label.tolist(),
        outcome.accepted.tolist(),
        s.j_score.tolist(),
        s.confidence.tolist(),
        s.non_me.tolist(),
        s.score.tolist(),
        strict=True,
    ):
        shown = acc or reveal
        preds.append(
            {
                "decision": "accepted" if acc else "not_sure",
                "label": label if shown else None,
                "class_name": classes[label] if shown else None,
                "j_score": j,
                "confidence": c,
                "non_me": nme,
                "score_name": name,
                "score": v,
            }
        )
    body = {
        "id": request_id,
        "model": mv.name,
        "version": mv.version,
        "threshold": outcome.threshold,
        "predictions": preds,
    }
    return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")


async def _stack(
    items: Sequence[T], convert: Callable[[int, T], np.ndarray], pixels: int, inline_max: int
) -> np.ndarray:
    """The items as one (B, C, H, W) array. Decoding PNG/JPEG costs milliseconds per megapixel:
    when the images declare more than `inline_max` pixels in all, it runs in a worker thread so
    that the event loop keeps answering others. Small images (the usual 28x28) and pixel arrays
    stay on the loop, where they cost less than the hand-off to a thread."""

    def run() -> np.ndarray:
        return np.stack([convert(i, item) for i, item in enumerate(items)])

    return await asyncio.to_thread(run) if pixels > inline_max else run()


async def handle_predict(
    state: AppState, request: Request, name: str, version: int | None
) -> Response:
    settings = state.settings
    mv = resolve(state, request, name, version)
    shed_early(state, mv)
    body = await _read(request)
    if len(body.instances) > settings.max_instances:
        raise PayloadTooLarge(
            f"{len(body.instances)} instances, the limit is {settings.max_instances}",
            field="instances",
            fix=f"split the request into batches of {settings.max_instances}",
        )
    threshold = threshold_for(state, mv, body.threshold)
    assert mv.manifest is not None
    shape = mv.manifest.input_shape
    x = await _stack(
        body.instances,
        lambda i, inst: instance_to_tensor(
            inst, shape, f"instances[{i}]", resize=body.resize, max_pixels=settings.max_image_pixels
        ),
        sum(map(declared_pixels, body.instances)),
        settings.decode_inline_max_pixels,
    )
    outcome = await infer(state, request, mv, x, threshold)
    return _response(mv, outcome, body.id, settings.reveal_not_sure_labels)


# The predict body is parsed here, straight from bytes by pydantic-core, instead of by FastAPI
# (json.loads, then a second validation pass over the same nested lists); the schema is
# still published in OpenAPI.
PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": body_schema(PredictRequest)}},
    }
}


async def _read(request: Request) -> PredictRequest:
    try:
        return PredictRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        raise invalid_input_from(exc.errors()) from exc


@router.post(
    "/models/{name}/predict",
    response_model=PredictResponse,
    summary="Predict with the latest ready version",
    openapi_extra=PREDICT_BODY,
)
async def predict(name: NAME, request: Request, state: StateDep) -> Response:
    """Each image gets a label and its score, or NOT SURE when the score < T."""
    return await handle_predict(state, request, name, None)


@router.post(
    "/models/{name}/versions/{version}/predict",
    response_model=PredictResponse,
    summary="Predict with a given version",
    openapi_extra=PREDICT_BODY,
)
async def predict_version(
    name: NAME, version: VERSION, request: Request, state: StateDep
) -> Response:
    return await handle_predict(state, request, name, version)


@router.post(
    "/models/{name}/predict/files",
    response_model=PredictResponse,
    summary="Predict on uploaded image files (multipart/form-data)",
)
async def predict_files(
    name: NAME,
    request: Request,
    state: StateDep,
    files: Annotated[list[UploadFile], File(description="PNG or JPEG files")],
    resize: Annotated[bool, Query()] = False,
    version: Annotated[int | None, Query(ge=1)] = None,
) -> Response:
    settings = state.settings
    mv = resolve(state, request, name, version)
    if len(files) > settings.max_instances:
        raise PayloadTooLarge(
            f"{len(files)} files, the limit is {settings.max_instances}", field="files"
        )
    assert mv.manifest is not None
    blobs = []
    for i, f in enumerate(files):
        data = await f.read()
        if not data:
            raise InvalidInput("empty file", field=f"files[{i}]", fix="send a PNG or JPEG file")
        blobs.append(data)
    shape = mv.manifest.input_shape
    x = await _stack(
        blobs,
        lambda i, data: decode_image(
            data, shape, f"files[{i}]", resize=resize, max_pixels=settings.max_image_pixels
        ),
        sum(map(header_pixels, blobs)),
        settings.decode_inline_max_pixels,
    )
    outcome = await infer(state, request, mv, x, mv.threshold)
    return _response(mv, outcome, None, settings.reveal_not_sure_labels)


@router.get("/models", response_model=ModelList, summary="Every model version and its state")
async def list_models(state: StateDep) -> dict[str, Any]:
    out = []
    for mv in state.repository.all():
        m = mv.manifest
        out.append(
            ModelSummary(
                name=mv.name,
                version=mv.version,
                ready=mv.ready,
                objective=m.objective if m else None,
                score=m.score if m else None,
                threshold=mv.threshold if mv.ready else None,
                provider=mv.model.provider if mv.model else None,
                error=mv.error,
            )
        )
    return {"models": out}
