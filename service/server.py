"""Runs the app on uvicorn with settings for production: graceful drain on SIGTERM."""

from __future__ import annotations

import logging
import signal
from types import FrameType

import uvicorn

from service.config import Settings
from service.connections import guarded_protocol
from service.main import create_app

log = logging.getLogger(__name__)
KEEP_ALIVE_S = 75


def uvicorn_config(settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # the service logs errors with request ids; metrics count the rest
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
        # Idle keep-alive connections must outlive the clients' and proxies' own idle timeouts
        # (httpx 5 s, ALB 60 s): otherwise the server closes a connection just as a client sends
        # on it and the client sees a reset, not a response. 75 s is nginx's default.
        timeout_keep_alive=KEEP_ALIVE_S,
        # httptools with a connection cap and header/body read timeouts (service/connections.py).
        http=guarded_protocol(settings),
        loop="uvloop",
        lifespan="on",
    )


def _drained(signum: int, frame: FrameType | None) -> None:
    log.info("drained after signal %d; exiting", signum)


def run(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests finish before the process exits 0."""
    server = uvicorn.Server(uvicorn_config(settings))
    # After a graceful shutdown uvicorn restores the previous SIGTERM handler and re-raises the
    # signal; with the default action the drained process then dies with -15 (143 in a shell),
    # which supervisors read as a crash. A handler here makes that re-raise a no-op: exit 0.
    signal.signal(signal.SIGTERM, _drained)
    server.run()
