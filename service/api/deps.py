"""Shared FastAPI dependencies: the app state, the request's call record, API-key checks.

They are all `async def`: FastAPI runs plain `def` dependencies in a thread pool, which cost
several thread hops per request on the hot path.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Path, Request
from starlette.types import Scope

from service.call import Call
from service.config import Settings
from service.errors import InvalidInput
from service.inference import VERSION_MAX
from service.state import AppState

# The scope entry holding the request's `Call`: the middleware creates and closes it.
CALL_KEY = "notsure.call"


def call_of(scope: Scope) -> Call:
    """The request's call record (set by `ServiceMiddleware`)."""
    call: Call = scope[CALL_KEY]
    return call


async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.notsure
    return state


async def get_call(request: Request) -> Call:
    return call_of(request.scope)


StateDep = Annotated[AppState, Depends(get_state)]
CallDep = Annotated[Call, Depends(get_call)]

# Path parameters of every model route: names are validated here, so a request can never name
# a path outside the repository (lookups are dictionary keys, never joined into file paths).
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
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
    state.keys.check(headers.get("authorization"), headers.get("x-api-key"))


async def require_key(state: StateDep, request: Request) -> None:
    """Guards predict, infer and model-admin routes when API keys are configured."""
    check_request_key(state, request)


async def require_key_for_health(state: StateDep, request: Request) -> None:
    if state.settings.protect_health:
        check_request_key(state, request)


async def require_key_for_metrics(state: StateDep, request: Request) -> None:
    if state.settings.protect_metrics:
        check_request_key(state, request)


def _query_names(dependant: Any) -> frozenset[str]:
    """The query parameters a route takes, its dependencies' included."""
    names = {f.alias for f in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return frozenset(names)


_ROUTE_QUERIES: dict[int, frozenset[str]] = {}


async def known_query_only(request: Request) -> None:
    """Refuse query parameters the route does not take: a misspelt switch
    (`?threshhold=0.5`) is an error naming the ones it takes, never silently ignored."""
    if not request.url.query:
        return
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    known = _ROUTE_QUERIES.get(id(route))
    if known is None:
        known = _ROUTE_QUERIES[id(route)] = _query_names(dependant)
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise InvalidInput(
            f"unknown query parameter {unknown[0]!r}",
            field=f"query.{unknown[0]}",
            fix=f"use {', '.join(sorted(known))}" if known else "send no query parameters",
        )
