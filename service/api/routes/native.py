"""Native API: `POST /v1/models/{name}[/versions/{v}]/predict`, image uploads, model list."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, File, Query, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile as StarletteUpload

from service.api.deps import NAME, StateDep, call_of, require_key
from service.api.routing import add_inference_route
from service.call import Call
from service.errors import InvalidInput, PayloadTooLarge, invalid_input_from
from service.fastjson import validate_json
from service.imaging import EncodedImage, Shape, decode, open_image, open_instance
from service.inference import admit, infer
from service.preprocess import upload_resize
from service.runner import LoadedModel
from service.schemas import (
    API_ERRORS,
    ModelList,
    ModelSummary,
    PredictRequest,
    PredictResponse,
    body_schema,
)
from service.scoring import Outcome
from service.state import AppState
from service.thresholds import threshold_in_force

router = APIRouter(
    prefix="/v1", tags=["native"], dependencies=[Depends(require_key)], responses=API_ERRORS
)
# The inference routes, with the same prefix, tags and guard; the app puts them first among
# its own routes (service.main).
inference = APIRouter(
    prefix="/v1", tags=["native"], dependencies=[Depends(require_key)], responses=API_ERRORS
)


def _response(
    model: LoadedModel,
    outcome: Outcome,
    request_id: str | None,
    reveal: bool,
    probabilities: bool = False,
) -> Response:
    """Build the JSON by hand: the hot path skips response-model re-validation (orjson: 1 us
    for a 1-image answer where json.dumps took 29, contended CPU)."""
    s = outcome.scores
    classes = model.manifest.classes
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
    if s.certified is not None:  # only models with a bound graph say anything of certificates
        for pred, cert in zip(preds, s.certified.tolist(), strict=True):
            pred["certified"] = cert
            pred["certify_eps"] = s.certify_eps
    if probabilities:
        for pred, row in zip(preds, s.probabilities.tolist(), strict=True):
            pred["probabilities"] = row
    body = {
        "id": request_id,
        "model": model.name,
        "version": model.version,
        "threshold": outcome.threshold,
        "predictions": preds,
    }
    if s.certified is not None:
        body["certificate_required"] = s.certificate_required
    return Response(orjson.dumps(body), media_type="application/json")


async def _stack(
    items: Sequence[EncodedImage | np.ndarray], shape: Shape, inline_max: int
) -> np.ndarray:
    """The images (opened, pixels not yet decoded) and pixel arrays as one (B, C, H, W) array.
    Decoding PNG/JPEG costs milliseconds per megapixel: when the images declare more than
    `inline_max` pixels in all, it runs in a worker thread so that the event loop keeps
    answering others. Small images (the usual 28x28) and pixel arrays stay on the loop, where
    they cost less than the hand-off to a thread."""
    pixels = sum(item.pixels for item in items if isinstance(item, EncodedImage))

    def run() -> np.ndarray:
        return np.stack([decode(i, shape) if isinstance(i, EncodedImage) else i for i in items])

    return await asyncio.to_thread(run) if pixels > inline_max else run()


async def handle_predict(
    state: AppState, call: Call, request: Request, name: str, version: int | None
) -> Response:
    settings = state.settings
    model = admit(state, call, name, version)
    body = await _read(request)
    if len(body.instances) > settings.max_instances:
        raise PayloadTooLarge(
            f"{len(body.instances)} instances, the limit is {settings.max_instances}",
            field="instances",
            fix=f"split the request into batches of {settings.max_instances}",
        )
    threshold = threshold_in_force(settings, model.score, model.threshold, body.threshold)
    shape, limit = model.manifest.input_shape, settings.max_image_pixels
    resize = upload_resize(model.manifest, body.resize)
    items = [
        open_instance(inst, shape, f"instances[{i}]", resize=resize, max_pixels=limit)
        for i, inst in enumerate(body.instances)
    ]
    x = await _stack(items, shape, settings.decode_inline_max_pixels)
    request_id, probabilities = body.id, body.probabilities
    # The parsed instances (a Python object per pixel: megabytes for a large request) need not
    # wait in the queue with the request; the array holds the images from here on.
    del body
    outcome = await infer(state, call, model, x, threshold)
    return _response(model, outcome, request_id, settings.reveal_not_sure_labels, probabilities)


async def _read(request: Request) -> PredictRequest:
    try:
        return validate_json(PredictRequest, await request.body())
    except ValidationError as exc:
        raise invalid_input_from(exc.errors()) from exc


class FilesQuery(BaseModel):
    """The query of an upload: validated as FastAPI validates the endpoint's Query parameters;
    a parameter it does not take is refused, not ignored."""

    model_config = ConfigDict(extra="forbid")

    resize: bool = False
    version: int | None = Field(default=None, ge=1)
    threshold: float | None = None
    probabilities: bool = False


async def handle_files(
    state: AppState, call: Call, request: Request, name: str, _: int | None
) -> Response:
    """The upload route's steps: those of predict, with the images decoded from the files."""
    settings = state.settings
    try:
        query = FilesQuery.model_validate(dict(request.query_params))
    except ValidationError as exc:
        errors = [{**e, "loc": ("query", *e["loc"])} for e in exc.errors()]
        raise invalid_input_from(errors) from exc
    model = admit(state, call, name, query.version)
    files = (await request.form()).getlist("files")
    if not files:
        raise invalid_input_from(
            [{"loc": ("body", "files"), "type": "missing", "msg": "Field required"}]
        )
    if len(files) > settings.max_instances:
        raise PayloadTooLarge(
            f"{len(files)} files, the limit is {settings.max_instances}", field="files"
        )
    threshold = threshold_in_force(settings, model.score, model.threshold, query.threshold)
    shape, images = model.manifest.input_shape, []
    for i, f in enumerate(files):
        if not isinstance(f, StarletteUpload):
            raise InvalidInput("not a file", field=f"files[{i}]", fix="send a PNG or JPEG file")
        data = await f.read()
        if not data:
            raise InvalidInput("empty file", field=f"files[{i}]", fix="send a PNG or JPEG file")
        images.append(
            open_image(
                data,
                shape,
                f"files[{i}]",
                resize=upload_resize(model.manifest, query.resize),
                max_pixels=settings.max_image_pixels,
            )
        )
    x = await _stack(images, shape, settings.decode_inline_max_pixels)
    outcome = await infer(state, call, model, x, threshold)
    return _response(model, outcome, None, settings.reveal_not_sure_labels, query.probabilities)


