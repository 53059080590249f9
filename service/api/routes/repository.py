"""Triton's model repository extension over HTTP: the index, and load/unload of one model.

Loading and unloading answer only with `model_control=explicit` (service/model_control.py);
the index answers in every mode. The same API keys guard them as the other V2 routes.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from service.api.deps import NAME, StateDep, require_key
from service.model_control import check_parameters
from service.schemas import (
    API_ERRORS,
    RepositoryIndexEntry,
    RepositoryIndexRequest,
    RepositoryModelRequest,
)

router = APIRouter(
    prefix="/v2/repository",
    tags=["model-repository"],
    dependencies=[Depends(require_key)],
    responses=API_ERRORS,
)


@router.post(
    "/index",
    response_model=list[RepositoryIndexEntry],
    summary="Every model version in the repository and its state",
)
async def index(state: StateDep, body: RepositoryIndexRequest | None = None) -> list[Any]:
    """The body is optional (tritonclient sends none)."""
    entries = await state.control.index(ready_only=body is not None and body.ready)
    return [asdict(e) for e in entries]


@router.post(
    "/models/{name}/load",
    response_class=Response,
    summary="Load every version of a model, or reload it (model_control=explicit)",
)
async def load(name: NAME, state: StateDep, body: RepositoryModelRequest | None = None) -> Response:
    """200 once every version folder of the model serves; a version already serving is
    replaced without a failed request, and keeps serving if its new files are refused."""
    check_parameters("load", body.parameters if body else {})
    await state.control.load(name)
    return Response(status_code=200)


@router.post(
    "/models/{name}/unload",
    response_class=Response,
    summary="Unload every version of a model (model_control=explicit)",
)
async def unload(
    name: NAME, state: StateDep, body: RepositoryModelRequest | None = None
) -> Response:
    """200 once the requests in flight for the model have finished and it no longer serves."""
    check_parameters("unload", body.parameters if body else {})
    await state.control.unload(name)
    return Response(status_code=200)
