"""Bounds on slow and idle clients, in uvicorn's HTTP protocol: a connection cap, a header-read
timeout and a body-read timeout (uvicorn has a keep-alive timeout, but nothing bounds a client
that trickles its request one byte at a time)."""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.config import Settings

# Written straight to the socket: by the time a timer fires there may be no ASGI cycle (headers
# never completed), so the app cannot answer. `Connection: close` because the socket is closed next.
_RESPONSES = {
    status: (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n{body}"
    ).encode()
    for status, reason, body in (
        (408, "Request Timeout", "request not received in time; send it in one go\n"),
        (503, "Service Unavailable", "too many open connections; retry later\n"),
    )
}


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """httptools protocol with one read timer per connection: armed when a connection opens or a
    new request starts (header timeout), re-armed on each body chunk (body timeout), disarmed
    once the request is read. Subclasses made by `guarded_protocol` set the three limits."""

    max_connections = 2048
    header_timeout_s = 10.0
    body_timeout_s = 20.0

    _read_timer: asyncio.TimerHandle | None = None
    _reading_body = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # `connections` is the server's set of open connections, this one included.
        if len(self.connections) > self.max_connections:
            self._refuse(503)
            return
        self._arm(self.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # A keep-alive connection starting its next request: its headers get the full timeout.
        self._reading_body = False
        self._arm(self.header_timeout_s)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._reading_body = True
        self._arm(self.body_timeout_s)

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self._arm(self.body_timeout_s)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_body = False
        self._disarm()

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        if self._reading_body and self.flow.read_paused:
            # The server stopped reading (the app has not consumed the body yet): the pause is
            # ours, not the client's.
            self._arm(self.body_timeout_s)
            return
        self._refuse(408)

    def _refuse(self, status: int) -> None:
        """Answer `status` unless a response has started, then close the connection."""
        cycle = self.cycle
        if cycle is None or not cycle.response_started:
            self.transport.write(_RESPONSES[status])
        if cycle is not None:
            # The app, if it is waiting for the body, sees a disconnect; its answer is dropped.
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()


def guarded_protocol(settings: Settings) -> type[GuardedHttpToolsProtocol]:
    """The protocol class uvicorn instantiates per connection, with these settings' limits."""
    return type(
        "GuardedHttpToolsProtocol",
        (GuardedHttpToolsProtocol,),
        {
            "max_connections": settings.max_connections,
            "header_timeout_s": settings.header_timeout_s,
            "body_timeout_s": settings.body_timeout_s,
        },
    )
