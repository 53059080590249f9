"""The page to try the service (`GET /ui`) and the two small JSON endpoints it reads.

The page is static files shipped inside the package (`service/ui/`: HTML, one JS module, CSS
and the adversarial gallery); it talks to the same API as any other client. The page and its
files need no API key (they hold no data); every /v1 call it makes sends the key the user types.

- `GET /v1/models/{name}/calibration`: the served score, T, the held-out clean quantiles of the
  score and the clean refuse rate at T or at any `?threshold=` (what moving T would cost).
- `GET /v1/models/{name}/recent`: what this server process answered in the last seconds.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, Field

from service.api.deps import NAME, StateDep, known_query_only, require_key
from service.errors import InvalidInput
from service.manifest import ScoreReference, check_threshold
from service.schemas import API_ERRORS
from service.scoring import UNIT_SCORES

UI_DIR = Path(__file__).resolve().parents[2] / "ui"
# The page's files by suffix; nothing else under service/ui/ is served.
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".png": "image/png",
}
# The page loads nothing from another origin; the policy makes the browser enforce it.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

page = APIRouter(include_in_schema=False)
router = APIRouter(
    prefix="/v1",
    tags=["native"],
    dependencies=[Depends(require_key), Depends(known_query_only)],
    responses=API_ERRORS,
)


@cache
def assets() -> dict[str, Path]:
    """The servable files under service/ui/, by their path below /ui/ (read once)."""
    return {
        p.relative_to(UI_DIR).as_posix(): p
        for p in sorted(UI_DIR.rglob("*"))
        if p.is_file() and p.suffix in MEDIA_TYPES
    }


def _file(rel: str) -> Response:
    path = assets().get(rel)
    if path is None:
        return Response(status_code=404)
    headers = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"}
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=headers)


@page.get("/ui")
async def ui_page() -> Response:
    """The page: pick a model, draw or drop an image, see the answer or NOT SURE."""
    return _file("index.html")


@page.get("/ui/{asset:path}")
async def ui_asset(asset: str) -> Response:
    return _file(asset)


class Calibration(BaseModel):
    model: str
    version: int
    score: str = Field(description="the score T applies to")
    threshold: float = Field(description="T in force")
    unit_range: bool = Field(description="whether the score lives in [0, 1]")
    allow_request_threshold: bool = Field(description="whether a request may bring its own T")
    n: int | None = Field(description="held-out clean images the quantiles summarise")
    quantiles: list[float] | None = Field(
        description="held-out clean scores at q = 0, 1/(len-1), ..., 1 (null: not in the manifest)"
    )
    at: float = Field(description="the T the refuse rate is given for (`?threshold=` or T)")
    refuse_rate: float | None = Field(
        description="share of the held-out clean images a threshold of `at` refuses"
    )


def clean_refuse_rate(ref: ScoreReference, calibrated_t: float, t: float) -> float:
    """The clean refuse rate at t: exact at the T the quantiles were written for, else read
    between the quantiles (`ScoreReference.refuse_rate_at`)."""
    return ref.refuse_rate if t == calibrated_t else ref.refuse_rate_at(t)


@router.get(
    "/models/{name}/calibration",
    response_model=Calibration,
    summary="The served score's clean calibration: the refuse rate another T would cost",
)
async def calibration(
    name: NAME,
    state: StateDep,
    threshold: Annotated[float | None, Query(description="T to give the refuse rate at")] = None,
    version: Annotated[int | None, Query(ge=1)] = None,
) -> Calibration:
    mv = state.repository.get(name, version)
    m = mv.manifest
    at = mv.threshold if threshold is None else threshold
    try:
        check_threshold(m.score, at)
    except ValueError as exc:
        raise InvalidInput(str(exc), field="threshold") from exc
    ref = m.reference
    return Calibration(
        model=mv.name,
        version=mv.version,
        score=m.score,
        threshold=mv.threshold,
        unit_range=m.score in UNIT_SCORES,
        allow_request_threshold=state.settings.allow_request_threshold,
        n=ref.n if ref else None,
        quantiles=ref.quantiles if ref else None,
        at=at,
        refuse_rate=clean_refuse_rate(ref, m.threshold, at) if ref else None,
    )


class Recent(BaseModel):
    model: str
    score: str
    threshold: float = Field(description="T in force")
    seconds: int
    accepted_per_s: list[int] = Field(description="answers in each second, oldest first")
    not_sure_per_s: list[int] = Field(description="NOT SURE in each second, oldest first")
    edges: list[float] = Field(description="score histogram bin edges")
    hist_accepted: list[int]
    hist_not_sure: list[int]
    kept: int = Field(description="images this process keeps for the model (the newest)")


@router.get(
    "/models/{name}/recent",
    response_model=Recent,
    summary="What this server process answered in the last seconds (for the live panel)",
)
async def recent(
    name: NAME,
    state: StateDep,
    seconds: Annotated[int, Query(ge=1, le=600)] = 60,
) -> Recent:
    mv = state.repository.get(name)
    ref = mv.manifest.reference
    if mv.score in UNIT_SCORES:
        span = (0.0, 1.0)
    elif ref is not None:
        span = (ref.quantiles[0], ref.quantiles[-1])
    else:
        span = (mv.threshold, mv.threshold)
    w = state.recent.window(mv.name, seconds, span)
    return Recent(
        model=mv.name,
        score=mv.score,
        threshold=mv.threshold,
        seconds=w.seconds,
        accepted_per_s=w.accepted,
        not_sure_per_s=w.not_sure,
        edges=w.edges,
        hist_accepted=w.hist_accepted,
        hist_not_sure=w.hist_not_sure,
        kept=w.kept,
    )
