"""Shared FastAPI dependencies: settings, the app state, API-key checks.

They are all `async def`: FastAPI runs plain `def` dependencies in a thread pool, which cost
several thread hops per request on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Path, Request

from service.batching import ArrivalTracker
from service.config import Settings
from service.errors import Unauthorized
from service.metrics import Metrics
from service.repository import Repository
from service.security import KeyRing, key_from_headers


@dataclass
class AppState:
    """Everything the lifespan builds, stored on app.state.notsure."""

    settings: Settings
    metrics: Metrics
    repository: Repository
    keys: KeyRing
    arrivals: ArrivalTracker
    draining: bool = False


async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.notsure
    return state


StateDep = Annotated[AppState, Depends(get_state)]

# Path parameters of every model route: names are validated here, so a request can never name
# a path outside the repository (lookups are dictionary keys, never joined into file paths).
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
VERSION_MAX = 1_000_000
NAME = Annotated[str, Path(pattern=NAME_PATTERN, description="model name (see /v1/models)")]
VERSION = Annotated[int, Path(ge=1, le=VERSION_MAX, description="model version")]


async def get_app_settings(state: StateDep) -> Settings:
    return state.settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def check_request_key(state: AppState, request: Request) -> None:
    # The key headers are read from the request itself, not declared as FastAPI `Header`
    # parameters: those become pydantic fields with an alias, and some pydantic releases warn
    # about that alias on every request (a warning that `-W error` turns into a 500).
    headers = request.headers
    check_key(state, headers.get("authorization"), headers.get("x-api-key"))


def check_key(state: AppState, authorization: str | None, x_api_key: str | None) -> None:
    if not state.keys.accepts(key_from_headers(authorization, x_api_key)):
        raise Unauthorized(
            "missing or unknown API key",
            field="Authorization",
            fix="send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
        )


async def require_key(state: StateDep, request: Request) -> None:
    """Guards predict, infer and model-admin routes when API keys are configured."""
    check_request_key(state, request)


async def require_key_for_health(state: StateDep, request: Request) -> None:
    if state.settings.protect_health:
        check_request_key(state, request)


async def require_key_for_metrics(state: StateDep, request: Request) -> None:
    if state.settings.protect_metrics:
        check_request_key(state, request)
