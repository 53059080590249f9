"""Runs the app on uvicorn, and gRPC beside it, with settings for production: graceful drain
on SIGTERM for both."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI

from service.config import Settings
from service.connections import guarded_protocol
from service.main import create_app
from service.state import AppState
from service.workers import run_workers

if TYPE_CHECKING:
    from service.grpc_server import GrpcServer

log = logging.getLogger(__name__)
KEEP_ALIVE_S = 75


def uvicorn_config(settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # the service logs errors with request ids; metrics count the rest
        timeout_graceful_shutdown=int(settings.grace_s()),
        # Idle keep-alive connections must outlive the clients' and proxies' own idle timeouts
        # (httpx 5 s, ALB 60 s): otherwise the server closes a connection just as a client sends
        # on it and the client sees a reset, not a response. 75 s is nginx's default.
        timeout_keep_alive=KEEP_ALIVE_S,
        # httptools with a connection cap and header/body read timeouts (service/connections.py).
        http=guarded_protocol(settings),
        loop="uvloop",
        lifespan="on",
    )


class Server(uvicorn.Server):
    """uvicorn plus, when `grpc_enabled`, the gRPC server on the same event loop and app state.

    gRPC starts once the models have loaded and HTTP listens. On shutdown both stop taking new
    calls at once and drain side by side; the batchers close (the app's lifespan shutdown) only
    after the gRPC calls in flight have finished too.
    """

    def __init__(self, config: uvicorn.Config, settings: Settings, state: AppState) -> None:
        self._http_started = False
        super().__init__(config)
        self.settings, self.state = settings, state
        self.grpc: GrpcServer | None = None
        self._grpc_listening = not settings.grpc_enabled

    # uvicorn sets `started` once HTTP listens; whoever waits on it (a supervisor thread, the
    # tests) means "the server answers", so it stays False until gRPC listens too.
    @property
    def started(self) -> bool:
        return self._http_started and self._grpc_listening

    @started.setter
    def started(self, value: bool) -> None:
        self._http_started = value

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.settings.grpc_enabled or self.should_exit:
            return
        # Imported here: an HTTP-only server never loads grpc and the generated messages.
        from service.grpc_server import GrpcBindError, GrpcServer

        self.grpc = GrpcServer(self.state)
        try:
            await self.grpc.start()
        except GrpcBindError as exc:
            log.error("%s", exc)
            self.grpc = None
            sys.exit(1)  # as uvicorn does when it cannot bind HTTP
        self._grpc_listening = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.grpc is None:
            await super().shutdown(sockets)
            return
        grpc_stopped = asyncio.create_task(self.grpc.stop(self.settings.grace_s()))
        lifespan_shutdown = self.lifespan.shutdown

        async def after_grpc() -> None:
            await grpc_stopped
            await lifespan_shutdown()

        self.lifespan.shutdown = after_grpc
        await super().shutdown(sockets)


def build_server(settings: Settings) -> Server:
    """uvicorn (and gRPC) serving `create_app(settings)`."""
    config = uvicorn_config(settings)
    app = config.app
    assert isinstance(app, FastAPI)
    return Server(config, settings, app.state.notsure)


def _drained(signum: int, frame: FrameType | None) -> None:
    log.info("drained after signal %d; exiting", signum)


def serve(settings: Settings, sockets: list[socket.socket] | None = None) -> None:
    """One server process, on `sockets` when given (else it binds host:port itself)."""
    server = build_server(settings)
    # After a graceful shutdown uvicorn restores the previous SIGTERM handler and re-raises the
    # signal; with the default action the drained process then dies with -15 (143 in a shell),
    # which supervisors read as a crash. A handler here makes that re-raise a no-op: exit 0.
    signal.signal(signal.SIGTERM, _drained)
    server.run(sockets)


def run(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests finish before the process exits 0."""
    if settings.workers == 1:
        serve(settings)
        return
    sys.exit(run_workers(settings, serve))
