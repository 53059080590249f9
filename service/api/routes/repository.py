"""Triton's model repository extension over HTTP: the index, and load/unload of one model.

Loading and unloading answer only with `model_control=explicit` (service/model_control.py);
the index answers in every mode. The same API keys guard them as the other V2 routes.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from service.api.deps import NAME, StateDep, require_key
from service.errors import invalid_input_from
from service.model_control import check_parameters
from service.schemas import (
    API_ERRORS,
    RepositoryIndexEntry,
    RepositoryIndexRequest,
    RepositoryModelRequest,
    body_schema,
)

router = APIRouter(
    prefix="/v2/repository",
    tags=["model-repository"],
    dependencies=[Depends(require_key)],
    responses=API_ERRORS,
)
M = TypeVar("M", bound=BaseModel)


def _optional_body(model: type[BaseModel]) -> dict[str, Any]:
    content = {"application/json": {"schema": body_schema(model)}}
    return {"requestBody": {"required": False, "content": content}}


async def _parse(request: Request, model: type[M]) -> M:
    """The optional JSON body, whatever its Content-Type: tritonclient sends none."""
    raw = await request.body()
    if not raw.strip():
        return model()
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise invalid_input_from(exc.errors()) from exc


@router.post(
    "/index",
    response_model=list[RepositoryIndexEntry],
    summary="Every model version in the repository and its state",
    openapi_extra=_optional_body(RepositoryIndexRequest),
)
async def index(state: StateDep, request: Request) -> list[Any]:
    """`{"ready": true}`: only the versions ready to infer."""
    body = await _parse(request, RepositoryIndexRequest)
    return [asdict(e) for e in await state.control.index(ready_only=body.ready)]


@router.post(
    "/models/{name}/load",
    response_class=Response,
    summary="Load every version of a model, or reload it (model_control=explicit)",
    openapi_extra=_optional_body(RepositoryModelRequest),
)
async def load(name: NAME, state: StateDep, request: Request) -> Response:
    """200 once every version folder of the model serves; a version already serving is
    replaced without a failed request, and keeps serving if its new files are refused."""
    check_parameters("load", (await _parse(request, RepositoryModelRequest)).parameters)
    await state.control.load(name)
    return Response(status_code=200)


@router.post(
    "/models/{name}/unload",
    response_class=Response,
    summary="Unload every version of a model (model_control=explicit)",
    openapi_extra=_optional_body(RepositoryModelRequest),
)
async def unload(name: NAME, state: StateDep, request: Request) -> Response:
    """200 once the requests in flight for the model have finished and it no longer serves."""
    check_parameters("unload", (await _parse(request, RepositoryModelRequest)).parameters)
    await state.control.unload(name)
    return Response(status_code=200)
