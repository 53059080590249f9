"""Pure-ASGI middleware: request ids, the body-size limit, the call record, request metrics."""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import accesslog
from service.api.deps import CALL_KEY
from service.call import Call
from service.errors import PayloadTooLarge, log_level
from service.metrics import observe_one
from service.state import AppState
from service.tracing import http_carrier

log = logging.getLogger("notsure.access")
SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class RequestIds:
    """Ids for requests that bring none: a random per-process prefix and a counter, unique like
    uuid4 without a call to os.urandom per request."""

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._count = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._count):016x}"


class ServiceMiddleware:
    """Around every HTTP request: its id, the body limit, its `Call` (closed when the answer
    has gone, however it ended) and the request metrics and log line."""

    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app, self.state = app, state
        self.ids = RequestIds()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.state
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")
        if not SAFE_ID.match(rid):
            rid = self.ids.next()
        call = scope[CALL_KEY] = Call(request_id=rid, arrived_ns=time.perf_counter_ns())
        if state.tracing is not None:
            call.carrier = http_carrier(headers)
        start = time.perf_counter()
        status = {"code": 500}
        limit = state.settings.max_body_bytes

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _send_error(
                send_wrapper,
                PayloadTooLarge(
                    f"body is {int(length)} bytes, the limit is {limit}",
                    field="body",
                    fix="send fewer or smaller images per request",
                ),
            )
            self._record(scope, call, status["code"], start)
            return
        received = {"n": 0}

        async def receive_limited() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                received["n"] += len(message.get("body", b""))
                if received["n"] > limit:
                    raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes", field="body")
            return message

        try:
            await self.app(scope, receive_limited, send_wrapper)
        finally:
            call.close()
            self._record(scope, call, status["code"], start)

    def _record(self, scope: Scope, call: Call, code: int, start: float) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"
        labels = (call.model, call.version if call.model else "")
        m = self.state.metrics
        m.requests_of(*labels, endpoint, str(code), "http").inc()
        observe_one(m.latency_of(*labels, endpoint, "http"), time.perf_counter() - start)
        if self.state.settings.access_log:
            client = scope.get("client")
            accesslog.write(protocol="http", method=scope["method"], path=scope["path"],
                            model=call.model, version=labels[1], code=code,
                            seconds=time.perf_counter() - start, request_id=call.request_id,
                            client=client[0] if client else None)  # fmt: skip
        elif code >= 400 or log.isEnabledFor(logging.DEBUG):
            log.log(
                log_level(code),
                "%s %s %s -> %d (%.1f ms) id=%s",
                scope["method"],
                scope["path"],
                call.model or "-",
                code,
                1000 * (time.perf_counter() - start),
                call.request_id,
            )


async def _send_error(send: Send, exc: Any) -> None:
    body = orjson.dumps(exc.body())
    await send(
        {
            "type": "http.response.start",
            "status": exc.status_code,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