# The predict body is parsed by the handler, straight from bytes by pydantic-core, instead of
# by FastAPI (json.loads, then a second validation pass over the same nested lists); the schema
# is still published in OpenAPI.
PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": body_schema(PredictRequest)}},
    }
}
PREDICT: dict[str, Any] = {"response_model": PredictResponse, "openapi_extra": PREDICT_BODY}
add_inference_route(
    inference, "/models/{name}/predict", handle_predict, name="predict",
    summary="Predict with the latest ready version",
    description="Each image gets a label and its score, or NOT SURE when the score < T.", **PREDICT,
)  # fmt: skip
add_inference_route(
    inference, "/models/{name}/versions/{version}/predict", handle_predict, name="predict_version",
    summary="Predict with a given version", **PREDICT,
)  # fmt: skip


async def predict_files(
    name: NAME,
    request: Request,
    state: StateDep,
    files: Annotated[list[UploadFile], File(description="PNG or JPEG files")],
    resize: Annotated[bool, Query()] = False,
    version: Annotated[int | None, Query(ge=1)] = None,
    threshold: Annotated[
        float | None, Query(description="T for this request (when the server allows it)")
    ] = None,
    probabilities: Annotated[
        bool, Query(description="include each image's class probabilities")
    ] = False,
) -> Response:
    """Each uploaded image gets a label and its score, or NOT SURE when the score < T."""
    return await handle_files(state, call_of(request.scope), request, name, None)


add_inference_route(
    inference, "/models/{name}/predict/files", handle_files, endpoint=predict_files,
    name="predict_files", response_model=PredictResponse,
    summary="Predict on uploaded image files (multipart/form-data)",
)  # fmt: skip


@router.get("/models", response_model=ModelList, summary="Every model version and its state")
async def list_models(state: StateDep) -> dict[str, Any]:
    out = []
    for found in state.repository.all():
        m, loaded = found.manifest, found.loaded
        out.append(
            ModelSummary(
                name=found.name,
                version=found.version,
                ready=found.ready,
                objective=m.objective if m else None,
                score=m.score if m else None,
                threshold=loaded.threshold if loaded else None,
                calibrated=m.calibrated if m else None,
                provider=loaded.provider if loaded else None,
                error=found.error,
            )
        )
    default = state.settings.default_model
    ready = any(s.name == default and s.ready for s in out)
    return {"models": out, "default_model": default if ready else None}
