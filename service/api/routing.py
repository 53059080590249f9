"""Inference routes: declared once as FastAPI routes, answered without FastAPI's per-request work.

Each inference route is an ordinary `APIRoute` (its path, parameters and body are in OpenAPI,
and the app's router matches it: first, see `service.main`), of the class `InferenceRoute`.
In a profile at concurrency 1, solving a route's dependencies (app state, the API-key
headers, the validated path parameters) and the exit-stack layers around them took about a
third of the event loop's time per predict request; the handlers need none of it, so this
route class calls them directly with (state, call, request, name, version). A request whose
path parameters FastAPI would refuse or read differently (an odd name, a version outside
1..VERSION_MAX or with a leading zero) is handled by FastAPI as any other route, so its error
is FastAPI's own. Errors raised by a handler reach the app's exception handlers
(`service.api.handlers`) either way.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.types import Receive, Scope, Send

from service.api.deps import NAME, NAME_PATTERN, VERSION, StateDep, call_of
from service.call import Call
from service.inference import VERSION_MAX
from service.state import AppState

Handler = Callable[[AppState, Call, Request, str, int | None], Awaitable[Response]]

_NAME = re.compile(NAME_PATTERN)
_VERSION = re.compile(r"[1-9][0-9]{0,6}")


class InferenceRoute(APIRoute):
    """A POST route answered by `handler` directly (FastAPI's handling when `fast_path` is off)."""

    handler: Handler

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        state: AppState = scope["app"].state.notsure
        params = scope["path_params"]
        name, raw = params["name"], params.get("version")
        version = int(raw) if raw is not None and _VERSION.fullmatch(raw) else None
        lean = (
            state.settings.fast_path
            and scope["method"] == "POST"
            and _NAME.fullmatch(name) is not None
            and (raw is None or (version is not None and version <= VERSION_MAX))
        )
        if not lean:
            await super().handle(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            if state.keys.enabled:
                headers = request.headers
                state.keys.check(headers.get("authorization"), headers.get("x-api-key"))
            response = await self.handler(state, call_of(scope), request, name, version)
            await response(scope, receive, send)
        finally:
            await request.close()  # the uploaded files of a multipart body, if any were parsed


def _endpoint(handler: Handler, versioned: bool) -> Callable[..., Awaitable[Response]]:
    """The FastAPI endpoint of a handler: what OpenAPI documents and FastAPI's handling runs."""
    if versioned:

        async def with_version(
            name: NAME, version: VERSION, request: Request, state: StateDep
        ) -> Response:
            return await handler(state, call_of(request.scope), request, name, version)

        return with_version

    async def latest(name: NAME, request: Request, state: StateDep) -> Response:
        return await handler(state, call_of(request.scope), request, name, None)

    return latest


def add_inference_route(
    router: APIRouter,
    path: str,
    handler: Handler,
    *,
    endpoint: Callable[..., Awaitable[Response]] | None = None,
    **doc: Any,
) -> None:
    """Declare the POST route `path` answered by `handler`; `endpoint` (default: one built
    from the path's parameters) is the FastAPI signature, `doc` the OpenAPI details."""
    route_class = type(
        f"{handler.__name__}_route", (InferenceRoute,), {"handler": staticmethod(handler)}
    )
    router.add_api_route(
        path,
        endpoint or _endpoint(handler, "{version}" in path),
        methods=["POST"],
        route_class_override=route_class,
        **doc,
    )
