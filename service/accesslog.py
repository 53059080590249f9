"""Access log lines as JSON (the `access_log` setting): one object per request, on the
`notsure.access` logger, for HTTP and gRPC alike, so that log pipelines parse them without a
pattern and join them to traces and NOT SURE records by `request_id`."""

from __future__ import annotations

import logging
import time

import orjson

log = logging.getLogger("notsure.access")


def level(code: int) -> int:
    """Client errors and successes at INFO; sheds and timeouts (503/504: load, not faults) at
    WARNING, so an overload does not flood the error log; other 5xx at ERROR."""
    if code < 500:
        return logging.INFO
    return logging.WARNING if code in (503, 504) else logging.ERROR


def write(*, protocol: str, method: str, path: str, model: str, version: str, code: int,
          seconds: float, request_id: str, client: str | None = None) -> None:  # fmt: skip
    """Log one request as a JSON line."""
    line = {
        "time": round(time.time(), 6),
        "request_id": request_id,
        "protocol": protocol,
        "method": method,
        "path": path,
        "model": model or None,
        "version": version or None,
        "status": code,
        "duration_ms": round(1000 * seconds, 3),
        "client": client,
    }
    log.log(level(code), "%s", orjson.dumps(line).decode())
