"""The inference routes without FastAPI's per-request routing and dependency solving.

In a profile at concurrency 1, matching the route, solving its dependencies (app state, the
API-key headers, the validated path parameters) and the exception/exit-stack layers around them
took about a third of the event loop's time per predict request. The routes' handlers need
none of it: they take (state, request, name, version).

Only requests that FastAPI would treat the same way take this path: POST to one of the four
inference paths, a name of the NAME pattern, a plain version number within VERSION's range.
Anything else (another method, an odd name or version, a trailing slash) goes through FastAPI
as before, so its answers and errors are FastAPI's. The handlers, the API-key check and the
error responses are the routes' own functions; OpenAPI still documents the FastAPI routes.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive, Scope, Send

from service.api import handlers
from service.api.deps import NAME_PATTERN, VERSION_MAX, AppState, check_key
from service.api.routes import native, v2
from service.errors import ServeError

Handler = Callable[[AppState, Request, str, int | None], Awaitable[Response]]

_PATH = re.compile(r"/(v1|v2)/models/([^/]+)(?:/versions/([1-9][0-9]{0,6}))?/(predict|infer)")
_NAME = re.compile(NAME_PATTERN)
# (API, last path segment) -> the handler and the route templates it serves.
_ROUTES: dict[tuple[str, str], tuple[Handler, str, str]] = {
    ("v1", "predict"): (
        native.handle_predict,
        "/v1/models/{name}/predict",
        "/v1/models/{name}/versions/{version}/predict",
    ),
    ("v2", "infer"): (
        v2.handle_infer,
        "/v2/models/{name}/infer",
        "/v2/models/{name}/versions/{version}/infer",
    ),
}


class HotRoutes:
    """Finds a request's inference handler, and runs it as FastAPI would have."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        # The routers' own route objects: FastAPI puts these in scope["route"], and the request
        # metrics take their endpoint label from it. Each template must exist.
        by_path = {
            r.path: r
            for r in native.router.routes + v2.router.routes
            if isinstance(r, APIRoute) and "POST" in (r.methods or ())
        }
        self._routes = {
            key: (handler, by_path[latest], by_path[versioned])
            for key, (handler, latest, versioned) in _ROUTES.items()
        }

    def match(self, scope: Scope) -> Callable[[Scope, Receive, Send], Awaitable[None]] | None:
        """The fast handler for this request, or None to let FastAPI route it."""
        if scope["method"] != "POST":
            return None
        m = _PATH.fullmatch(scope["path"])
        if m is None:
            return None
        api, name, version, verb = m.groups()
        found = self._routes.get((api, verb))
        if found is None or not _NAME.fullmatch(name):
            return None
        v = int(version) if version else None
        if v is not None and v > VERSION_MAX:
            return None
        handler, latest, versioned = found
        route = versioned if v is not None else latest

        async def run(scope: Scope, receive: Receive, send: Send) -> None:
            scope["route"] = route
            scope["endpoint"] = route.endpoint
            scope["path_params"] = {"name": name} if v is None else {"name": name, "version": v}
            request = Request(scope, receive)
            response: Response
            try:
                check_key(
                    self.state,
                    request.headers.get("authorization"),
                    request.headers.get("x-api-key"),
                )
                response = await handler(self.state, request, name, v)
            except ServeError as exc:
                response = handlers.serve_error(request, exc)
            except ClientDisconnect as exc:
                response = handlers.client_gone(request, exc)
            await response(scope, receive, send)

        return run
