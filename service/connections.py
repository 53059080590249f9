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
    """httptools protocol with one read deadline per connection: set when a connection opens or
    a new request starts (header timeout), moved on each body chunk (body timeout), cleared
    once the request is read. Subclasses made by `guarded_protocol` set the three limits.

    Moving a deadline is an assignment: one event-loop timer per connection checks it when it
    fires and waits again for a deadline that moved later (a timer started and cancelled four
    times a request cost about 6 us of a 1-image request's few hundred)."""

    max_connections = 2048
    header_timeout_s = 10.0
    body_timeout_s = 20.0

    _read_timer: asyncio.TimerHandle | None = None
    _deadline: float | None = None  # loop time; None: not waiting for the client
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
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
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
        deadline = self._deadline = self.loop.time() + seconds
        timer = self._read_timer
        if timer is None or timer.when() > deadline:  # none yet, or one that would fire late
            if timer is not None:
                timer.cancel()
            self._read_timer = self.loop.call_at(deadline, self._check_deadline)

    def _disarm(self) -> None:
        self._deadline = None  # the timer, if it fires, finds nothing to do

    def _check_deadline(self) -> None:
        self._read_timer = None
        deadline = self._deadline
        if deadline is None:
            return
        if self.loop.time() < deadline:  # moved later since the timer was set
            self._read_timer = self.loop.call_at(deadline, self._check_deadline)
            return
        self._deadline = None
        self._timed_out()

    def _timed_out(self) -> None:
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
